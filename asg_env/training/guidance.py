"""What keeps the student close to its ImageNet self: proxy guidance and the regularisers the
paper compares it with (Table 2). The env adds ``λ ·`` the chosen term to the cross-entropy and
reports the unweighted term as the observation's second loss, so L2O research can swap it.

* ``"kl"``: proxy guidance, ``KL(teacher ‖ θ_o)`` on the training images (Eq. 4; Eq. 5 for
  patch logits).
* ``"l2sp"``: L2-SP (Li et al., 2018), ``½ Σ (θ_s − θ_s⁰)²`` over the feature extractor.
* ``"feature_l2"``: ROAD-style feature distance (Chen et al., 2018), the mean squared
  difference of the student's and the teacher's pooled features on the training images.
* ``"si"``: an importance-weighted L2-SP, ``½ Σ Ω (θ_s − θ_s⁰)²``. Synaptic intelligence
  accumulates Ω along the ImageNet training path, which is not available; Ω is instead the
  diagonal Fisher of the ImageNet model on the held-out synthetic batch, with labels sampled
  from its own predictions (as EWC estimates it). Unscaled, ``½ Σ F Δθ²`` is the second-order
  approximation of KL(ImageNet model ‖ moved model) in nats, so λ has the scale of PG's λ.
* ``"none"``: no term (the teacher is never run).

Every term is 0 at the ImageNet weights, so ``L_guidance = 0`` at reset.
"""

from __future__ import annotations

import torch
from torch import nn

from asg_env.training.proxy import StudentNet, kl_to_teacher

GUIDANCES = ("kl", "l2sp", "feature_l2", "si", "none")


class Guidance:
    """A term ``g(student, features, teacher_output)``. ``teacher_output`` names what the frozen
    teacher must provide per image: ``"logits"``, ``"features"`` or ``None``."""

    name = "none"
    teacher_output: str | None = None

    def __call__(self, student: StudentNet, features: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
        return features.new_zeros((), dtype=torch.float32)


class KLGuidance(Guidance):
    name, teacher_output = "kl", "logits"

    def __call__(self, student, features, teacher):
        return kl_to_teacher(student.imagenet_head(features), teacher)


class FeatureL2Guidance(Guidance):
    name, teacher_output = "feature_l2", "features"

    def __call__(self, student, features, teacher):
        return (features.float() - teacher.float()).pow(2).mean()


class WeightL2Guidance(Guidance):
    """``½ Σ Ω (θ − θ⁰)²`` over the feature extractor; Ω = 1 is L2-SP."""

    def __init__(self, name: str, params: list[nn.Parameter], importance: list[torch.Tensor] | None = None):
        self.name = name
        self.params = params
        self.reference = [p.detach().clone() for p in params]
        self.importance = importance

    def __call__(self, student, features, teacher):
        terms = []
        for i, (p, p0) in enumerate(zip(self.params, self.reference)):
            d = (p.float() - p0.float()).pow(2)
            terms.append((d if self.importance is None else d * self.importance[i]).sum())
        return 0.5 * torch.stack(terms).sum()


def fisher_importance(student: StudentNet, images: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    """Diagonal Fisher of the ImageNet model ``imagenet_head ∘ features`` on ``images``, one
    image at a time, with each label drawn from the model's own softmax."""
    params = [p for p in student.features.parameters() if p.requires_grad]
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    generator = torch.Generator().manual_seed(seed)
    for x in images:
        logits = student.imagenet_head(student.features(x[None])).float()
        y = torch.multinomial(logits.detach().softmax(-1).cpu(), 1, generator=generator).to(logits.device)
        log_p = logits.log_softmax(-1).gather(1, y).sum()
        grads = torch.autograd.grad(log_p, params)
        for f, g in zip(fisher, grads):
            f += g.float().pow(2) / len(images)
    return fisher


def make_guidance(name: str, student: StudentNet, fisher_images: torch.Tensor | None = None) -> Guidance:
    """Build guidance ``name`` at the student's current (ImageNet) weights."""
    if name == "kl":
        return KLGuidance()
    if name == "feature_l2":
        return FeatureL2Guidance()
    params = [p for p in student.features.parameters() if p.requires_grad]
    if name == "l2sp":
        return WeightL2Guidance("l2sp", params)
    if name == "si":
        return WeightL2Guidance("si", params, fisher_importance(student, fisher_images))
    return Guidance()
