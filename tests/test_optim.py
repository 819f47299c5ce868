import pytest
import torch

from asg_env.training.optim import OfficialSGD, make_sgd


def _run(form: str, lrs: list[float], weight_decay: float = 0.0) -> list[float]:
    """Parameter values after each step of a 1-d problem with gradient 1 (plus weight decay)."""
    p = torch.nn.Parameter(torch.ones(1))
    opt = make_sgd(form, [{"params": [p]}], lr=lrs[0], momentum=0.9, weight_decay=weight_decay)
    values = []
    for lr in lrs:
        opt.param_groups[0]["lr"] = lr
        p.grad = torch.ones(1)
        opt.step()
        values.append(p.item())
    return values


def test_official_form_puts_the_learning_rate_inside_the_momentum():
    # v1 = 0.1·1 → p = 0.9; then lr 0: v2 = 0.9·0.1 + 0 → p = 0.81 (the velocity coasts on).
    assert _run("official", [0.1, 0.0]) == pytest.approx([0.9, 0.81])
    # torch.optim.SGD rescales the whole velocity by the new rate: lr 0 stops at once.
    assert _run("torch", [0.1, 0.0]) == pytest.approx([0.9, 0.9])


def test_official_weight_decay_enters_the_gradient_before_the_rate():
    # g = 1 + 0.5·1 = 1.5 → v = 0.1·1.5 → p = 0.85
    assert _run("official", [0.1], weight_decay=0.5) == pytest.approx([0.85])


def test_both_forms_agree_under_a_constant_rate():
    lrs = [0.05] * 6
    assert _run("official", lrs, weight_decay=5e-4) == pytest.approx(_run("torch", lrs, weight_decay=5e-4), rel=1e-6)
    assert isinstance(make_sgd("official", [{"params": [torch.nn.Parameter(torch.ones(1))]}], 0.1, 0.9, 0.0), OfficialSGD)
