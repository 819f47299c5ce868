"""Semantic segmentation with proxy guidance (ASG §3.2, Eq. 5).

The student is an FCN-8s on an ImageNet backbone: the backbone's last feature map is scored
by a 1×1 convolution, upsampled and summed with 1×1 scores of the stride-16 and stride-8
feature maps, and upsampled to the input (bilinear; the score layers start at zero, as the
official ``fcn8s_vgg.py`` initialises them). θ_n is that decoder; θ_o is the frozen ImageNet
classifier.

Dense proxy guidance (Eq. 5): the last feature map is cut into a ``g × g`` grid of patches,
each patch is average-pooled and classified by θ_o, and the KL to the teacher is taken per
patch and averaged; the teacher sees the same patches of the same images. The official
``train_seg.py`` pools the whole feature map into one vector (its ``forward_fc`` after
``pool5``), which is ``g = 1``, the default here; ``patch_grid=g`` gives Eq. 5's patches.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from asg_env.backbones import Backbone
from asg_env.errors import UserInputError
from asg_env.guidance import Guidance
from asg_env.proxy import kl_to_teacher

# The modules whose outputs are the stride-8 and stride-16 feature maps FCN-8s reads.
SKIP_TAPS = {"efficientnet_lite0": ("blocks.2", "blocks.4")}


def _final_map(features: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's last feature map, before global pooling."""
    return features.forward_features(x)


def patch_logits(head: nn.Linear, final_map: torch.Tensor, grid: int) -> torch.Tensor:
    """θ_o on each of ``grid × grid`` average-pooled patches: (B, grid², classes)."""
    pooled = F.adaptive_avg_pool2d(final_map, grid)
    return head(pooled.flatten(2).transpose(1, 2))


class FCN8sHead(nn.Module):
    """θ_n: 1×1 score layers on three strides, summed coarse to fine and upsampled."""

    def __init__(self, channels: tuple[int, int, int], num_classes: int):
        super().__init__()
        c8, c16, c32 = channels
        self.score_pool3 = nn.Conv2d(c8, num_classes, 1)
        self.score_pool4 = nn.Conv2d(c16, num_classes, 1)
        self.score_fr = nn.Conv2d(c32, num_classes, 1)
        for conv in (self.score_pool3, self.score_pool4, self.score_fr):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, skip8: torch.Tensor, skip16: torch.Tensor, final: torch.Tensor, size) -> torch.Tensor:
        up = lambda t, like: F.interpolate(t, size=like.shape[-2:], mode="bilinear", align_corners=False)  # noqa: E731
        score = up(self.score_fr(final), skip16) + self.score_pool4(skip16)
        score = up(score, skip8) + self.score_pool3(skip8)
        return F.interpolate(score, size=size, mode="bilinear", align_corners=False)


class SegStudentNet(nn.Module):
    """θ_s (the backbone), θ_n (the FCN-8s decoder) and θ_o (the ImageNet head, frozen)."""

    def __init__(self, backbone: Backbone, num_classes: int, patch_grid: int = 1):
        super().__init__()
        if backbone.name not in SKIP_TAPS:
            raise UserInputError(f"segmentation is built for {', '.join(SKIP_TAPS)}, not {backbone.name!r}")
        self.features = backbone.features
        self.imagenet_head = backbone.imagenet_head.requires_grad_(False)
        self.patch_grid = int(patch_grid)
        modules = dict(self.features.named_modules())
        self._taps = [modules[name] for name in SKIP_TAPS[backbone.name]]
        was_training = self.features.training
        self.features.eval()  # the probe must not touch BatchNorm's running statistics
        with torch.no_grad():
            skips, final = self._maps(torch.zeros(1, 3, 64, 64))
        self.features.train(was_training)
        self.new_head = FCN8sHead((skips[0].shape[1], skips[1].shape[1], final.shape[1]), num_classes)

    @property
    def classifier(self) -> nn.Conv2d:
        """The projection of the last feature map, whose weight statistics the observation reports."""
        return self.new_head.score_fr

    def _maps(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        skips: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda mod, inp, out: skips.append(out)) for m in self._taps]
        try:
            final = _final_map(self.features, x)
        finally:
            for h in hooks:
                h.remove()
        return skips, final

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-pixel class scores (B, C, H, W), the last feature map)."""
        skips, final = self._maps(x)
        return self.new_head(skips[0], skips[1], final, x.shape[-2:]), final

    def imagenet_logits(self, final_map: torch.Tensor) -> torch.Tensor:
        return patch_logits(self.imagenet_head, final_map, self.patch_grid)


class DenseTeacher(nn.Module):
    """The frozen ImageNet model on the same patches: (B, g², 1000)."""

    def __init__(self, backbone: Backbone, patch_grid: int = 1):
        super().__init__()
        self.features = copy.deepcopy(backbone.features)
        self.head = copy.deepcopy(backbone.imagenet_head)
        self.patch_grid = int(patch_grid)
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return patch_logits(self.head, _final_map(self.features, x), self.patch_grid)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Whole-image ImageNet logits (for the retention photos)."""
        return self.head(self.features(x))


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
