"""Class-balanced self-training (CBST, Zou et al. 2018) and confidence-regularised self-training
(CRST, Zou et al. 2019): the unsupervised domain adaptation that ASG §3.5 starts from its model.

This is **domain adaptation**: it trains on the target images, without their labels. Domain
generalisation (the envs, policy training, ``apply_policy.py``) never sees a target image.

Each round, following the official ``crst_seg.py`` (yzou2/CRST):

1. Predict every target image (softmax of θ_n). For each class c, collect the confidence
   (max probability) of the samples, or of every ``ds_rate``-th pixel per image, predicted as c;
   sort it in descending order; the class's threshold λ_c is the value at ``floor(n · p) − 1``,
   where p is the round's target portion (1.0 when no sample falls there).
2. Pseudo-label: ``argmax_c p_c / λ_c``, ignored (255) where ``max_c p_c / λ_c < 1``. With
   LRENT, soft labels ``ŷ ∝ (p / λ)^(1/α)`` instead, kept where
   ``−Σ ŷ log p + α Σ ŷ log ŷ < −Σ ŷ log λ``.
3. Train ``epochs_per_round`` epochs on all pseudo-labelled target images mixed with a fresh
   random subset of the labelled source images. Both are shuffled together, and a new SGD is
   built every round. The loss is the cross-entropy over all labelled samples or pixels,
   plus, for MRKLD, ``w · mean over the target's labelled samples of −(1/C) Σ_c log p_c``
   (KL(uniform ‖ p) up to a constant).

The portions grow each round: the target portion from 0.2 by 0.05 to at most 0.5, the source
portion from 0.03 by 0.0025 to at most 0.06. The official MRKLD code multiplies its weight in
twice (0.1 → 0.01); the papers' weight is used here, and ``kld_weight_squared`` gives the code's.
Target images larger than the training crop (Cityscapes) are trained on in random crops of
the source's size, with their pseudo-labels cropped alike (the official code crops 512×1024);
pseudo-labels come from the whole image, flip-averaged with ``test_flipping`` as the official
scripts ask. Not built: the official rare-class-centred crops (``mine_chance``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from asg_env.training.settings import FLAG, number, one_of, setting, whole

IGNORE = 255
# method: (MRKLD weight, LRENT α). mrkld.sh sets 0.1 and lrent.sh 0.25, each alone (crst-lrent);
# crst-mrkld-lrent is the pairing that ASG's Table 4 reports.
METHODS = {"cbst": (0.0, 0.0), "crst-mrkld": (0.1, 0.0), "crst-lrent": (0.0, 0.25), "crst-mrkld-lrent": (0.1, 0.25)}


@dataclass
class SelfTrainingConfig:
    method: str = setting("cbst", one_of("cbst", "crst-mrkld", "crst-lrent", "crst-mrkld-lrent"), "cbst, or crst with the KL (mrkld) and/or entropy (lrent) regulariser (Table 4's methods)")
    rounds: int = setting(3, whole(1), "self-training rounds (crst_seg.py: NUM_ROUNDS = 4, the last of which only evaluates)")
    epochs_per_round: int = setting(2, whole(1), "epochs of self-training per round (the official EPR)")
    init_tgt_port: float = setting(0.2, number(0, 1, above=True), "the first round's portion of pseudo-labelled target predictions (per class)")
    tgt_port_step: float = setting(0.05, number(0, 1), "added to the target portion each round")
    max_tgt_port: float = setting(0.5, number(0, 1, above=True), "the target portion's cap")
    init_src_port: float = setting(0.03, number(0, 1), "the first round's portion of source images trained beside them")
    src_port_step: float = setting(0.0025, number(0, 1), "added to the source portion each round")
    max_src_port: float = setting(0.06, number(0, 1), "the source portion's cap")
    lr: float | None = setting(None, number(0, above=True, optional=True), "null: lr_ratio × the fine-tuning run's η_base")
    lr_ratio: float = setting(0.2, number(0, above=True), "the official 5e-5 self-training / 2.5e-4 source training")
    head_lr_mult: float = setting(10.0, number(0), "the official 10× on the classifier")
    momentum: float = setting(0.9, number(0, 1, below=True), "SGD momentum")
    weight_decay: float = setting(5e-4, number(0), "SGD weight decay")
    batch_size: int | None = setting(None, whole(1, optional=True), "null: the fine-tuning run's")
    ds_rate: int = setting(4, whole(1), "every ds_rate-th pixel's confidence counts for the thresholds")
    mr_weight_kld: float | None = setting(None, number(0, optional=True), "null: the method's")
    lr_weight_ent: float | None = setting(None, number(0, above=True, optional=True), "null: the method's")
    kld_weight_squared: bool = setting(False, FLAG, "the official code's effective w²")
    test_flipping: bool = setting(False, FLAG, "pseudo-labels from the mean of each image's and its mirror's softmax")
    seed: int = setting(3, whole(0), "the self-training's seed (the official RANDSEED)")

    @property
    def weights(self) -> tuple[float, float]:
        kld, ent = METHODS[self.method]
        return (kld if self.mr_weight_kld is None else self.mr_weight_kld,
                ent if self.lr_weight_ent is None else self.lr_weight_ent)

    def portions(self, round_index: int) -> tuple[float, float]:
        """(target portion, source portion) of round ``round_index`` (0-based), summed step by
        step as the official loop does, so ``floor(n · p)`` rounds the same way."""
        tgt, src = self.init_tgt_port, self.init_src_port
        for _ in range(round_index):
            tgt = min(tgt + self.tgt_port_step, self.max_tgt_port)
            src = min(src + self.src_port_step, self.max_src_port)
        return tgt, src


SELF_TRAINING_SETTINGS = {f.name: f.metadata["check"] for f in fields(SelfTrainingConfig)}


class ConfidenceCollector:
    """Step 1's confidences per predicted class, gathered batch by batch."""

    def __init__(self, num_classes: int, ds_rate: int = 4):
        self.values: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
        self.ds_rate = ds_rate

    def add(self, probs: torch.Tensor) -> None:
        """``probs``: (B, K) or (B, K, H, W) softmax outputs."""
        conf, pred = probs.max(1)
        if probs.dim() == 2:  # one confidence per image
            conf, pred = conf.cpu().numpy(), pred.cpu().numpy()
            for c in np.unique(pred):
                self.values[c].append(conf[pred == c])
            return
        for b in range(len(probs)):
            c_b, p_b = conf[b].flatten().cpu().numpy(), pred[b].flatten().cpu().numpy()
            for c in np.unique(p_b):
                self.values[c].append(c_b[p_b == c][:: self.ds_rate])

    def thresholds(self, portion: float) -> np.ndarray:
        """λ_c: the ``floor(n · portion)``-th largest confidence of class c (1.0 if that is 0)."""
        out = np.ones(len(self.values))
        for c, parts in enumerate(self.values):
            if not parts:
                continue
            conf = np.sort(np.concatenate(parts))[::-1]
            n = int(math.floor(len(conf) * portion))
            if n:
                out[c] = conf[n - 1]
        return out


