"""The optimizer and learning-rate schedule of the official release (NVlabs/ASG).

Two SGD forms are offered, since they react differently to a change of learning rate:

* ``"official"`` (``utils/sgd.py``): the learning rate sits inside the momentum,
  ``g ← ∇L + wd·p;  v ← ρ·v + lr·g;  p ← p − v``. A new action only scales the new gradient;
  the velocity built under earlier actions decays at ρ, so a change of action is smoothed,
  and a coordinate set to level 0 coasts to a stop instead of halting.
* ``"torch"`` (``torch.optim.SGD``): ``v ← ρ·v + g;  p ← p − lr·v``. A new learning rate
  rescales the whole velocity at once.

With a constant learning rate the two take the same steps.
"""

from __future__ import annotations

import torch

SGD_FORMS = ("official", "torch")


class OfficialSGD(torch.optim.Optimizer):
    """SGD with momentum, the learning rate inside the velocity (the official ``utils/sgd.py``)."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            step = torch._foreach_mul(grads, group["lr"])
            states = [self.state[p] for p in params]
            if group["momentum"]:
                if "velocity" not in states[0]:
                    for state, s in zip(states, step):
                        state["velocity"] = s.clone()
                else:
                    velocity = [state["velocity"] for state in states]
                    torch._foreach_mul_(velocity, group["momentum"])
                    torch._foreach_add_(velocity, step)
                step = [state["velocity"] for state in states]
            torch._foreach_sub_(params, step)


def make_sgd(form: str, param_groups: list[dict], lr: float, momentum: float, weight_decay: float):
    """The SGD of ``form`` (see the module docstring) over ``param_groups``."""
    if form == "official":
        return OfficialSGD(param_groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def poly_factor(step: int, total_steps: int, warmup_steps: int = 100, power: float = 0.9, floor_at: float = 0.8) -> float:
    """The official ``lr_poly`` factor at SGD step ``step`` (0-based) of ``total_steps``.

    A quadratic warm-up from 0.01 over ``warmup_steps``, times a poly decay of ``power``
    that stops at ``floor_at`` of the run (so it never goes below ``0.2 ** 0.9 ≈ 0.235``)::

        min(0.01 + 0.99 (s / warmup)², 1) · (1 − min(s / S, floor_at)) ** power
    """
    warm = min(0.01 + 0.99 * (step / warmup_steps) ** 2, 1.0) if warmup_steps > 0 else 1.0
    return warm * (1.0 - min(step / max(total_steps, 1), floor_at)) ** power


WINDOWS = ("fixed", "growing")


def action_windows(kind: str, decisions: int | None, steps_per_action: int, sgd_steps: int | None,
                   epoch_steps: int) -> list[int]:
    """How many SGD steps each decision holds its action for.

    * ``"fixed"``: ``decisions`` windows of ``steps_per_action`` steps; or, when ``sgd_steps``
      is given, ``sgd_steps`` split as evenly as possible over the ``decisions`` (so a policy
      trained on T decisions makes T decisions over a longer run, and t/T keeps its meaning).
      ``decisions=None`` asks for one decision per SGD step.
    * ``"growing"`` (the official ``l2o_train.py``): within each epoch of ``epoch_steps``, the
      window is ``max(min_iter, s_epoch + s_before // 20)``, clipped at the epoch's end, where
      ``s_epoch`` counts the steps already taken in this epoch, ``s_before`` those of earlier
      epochs, and ``min_iter = steps_per_action``. Windows roughly double within an epoch, so
      the number of decisions follows from ``sgd_steps`` (default ``decisions ·
      steps_per_action``) instead of being set.
    """
    if decisions is None:
        if sgd_steps is None:
            raise ValueError("give the number of decisions or of SGD steps")
        decisions = sgd_steps if kind == "fixed" else 0
    if kind == "fixed":
        if sgd_steps is None:
            return [steps_per_action] * decisions
        if sgd_steps < decisions:
            raise ValueError(f"{sgd_steps} SGD steps cannot hold {decisions} decisions")
        base, extra = divmod(sgd_steps, decisions)
        return [base + 1] * extra + [base] * (decisions - extra)
    total = sgd_steps if sgd_steps is not None else decisions * steps_per_action
    windows, before = [], 0
    while before < total:
        epoch = min(epoch_steps, total - before)
        done = 0
        while done < epoch:
            w = min(max(steps_per_action, done + before // 20), epoch - done)
            windows.append(w)
            done += w
        before += done
    return windows
