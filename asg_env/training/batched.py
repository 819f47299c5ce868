"""N fine-tuning runs of one configuration as one batched model, on one device.

With BatchNorm in eval mode (the official protocol) the student is a pure function of its
parameters, so N runs can share one module: each trainable parameter is stacked along a new
leading run dimension, and the objective is ``vmap(functional_call(objective))`` over it
(PyTorch's model-ensembling recipe; google/learned_optimization trains on vmapped inner
problems the same way). The frozen ImageNet head and the BatchNorm statistics are not stacked:
every run reads the same ones. SGD is applied functionally, with one learning rate per run and
coordinate, in either of :mod:`asg_env.training.optim`'s forms; a velocity starting at zero gives the
same first step as the optimizers' lazily created one.

``batching="loop"`` computes the same objective run by run instead, each run on leaf views of
its slice of the stacked weights, laid out per run as the single model is (channels-last):
under vmap, runs with different weights become grouped convolutions, which PyTorch's CPU
kernels run several times slower than the ungrouped ones (README, *Benchmarks*). Everything
else (the stacked state, the SGD, the resets) is shared by both.

Runs need not be in step: a run that is not ``moving`` in an SGD step (its window is over, it
is waiting for a reset, or it diverged) keeps its weights and velocity exactly, although the
batched forward pass still computes it. :class:`~asg_env.training.trainer.BatchedTrainer`
holds one of these; the data order, the teacher and the decisions stay in the trainer.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, vmap

from asg_env.training.coordinates import Coordinate


def stacked_zeros(t: torch.Tensor, n: int, per_run_layout: bool) -> torch.Tensor:
    """Zeros of shape ``(n, *t.shape)``: contiguous, or (``per_run_layout``) each of the ``n``
    slices laid out as ``t`` is, so that a channels-last weight or batch stays channels-last in
    every run (oneDNN's CPU kernels are much slower on the other layout)."""
    dense = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
    if not (per_run_layout and dense):
        return t.new_zeros((n, *t.shape))
    return t.new_empty_strided((n, *t.shape), (t.numel(), *t.stride())).zero_()


class StackedRuns:
    """The trainable weights and SGD velocities of ``num_envs`` runs, stacked, and the batched
    objective over them.

    Args:
        objective: the single-run objective module (``[L, L_XE, guidance]`` on one batch); its
            own parameters are the template and are not trained.
        coordinates: the optimization coordinates, whose parameters (those of ``objective``)
            are the ones stacked.
        sgd, momentum, weight_decay: as :func:`asg_env.training.optim.make_sgd`.
    """

    def __init__(self, objective: nn.Module, coordinates: list[Coordinate], num_envs: int, sgd: str,
                 momentum: float, weight_decay: float, batching: str = "vmap"):
        if batching not in ("vmap", "loop"):
            raise ValueError(f"batching must be vmap or loop, not {batching!r}")
        self.num_envs, self.sgd, self.momentum, self.weight_decay = num_envs, sgd, momentum, weight_decay
        self.batching = batching
        name_of = {id(p): n for n, p in objective.named_parameters()}
        self.groups = [[name_of[id(p)] for p in c.params] for c in coordinates]
        trained = {n for group in self.groups for n in group}
        self.shared = {n: p.detach() for n, p in objective.named_parameters() if n not in trained}
        self.shared.update(objective.named_buffers())
        self.params = {n: self.zeros_like_runs(p.detach()).copy_(p.detach()).requires_grad_()
                       for n, p in objective.named_parameters() if n in trained}
        self.velocity = {n: torch.zeros_like(p) for n, p in self.params.items()}
        # loop: each run's weights as leaves of their own, views of the stacked storage
        self._views = [{n: p[r].detach().requires_grad_() for n, p in self.params.items()}
                       for r in range(num_envs)] if batching == "loop" else []

        def one_run(params, x, y, teacher):
            return functional_call(objective, {**params, **self.shared}, (x, y, teacher))

        self._one_run = one_run

        # one batch per run (training), or the same batch for every run (the held-out batch)
        self._per_run = vmap(one_run, in_dims=(0, 0, 0, 0))
        self._per_run_no_teacher = vmap(lambda p, x, y: one_run(p, x, y, None), in_dims=(0, 0, 0))
        self._same_batch = vmap(one_run, in_dims=(0, None, None, None))

    def zeros_like_runs(self, t: torch.Tensor) -> torch.Tensor:
        """Zeros for every run's copy of ``t``, (N, *t.shape), in the layout this batching wants."""
        return stacked_zeros(t, self.num_envs, per_run_layout=self.batching == "loop")

    def losses(self, x: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
        """``[L, L_XE, guidance]`` of every run on its own batch: ``x`` is (N, B, …); (N, 3)."""
        if self.batching == "loop":
            return torch.stack([self._one_run(self._views[r], x[r], y[r], None if teacher is None else teacher[r])
                                for r in range(self.num_envs)])
        if teacher is None:
            return self._per_run_no_teacher(self.params, x, y)
        return self._per_run(self.params, x, y, teacher)

    def losses_on(self, x: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
        """Every run's losses on one shared batch (N, 3), without a graph."""
        with torch.no_grad():
            if self.batching == "loop":
                return torch.stack([self._one_run(v, x, y, teacher) for v in self._views])
            return self._same_batch(self.params, x, y, teacher)

    def backward(self, losses: torch.Tensor, moving: torch.Tensor) -> None:
        """Gradients of the moving runs' total losses (a run's gradient is its own loss's)."""
        for p in self.params.values():
            p.grad = None
        for v in self._views:
            for p in v.values():
                p.grad = None
        torch.where(moving, losses[:, 0], torch.zeros_like(losses[:, 0])).sum().backward()
        if self.batching == "loop":
            for n, p in self.params.items():
                grads = [v[n].grad for v in self._views]
                if any(g is not None for g in grads):
                    p.grad = torch.zeros_like(p)
                    for r, g in enumerate(grads):
                        if g is not None:
                            p.grad[r].copy_(g)
                    for v in self._views:
                        v[n].grad = None

    @torch.no_grad()
    def sgd_step(self, lrs: torch.Tensor, moving: torch.Tensor | None) -> None:
        """One SGD step of the moving runs (``moving``: N bools; None: every run, in place);
        ``lrs`` is (N, C), a learning rate per run and coordinate."""
        for c, names in enumerate(self.groups):
            for n in names:
                p, v = self.params[n], self.velocity[n]
                if p.grad is None:
                    continue
                lr = lrs[:, c].view((self.num_envs,) + (1,) * (p.dim() - 1))
                g = p.grad.add_(p, alpha=self.weight_decay) if self.weight_decay else p.grad
                if moving is None:
                    if self.sgd == "official":  # v ← ρv + lr·g;  p ← p − v
                        p.sub_(v.mul_(self.momentum).addcmul_(lr, g))
                    else:  # v ← ρv + g;  p ← p − lr·v
                        p.addcmul_(lr, v.mul_(self.momentum).add_(g), value=-1)
                    continue
                # a run that is not moving keeps its weights and velocity exactly, even with a
                # non-finite gradient (a diverged run)
                keep = ~moving.view(lr.shape)
                if self.sgd == "official":
                    new_v = self.momentum * v + lr * g
                    new_p = p - new_v
                else:
                    new_v = self.momentum * v + g
                    new_p = p - lr * new_v
                v.copy_(torch.where(keep, v, new_v))
                p.copy_(torch.where(keep, p, new_p))

    @torch.no_grad()
    def load_run(self, run: int, weights: dict[str, torch.Tensor]) -> None:
        """Start run ``run`` afresh from ``weights`` (every stacked name), with zero velocity."""
        for n, p in self.params.items():
            p[run].copy_(weights[n])
            self.velocity[n][run].zero_()

    def run_weights(self, run: int) -> dict[str, torch.Tensor]:
        """Run ``run``'s trainable weights, by the objective's parameter names."""
        return {n: p[run].detach() for n, p in self.params.items()}

    def coordinate_tensors(self, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per coordinate, every run's values flattened into one row: C tensors of (N, size)."""
        return [torch.cat([tensors[n].reshape(self.num_envs, -1) for n in names], 1) for names in self.groups]
