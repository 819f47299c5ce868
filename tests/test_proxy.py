import math

import numpy as np
import torch

from asg_env.training.proxy import kl_to_teacher, proxy_guidance_loss


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_loss_matches_hand_computation():
    task = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    targets = torch.tensor([0, 2])
    student_old = torch.tensor([[1.0, 0.0, 0.0, -1.0], [0.5, 0.5, 0.0, 0.0]])
    teacher = torch.tensor([[0.0, 1.0, 0.0, 0.0], [2.0, -1.0, 0.0, 1.0]])
    lam = 0.1

    p_task = _softmax(task.numpy())
    xe = -(math.log(p_task[0, 0]) + math.log(p_task[1, 2])) / 2
    p_t, p_s = _softmax(teacher.numpy()), _softmax(student_old.numpy())
    kl = float(np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1)))

    out = proxy_guidance_loss(task, targets, student_old, teacher, lam)
    assert math.isclose(out.xe.item(), xe, rel_tol=1e-5)
    assert math.isclose(out.guidance.item(), kl, rel_tol=1e-5)
    assert math.isclose(out.total.item(), xe + lam * kl, rel_tol=1e-5)


def test_kl_is_zero_for_identical_outputs_and_positive_otherwise():
    z = torch.randn(4, 10)
    assert kl_to_teacher(z, z).item() < 1e-6
    assert kl_to_teacher(z, torch.randn(4, 10)).item() > 0


def test_without_teacher_the_loss_is_plain_cross_entropy():
    task, y = torch.randn(3, 5), torch.tensor([0, 1, 4])
    out = proxy_guidance_loss(task, y, torch.randn(3, 7), None, lam=0.5)
    assert out.guidance.item() == 0.0
    assert torch.allclose(out.total, torch.nn.functional.cross_entropy(task, y))


def test_dense_patch_variant_averages_over_patches():
    """Eq. 5: with (B, N, K) patch logits the KL is the mean over images and patches."""
    s, t = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    per_patch = [kl_to_teacher(s[:, j], t[:, j]) for j in range(3)]
    assert torch.allclose(kl_to_teacher(s, t), torch.stack(per_patch).mean())
