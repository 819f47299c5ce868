"""Semantic segmentation with proxy guidance (ASG §3.2, Eq. 5).

The student is an FCN-8s on an ImageNet backbone: the backbone's last feature map is scored
by a 1×1 convolution, upsampled ×2 and summed with 1×1 scores of the stride-16 map, upsampled
×2 and summed with scores of the stride-8 map, and upsampled ×8 to the input. As in the
official ``fcn8s_vgg.py`` (``FCN8sAtOnce``), the score layers start at zero and the
upsampling layers are learned transposed convolutions that start as bilinear interpolation
(``upsample="bilinear"`` fixes them); for VGG the stride-16 and stride-8 maps are scaled by
0.01 and 0.0001 before scoring, as ``FCN8sAtOnce`` does to train all three at once. θ_n is
that decoder; θ_o is the frozen ImageNet classifier.

Dense proxy guidance (Eq. 5): the last feature map is cut into a ``g × g`` grid of patches,
each patch is average-pooled and classified by θ_o, and the KL to the teacher is taken per
patch and averaged; the teacher sees the same patches of the same images. The official
``train_seg.py`` pools the whole feature map into one vector (its ``forward_fc`` after
``pool5``), which is ``g = 1``, the default here; ``patch_grid=g`` gives Eq. 5's patches.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from asg_env.errors import UserInputError
from asg_env.training.backbones import Backbone
from asg_env.training.guidance import Guidance
from asg_env.training.proxy import kl_to_teacher

UPSAMPLING = ("deconv", "bilinear")

@dataclass
class DenseBackbone:
    """An ImageNet backbone cut for dense prediction: ``trunk`` (θ_s) maps an image to the map
    the decoder scores; ``taps`` name the trunk's modules whose outputs are the stride-8 and
    stride-16 maps (FCN-8s's pool3/pool4) and the map that proxy guidance pools ("" is the
    trunk's own output); ``imagenet_head`` (θ_o) classifies one patch pooled to
    ``head_pool × head_pool``. ``skip_scales`` multiply the stride-16 and stride-8 maps before
    the decoder scores them."""

    trunk: nn.Module
    taps: tuple[str, str, str]
    imagenet_head: nn.Module
    head_pool: int
    name: str
    skip_scales: tuple[float, float] = (1.0, 1.0)


class _LiteTrunk(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


class _ResNetTrunk(nn.Module):
    def __init__(self, resnet: nn.Module):
        super().__init__()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(resnet, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class _VGGTrunk(nn.Module):
    """conv1_1 … pool5, then fc6 and fc7 as convolutions (7×7 and 1×1) holding the ImageNet
    fc6/fc7 weights, as FCN's ``copy_params_from_vgg16`` converts them."""

    def __init__(self, vgg: nn.Module):
        super().__init__()
        self.features = vgg.features
        fc6, fc7 = vgg.classifier[0], vgg.classifier[3]
        conv6, conv7 = nn.Conv2d(512, 4096, 7, padding=3), nn.Conv2d(4096, 4096, 1)
        with torch.no_grad():
            conv6.weight.copy_(fc6.weight.view(4096, 512, 7, 7))
            conv6.bias.copy_(fc6.bias)
            conv7.weight.copy_(fc7.weight.view(4096, 4096, 1, 1))
            conv7.bias.copy_(fc7.bias)
        self.fc = nn.Sequential(conv6, nn.ReLU(inplace=True), nn.Dropout2d(), conv7, nn.ReLU(inplace=True), nn.Dropout2d())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def dense_backbone(backbone: Backbone) -> DenseBackbone:
    """The dense cut of a classification :class:`~asg_env.training.backbones.Backbone`."""
    if backbone.name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        return DenseBackbone(_LiteTrunk(backbone.features), ("model.blocks.2", "model.blocks.4", ""),
                             backbone.imagenet_head, 1, backbone.name)
    if backbone.name.startswith("resnet"):
        return DenseBackbone(_ResNetTrunk(backbone.features), ("layer2", "layer3", ""), backbone.imagenet_head, 1,
                             backbone.name)
    if backbone.name == "vgg16":
        vgg = backbone.features
        # θ_o is the ImageNet classifier from pool5 on: fc6, fc7 (frozen copies) and fc8.
        head = nn.Sequential(nn.Flatten(), copy.deepcopy(vgg.classifier[0]), nn.ReLU(inplace=True), nn.Dropout(),
                             copy.deepcopy(vgg.classifier[3]), nn.ReLU(inplace=True), nn.Dropout(), backbone.imagenet_head)
        return DenseBackbone(_VGGTrunk(vgg), ("features.16", "features.23", "features.30"), head, 7, backbone.name,
                             skip_scales=(0.01, 0.0001))
    raise UserInputError(f"segmentation is built for efficientnet_lite0/1/2, resnet50/101 and vgg16, not {backbone.name!r}")


def _maps(trunk: nn.Module, taps: tuple[str, str, str], x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The three tapped maps and the trunk's output, from one forward pass."""
    modules = dict(trunk.named_modules())
    got: dict[str, torch.Tensor] = {}
    hooks = [modules[name].register_forward_hook(lambda m, i, out, name=name: got.setdefault(name, out))
             for name in taps if name]
    try:
        out = trunk(x)
    finally:
        for h in hooks:
            h.remove()
    return [got[name] if name else out for name in taps], out


def patch_logits(head: nn.Module, final_map: torch.Tensor, grid: int, pool: int = 1) -> torch.Tensor:
    """θ_o on each of ``grid × grid`` patches, each average-pooled to ``pool × pool``:
    (B, grid², classes)."""
    b, c = final_map.shape[:2]
    pooled = F.adaptive_avg_pool2d(final_map, grid * pool)  # (B, C, g·p, g·p)
    patches = pooled.view(b, c, grid, pool, grid, pool).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c * pool * pool)
    return head(patches.reshape(b * grid * grid, -1)).view(b, grid * grid, -1)


class BilinearDeconv(nn.Module):
    """×``stride`` upsampling by a learned transposed convolution (FCN's ``upscore`` layers),
    initialised to bilinear interpolation. The input is edge-padded by one cell, so at
    initialisation the output equals ``F.interpolate(x, scale_factor=stride, mode="bilinear")``
    exactly, borders included, and it is cut to the size asked for."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        if stride % 2:
            raise ValueError(f"stride must be even, not {stride}")
        self.stride = stride
        self.deconv = nn.ConvTranspose2d(channels, channels, 2 * stride, stride, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Back to bilinear interpolation: each class's own 2s × 2s tent kernel."""
        channels, s = self.deconv.in_channels, self.stride
        taps = 1 - (torch.arange(2 * s) - (2 * s - 1) / 2).abs() / s
        with torch.no_grad():
            self.deconv.weight.zero_()
            self.deconv.weight[range(channels), range(channels)] = taps[:, None] * taps[None, :]

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        start = self.stride + self.stride // 2  # one padded cell, then the kernel's half-cell offset
        out = self.deconv(F.pad(x, (1, 1, 1, 1), mode="replicate"))
        return out[..., start : start + size[0], start : start + size[1]]


class FCN8sHead(nn.Module):
    """θ_n: 1×1 score layers on three strides, summed coarse to fine through ×2, ×2 and ×8
    upsampling (learned and bilinear-initialised with ``upsample="deconv"``, fixed bilinear
    interpolation with ``"bilinear"``)."""

    def __init__(self, channels: tuple[int, int, int], num_classes: int, upsample: str = "deconv",
                 skip_scales: tuple[float, float] = (1.0, 1.0)):
        super().__init__()
        if upsample not in UPSAMPLING:
            raise UserInputError(f"upsample must be one of {UPSAMPLING}, not {upsample!r}")
        c8, c16, c32 = channels
        self.score_pool3 = nn.Conv2d(c8, num_classes, 1)
        self.score_pool4 = nn.Conv2d(c16, num_classes, 1)
        self.score_fr = nn.Conv2d(c32, num_classes, 1)
        for conv in (self.score_pool3, self.score_pool4, self.score_fr):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        if upsample == "deconv":
            self.upscore2 = BilinearDeconv(num_classes, 2)
            self.upscore_pool4 = BilinearDeconv(num_classes, 2)
            self.upscore8 = BilinearDeconv(num_classes, 8)
        else:
            self.upscore2 = self.upscore_pool4 = self.upscore8 = _interpolate
        self.skip_scales = skip_scales

    def forward(self, skip8: torch.Tensor, skip16: torch.Tensor, final: torch.Tensor, size) -> torch.Tensor:
        scale16, scale8 = self.skip_scales
        score = self.upscore2(self.score_fr(final), skip16.shape[-2:]) + self.score_pool4(skip16 * scale16)
        score = self.upscore_pool4(score, skip8.shape[-2:]) + self.score_pool3(skip8 * scale8)
        return self.upscore8(score, size)


def _interpolate(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class SegStudentNet(nn.Module):
    """θ_s (the trunk), θ_n (the FCN-8s decoder) and θ_o (the ImageNet head, frozen)."""

    def __init__(self, dense: DenseBackbone, num_classes: int, patch_grid: int = 1, upsample: str = "deconv"):
        super().__init__()
        self.features = dense.trunk
        self.imagenet_head = dense.imagenet_head.requires_grad_(False)
        self.taps, self.head_pool, self.patch_grid = dense.taps, dense.head_pool, int(patch_grid)
        was_training = self.features.training
        self.features.eval()  # the probe must not touch BatchNorm's running statistics
        with torch.no_grad():
            (skip8, skip16, _), out = _maps(self.features, self.taps, torch.zeros(1, 3, 64, 64))
        self.features.train(was_training)
        self.new_head = FCN8sHead((skip8.shape[1], skip16.shape[1], out.shape[1]), num_classes, upsample,
                                  dense.skip_scales)

    @property
    def classifier(self) -> nn.Conv2d:
        """The projection of the last feature map, whose weight statistics the observation reports."""
        return self.new_head.score_fr

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-pixel class scores (B, C, H, W), the map proxy guidance pools)."""
        (skip8, skip16, guided), out = _maps(self.features, self.taps, x)
        return self.new_head(skip8, skip16, out, x.shape[-2:]), guided

    def imagenet_logits(self, guided_map: torch.Tensor) -> torch.Tensor:
        return patch_logits(self.imagenet_head, guided_map, self.patch_grid, self.head_pool)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """θ_o on the whole image (the retention photos)."""
        return patch_logits(self.imagenet_head, _maps(self.features, self.taps, x)[0][2], 1, self.head_pool)[:, 0]


class DenseTeacher(nn.Module):
    """The frozen ImageNet model on the same patches: (B, g², 1000)."""

    def __init__(self, dense: DenseBackbone, patch_grid: int = 1):
        super().__init__()
        self.features, self.head = copy.deepcopy(dense.trunk), copy.deepcopy(dense.imagenet_head)
        self.taps, self.head_pool, self.patch_grid = dense.taps, dense.head_pool, int(patch_grid)
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return patch_logits(self.head, _maps(self.features, self.taps, x)[0][2], self.patch_grid, self.head_pool)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return patch_logits(self.head, _maps(self.features, self.taps, x)[0][2], 1, self.head_pool)[:, 0]


class DenseKLGuidance(Guidance):
    """Eq. 5: KL(teacher ‖ θ_o) per patch, averaged over patches and images."""

    name, teacher_output = "kl", "logits"

    def __call__(self, student, features, teacher):
        logits = student.imagenet_logits(features)
        return kl_to_teacher(logits, teacher.view(logits.shape))


class SegObjective(nn.Module):
    """``[L, L_XE, guidance]`` for segmentation: pixel cross-entropy (label 255 ignored)."""

    def __init__(self, student: SegStudentNet, guidance: Guidance, lam: float):
        super().__init__()
        self.student, self.guidance, self.lam = student, guidance, lam

    def forward(self, x: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
        scores, final = self.student(x)
        xe = F.cross_entropy(scores.float(), y.long(), ignore_index=255)
        term = self.guidance(self.student, final, teacher)
        return torch.stack([xe + self.lam * term, xe, term])


def iou_from_confusion(confusion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class IoU ``tp / (tp + fp + fn)`` from a (true × predicted) confusion matrix, and
    their mean over the classes that occur in the labels or the predictions."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = tp / union.clamp(min=1)
    return iou.float(), iou[union > 0].mean().float()