def _per_class(thresholds: np.ndarray, probs: torch.Tensor) -> torch.Tensor:
    shape = [1, -1] + [1] * (probs.dim() - 2)
    return torch.as_tensor(thresholds, dtype=probs.dtype, device=probs.device).view(shape)


def hard_labels(probs: torch.Tensor, thresholds: np.ndarray) -> torch.Tensor:
    """CBST's pseudo-labels: ``argmax p/λ``, 255 where ``max p/λ < 1``."""
    weighted = probs / _per_class(thresholds, probs)
    best, label = weighted.max(1)
    label[best < 1] = IGNORE
    return label


def soft_labels(probs: torch.Tensor, thresholds: np.ndarray, alpha: float) -> torch.Tensor:
    """LRENT's soft pseudo-labels ``(p/λ)^(1/α)``, normalised, and all-zero where not selected."""
    lam = _per_class(thresholds, probs)
    soft = (probs / lam) ** (1.0 / alpha)
    soft = soft / soft.sum(1, keepdim=True)
    reg = (-soft * torch.log(probs + 1e-32) + alpha * soft * torch.log(soft + 1e-32)).sum(1)
    sel = (-soft * torch.log(lam + 1e-32)).sum(1)
    return soft * (reg < sel).unsqueeze(1).to(soft.dtype)


def labelled_fraction(labels: torch.Tensor) -> float:
    """The share of target samples (or pixels) that carry a pseudo-label."""
    kept = labels.sum(1) > 0 if labels.is_floating_point() else labels != IGNORE
    return float(kept.float().mean())


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Hard labels as soft ones, class dimension second; 255 becomes all-zero."""
    valid = labels != IGNORE
    out = F.one_hot(torch.where(valid, labels, 0).long(), num_classes).to(torch.float32)
    out = out * valid.unsqueeze(-1)
    return out.movedim(-1, 1)


def self_training_loss(logits: torch.Tensor, labels: torch.Tensor, is_target: torch.Tensor,
                       kld_weight: float = 0.0) -> torch.Tensor:
    """The official ``reg_loss_calc`` (hard labels, 255 ignored) or ``reg_loss_calc_expand``
    (soft labels): the cross-entropy summed over every labelled sample or pixel of the batch,
    source and target together, divided by their count; plus ``kld_weight`` × the mean of
    ``−(1/C) Σ_c log p_c`` over the target's labelled ones."""
    logp = F.log_softmax(logits.float(), 1)
    if labels.is_floating_point():
        valid = labels.sum(1) > 0
        ce = -(labels * logp).sum(1)
    else:
        valid = labels != IGNORE
        ce = -logp.gather(1, torch.where(valid, labels, 0).long().unsqueeze(1)).squeeze(1)
    loss = ce[valid].sum() / valid.sum().clamp(min=1)
    if kld_weight:
        target = valid & is_target.view(-1, *[1] * (valid.dim() - 1))
        loss = loss + kld_weight * (-logp.mean(1))[target].sum() / target.sum().clamp(min=1)
    return loss
