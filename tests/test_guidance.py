"""Each guidance term against a hand computation on a tiny linear model, and in the env."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

import asg_env  # noqa: F401
from asg_env.training.backbones import Backbone
from asg_env.training.guidance import GUIDANCES, fisher_importance, make_guidance
from asg_env.training.proxy import StudentNet, make_teacher

D, H, K = 6, 4, 5  # input, feature and ImageNet-class sizes


def _tiny():
    """features = Linear(D, H) (θ_s), ImageNet head Linear(H, K) (θ_o); the gradients have closed forms."""
    torch.manual_seed(0)
    parts = Backbone(features=nn.Linear(D, H), imagenet_head=nn.Linear(H, K), name="tiny")
    teacher = make_teacher(parts)
    student = StudentNet(parts, num_classes=3)
    return student, teacher, torch.randn(8, D)


def _move(student, delta=0.05):
    with torch.no_grad():
        for p in student.features.parameters():
            p.add_(delta * torch.randn_like(p))


def test_kl_is_the_teacher_to_student_divergence_by_hand():
    student, teacher, x = _tiny()
    guidance = make_guidance("kl", student)
    assert guidance(student, student.features(x), teacher(x)).item() == pytest.approx(0.0, abs=1e-7)
    _move(student)
    f = student.features(x)
    p_t = teacher(x).softmax(-1).double().numpy()
    p_s = student.imagenet_head(f).softmax(-1).double().detach().numpy()
    by_hand = np.mean([sum(p_t[b, k] * np.log(p_t[b, k] / p_s[b, k]) for k in range(K)) for b in range(len(x))])
    assert guidance(student, f, teacher(x)).item() == pytest.approx(by_hand, rel=1e-4)


def test_feature_l2_is_the_mean_squared_feature_distance_by_hand():
    student, teacher, x = _tiny()
    guidance = make_guidance("feature_l2", student)
    assert guidance.teacher_output == "features"
    teacher_features = teacher[0](x)
    _move(student)
    f = student.features(x)
    by_hand = sum(float(f[b, h].detach() - teacher_features[b, h]) ** 2 for b in range(len(x)) for h in range(H)) / (len(x) * H)
    assert guidance(student, f, teacher_features).item() == pytest.approx(by_hand, rel=1e-5)


def test_l2sp_is_half_the_squared_distance_to_the_imagenet_weights():
    student, _, x = _tiny()
    guidance = make_guidance("l2sp", student)
    with torch.no_grad():
        student.features.weight.add_(0.1)  # every weight moves by 0.1, the bias by 0.3
        student.features.bias.add_(0.3)
        student.new_head.weight.add_(5.0)  # θ_n is not regularised
    by_hand = 0.5 * (D * H * 0.1**2 + H * 0.3**2)
    assert guidance(student, student.features(x), None).item() == pytest.approx(by_hand, rel=1e-5)


def test_si_importance_is_the_diagonal_fisher_of_the_imagenet_model_by_hand():
    """d log p_y / dW1 = W2ᵀ(e_y − p) xᵀ and d log p_y / db1 = W2ᵀ(e_y − p), y drawn from p."""
    student, _, x = _tiny()
    fisher = fisher_importance(student, x, seed=0)
    W2 = student.imagenet_head.weight.detach().double()
    generator = torch.Generator().manual_seed(0)
    fw, fb = torch.zeros(H, D, dtype=torch.double), torch.zeros(H, dtype=torch.double)
    for xi in x:
        logits = student.imagenet_head(student.features(xi[None])).detach()
        y = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        err = torch.nn.functional.one_hot(torch.tensor(y), K).double() - logits.softmax(-1)[0].double()
        g_b = W2.T @ err
        fw += torch.outer(g_b, xi.double()) ** 2 / len(x)
        fb += g_b**2 / len(x)
    assert torch.allclose(fisher[0].double(), fw, rtol=1e-4) and torch.allclose(fisher[1].double(), fb, rtol=1e-4)

    guidance = make_guidance("si", student, x)
    with torch.no_grad():
        student.features.weight.add_(0.1)
    expected = 0.5 * float((fw * 0.1**2).sum())
    assert guidance(student, student.features(x), None).item() == pytest.approx(expected, rel=1e-4)


def test_none_is_zero_and_needs_no_teacher():
    student, _, x = _tiny()
    guidance = make_guidance("none", student)
    _move(student)
    assert guidance.teacher_output is None and guidance(student, student.features(x), None).item() == 0.0


@pytest.mark.parametrize("name", [g for g in GUIDANCES if g != "kl"])
def test_env_reports_the_chosen_term_as_the_second_loss(name, tiny_env_kwargs):
    env = gym.make("SynDigits-v0", evaluate_target=False, guidance=name, lam=0.5, reward_batch="heldout", **tiny_env_kwargs)
    u = env.unwrapped
    obs, info = env.reset(seed=0)
    assert info["loss_guidance"] == 0.0 and obs[1] == 0.0  # every term is 0 at the ImageNet weights
    reference = [p.detach().clone() for p in u.trainer.student.features.parameters()]
    obs, _, _, _, info = env.step(np.full(u.action_space.shape, 10))
    if name == "l2sp":
        by_hand = 0.5 * sum(float(((p.detach() - p0) ** 2).sum()) for p, p0 in zip(u.trainer.student.features.parameters(), reference))
        assert info["loss_guidance"] == pytest.approx(by_hand, rel=1e-4) and by_hand > 0
    if name == "none":
        assert info["loss_guidance"] == 0.0 and u.trainer._teacher_cache is None and u.trainer._teacher_heldout is None
    assert obs[1] == pytest.approx(info["loss_guidance"], rel=1e-5, abs=1e-12)
    assert info["loss"] == pytest.approx(info["loss_xe"] + 0.5 * info["loss_guidance"], rel=1e-5)


def test_unknown_guidance_is_one_clear_error(tiny_env_kwargs):
    with pytest.raises(asg_env.UserInputError, match="guidance must be one of"):
        gym.make("SynDigits-v0", guidance="ewc", **tiny_env_kwargs)
