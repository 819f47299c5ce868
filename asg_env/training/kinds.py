"""Task kinds: what a kind of task (``Task.kind``) brings to the trainer.

A kind builds the student and the frozen teacher from an ImageNet backbone, picks the
guidance term and the training objective, and measures the student on the target and the
held-out synthetic images. The trainer holds no branch on the kind of task: it asks
``KINDS[task.kind]``, so a new kind is one entry here (as DomainBed registers its
algorithms), and a new dataset of an existing kind is one entry in
:data:`asg_env.tasks.registry.TASKS`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from asg_env.errors import UserInputError
from asg_env.tasks.registry import Task
from asg_env.training.backbones import Backbone
from asg_env.training.guidance import Guidance, make_guidance
from asg_env.training.proxy import StudentNet, make_teacher
from asg_env.training.segmentation import (
    DenseKLGuidance,
    DenseTeacher,
    SegObjective,
    SegStudentNet,
    dense_backbone,
    iou_from_confusion,
)


class Objective(nn.Module):
    """``[L, L_XE, guidance]`` on one batch, as a module so that DDP can wrap its forward."""

    def __init__(self, student: StudentNet, guidance: Guidance, lam: float):
        super().__init__()
        self.student, self.guidance, self.lam = student, guidance, lam

    def forward(self, x: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
        features = self.student.features(x)
        xe = F.cross_entropy(self.student.new_head(features).float(), y)
        term = self.guidance(self.student, features, teacher)
        return torch.stack([xe + self.lam * term, xe, term])


class Classification:
    """One label per image: θ_n is a new linear (or MLP) head beside θ_o, proxy guidance is the
    KL of θ_o's ImageNet prediction to the teacher's (Eq. 2), and the measures are accuracy
    and mean per-class accuracy."""

    kind = "classification"
    headline = "target_mean_class_acc"

    def check(self, config: dict) -> None:
        pass

    def models(self, parts: Backbone, task: Task, config: dict) -> tuple[nn.Module, nn.Module]:
        """(teacher, student)."""
        return make_teacher(parts), StudentNet(parts, task.num_classes, config["head"])

    def guidance(self, name: str, student: nn.Module, task: Task) -> Guidance:
        return make_guidance(name, student, task.heldout[0] if name == "si" else None)

    def objective(self, student: nn.Module, guidance: Guidance, lam: float) -> nn.Module:
        return Objective(student, guidance, lam)

    def metrics(self, task: Task) -> dict:
        k = task.num_classes
        metrics = {"target_acc": MulticlassAccuracy(k, average="micro"),
                   "target_mean_class_acc": MulticlassAccuracy(k, average="macro")}
        if task.source_eval is not None:
            metrics.update(synthetic_acc=MulticlassAccuracy(k, average="micro"), synthetic_xe=MeanMetric())
        return metrics

    def update_target(self, metrics: dict, student: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      tta_flip: bool) -> torch.Tensor:
        """Score one target batch; returns θ_o's logits for the KL to the teacher."""
        features = student.features(x)
        new, old = student.new_head(features), student.imagenet_head(features)
        if tta_flip:
            new = (new.float().sigmoid() + student(x.flip(3))[0].float().sigmoid()) / 2
        metrics["target_acc"].update(new.argmax(1), y)
        metrics["target_mean_class_acc"].update(new.argmax(1), y)
        return old

    def update_synthetic(self, metrics: dict, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        logits = student(x)[0].float()
        metrics["synthetic_acc"].update(logits.argmax(1), y.long())
        metrics["synthetic_xe"].update(F.cross_entropy(logits, y.long(), reduction="none"))

    def finish(self, out: dict, task: Task) -> dict:
        return out

    def class_keys(self, task: Task) -> list[str]:
        return []

    def teacher_classify(self, teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return teacher(x)


class Segmentation:
    """A label per pixel (255 ignored): θ_n is an FCN-8s decoder, proxy guidance the dense KL
    on pooled patches of the last map (Eq. 5), and the measures mIoU, pixel accuracy and the
    IoU of every class, from torchmetrics' confusion matrix."""

    kind = "segmentation"
    headline = "target_miou"

    def check(self, config: dict) -> None:
        if config["guidance"] not in ("kl", "none") or config["tta_flip"]:
            raise UserInputError("segmentation takes guidance 'kl' (dense, Eq. 5) or 'none', and no tta_flip "
                                 f"(got {config['guidance']!r}, {config['tta_flip']})")

    def models(self, parts: Backbone, task: Task, config: dict) -> tuple[nn.Module, nn.Module]:
        dense = dense_backbone(parts)
        return (DenseTeacher(dense, config["patch_grid"]),
                SegStudentNet(dense, task.num_classes, config["patch_grid"], config["upsample"]))

    def guidance(self, name: str, student: nn.Module, task: Task) -> Guidance:
        return DenseKLGuidance() if name == "kl" else Guidance()

    def objective(self, student: nn.Module, guidance: Guidance, lam: float) -> nn.Module:
        return SegObjective(student, guidance, lam)

    def metrics(self, task: Task) -> dict:
        metrics = {"target": MulticlassConfusionMatrix(task.num_classes, ignore_index=255)}
        if task.source_eval is not None:
            metrics["synthetic"] = MulticlassConfusionMatrix(task.num_classes, ignore_index=255)
        return metrics

    def update_target(self, metrics: dict, student: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      tta_flip: bool) -> torch.Tensor:
        scores, final = student(x)
        metrics["target"].update(scores.argmax(1), y.long())
        return student.imagenet_logits(final)

    def update_synthetic(self, metrics: dict, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        metrics["synthetic"].update(student(x)[0].argmax(1), y.long())

    def finish(self, out: dict, task: Task) -> dict:
        """mIoU, pixel accuracy and the IoU of every class, from the confusion matrices."""
        confusion = out.pop("target")
        iou, miou = iou_from_confusion(confusion)
        out.update(target_miou=miou, target_pixel_acc=confusion.diag().sum() / confusion.sum().clamp(min=1))
        out.update({f"target_iou/{name}": v for name, v in zip(task.class_names, iou)})
        if "synthetic" in out:
            out["synthetic_miou"] = iou_from_confusion(out.pop("synthetic"))[1]
        return out

    def class_keys(self, task: Task) -> list[str]:
        return [f"target_iou/{c}" for c in task.class_names]

    def teacher_classify(self, teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return teacher.classify(x)


KINDS: dict[str, Classification | Segmentation] = {f.kind: f for f in (Classification(), Segmentation())}
