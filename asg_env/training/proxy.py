"""Proxy guidance (ASG §2.1): the student keeps the frozen ImageNet head θ_o, a frozen
teacher sees the same images, and the loss is ``L = L_XE + λ · KL(teacher ‖ student_o)``."""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from asg_env.training.backbones import Backbone

HEADS = ("linear", "mlp")


def make_head(kind: str, in_features: int, num_classes: int) -> nn.Module:
    """θ_n. ``"linear"``: one fully-connected layer, as the paper says (§3.2). ``"mlp"``: the
    official ``train.py``'s ``Linear(d, 512) → ReLU → Linear(512, classes)``."""
    if kind == "linear":
        return nn.Linear(in_features, num_classes)
    return nn.Sequential(nn.Linear(in_features, 512), nn.ReLU(inplace=True), nn.Linear(512, num_classes))


class StudentNet(nn.Module):
    """θ_s (shared features), θ_n (new task head) and θ_o (ImageNet head, frozen)."""

    def __init__(self, backbone: Backbone, num_classes: int, head: str = "linear"):
        super().__init__()
        self.features = backbone.features
        self.new_head = make_head(head, backbone.feature_dim, num_classes)
        self.imagenet_head = backbone.imagenet_head.requires_grad_(False)

    @property
    def classifier(self) -> nn.Linear:
        """The last layer of θ_n, whose weight statistics the observation reports (as the
        official ``l2o_train.py`` reports ``fc_new[2]``'s)."""
        return self.new_head if isinstance(self.new_head, nn.Linear) else self.new_head[-1]

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """θ_o's ImageNet logits."""
        return self.imagenet_head(self.features(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (task logits, ImageNet logits) for one shared feature pass."""
        f = self.features(x)
        return self.new_head(f), self.imagenet_head(f)


def make_teacher(backbone: Backbone) -> nn.Module:
    """A frozen copy of the ImageNet model M_o, kept in eval mode."""
    teacher = nn.Sequential(copy.deepcopy(backbone.features), copy.deepcopy(backbone.imagenet_head))
    return teacher.eval().requires_grad_(False)


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher ‖ p_student) over the last (class) dimension, averaged over all others.

    Logits of shape (B, K) give Eq. 4 (up to the teacher entropy, a constant for the
    student). Logits of shape (B, N, K), one row per cropped patch, give the dense Eq. 5.
    """
    log_p_s = F.log_softmax(student_logits.float(), dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float(), dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()


class ProxyLoss(NamedTuple):
    """``total = xe + λ · guidance`` (see :mod:`asg_env.training.guidance` for the guidance terms)."""

    total: torch.Tensor
    xe: torch.Tensor
    guidance: torch.Tensor


def proxy_guidance_loss(
    task_logits: torch.Tensor,
    targets: torch.Tensor,
    student_imagenet_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    lam: float,
) -> ProxyLoss:
    """Eq. 2: ``L = L_XE + λ L_KL`` (batch means). Without teacher logits, L_KL is 0."""
    xe = F.cross_entropy(task_logits.float(), targets)
    if teacher_logits is None:
        kl = xe.new_zeros(())
    else:
        kl = kl_to_teacher(student_imagenet_logits, teacher_logits)
    return ProxyLoss(xe + lam * kl, xe, kl)
