"""Drive one fine-tuning run with a frozen policy, straight on the trainer, and record what
happened at every decision.

The loop is the env's (:class:`asg_env.envs.env.ASGEnv` makes the same calls in the same order, a
test checks the two bit for bit), without the Gymnasium wrapper, so that it can checkpoint the
run between decisions and run under ``torchrun``: every rank computes the same action from
the same rank-averaged losses, and a check stops the run if they ever differ.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from gymnasium.utils.seeding import np_random
from tqdm.auto import tqdm

from agents.policies import Policy
from asg_env.envs.control import Control
from asg_env.training.trainer import Trainer, run_seeds

EVAL_KEYS = ("target_acc", "target_mean_class_acc", "target_miou", "target_pixel_acc", "target_kl",
             "teacher_agreement", "synthetic_acc", "synthetic_xe", "synthetic_miou", "imagenet_top1",
             "imagenet_teacher_top1")


def episode_seed(run_seed: int, episode: int) -> int:
    """The env seed of ``episode`` in the run seeded ``run_seed``. Spawned from
    ``numpy.random.SeedSequence(run_seed)``, so the episodes of runs with different seeds never
    share a seed (``run_seed + episode`` would: run 0's episode 1 is run 1's episode 0)."""
    return int(np.random.SeedSequence(run_seed, spawn_key=(episode,)).generate_state(1)[0])


class Checkpoints:
    """When to save a run: after the decision that ends each epoch (``every="epoch"``) or every
    ``every`` decisions, and whenever ``minutes`` have passed since the last save."""

    def __init__(self, save: Callable[[dict], None], every: int | str = "epoch", minutes: float = 10.0):
        self.save, self.every, self.seconds = save, every, minutes * 60
        self.last = time.monotonic()

    def due(self, trainer: Trainer, epoch_before: int) -> bool:
        if self.every == "epoch":
            due = trainer.sgd_step // trainer.steps_per_epoch > epoch_before
        else:
            due = trainer.t % int(self.every) == 0
        return due or time.monotonic() - self.last >= self.seconds

    def __call__(self, state: dict) -> None:
        self.save(state)
        self.last = time.monotonic()


def _same_on_every_rank(action: np.ndarray) -> None:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    mine = torch.as_tensor(action, dtype=torch.float64)
    low, high = mine.clone(), mine.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"the ranks chose different actions at one decision ({low.tolist()} … {high.tolist()})")


def fine_tune(trainer: Trainer, policy: Policy, seed: int, *, evaluate: bool = True, progress: bool = False,
              desc: str = "fine-tuning", on_row: Callable[[dict], None] | None = None,
              checkpoints: Checkpoints | None = None, resume: dict | None = None,
              control: Control | None = None) -> list[dict]:
    """One run. Row 0 is the state after reset (with the target metrics when ``evaluate``);
    row t holds decision t's action, reward and losses, and the target metrics when the
    trainer said an evaluation was due. ``on_row`` sees each row as it is made.

    ``checkpoints`` saves ``{trainer, policy, history…}`` between decisions; pass such a
    state as ``resume`` to continue that run: it ends exactly as the uninterrupted run would.
    """
    names = trainer.coordinate_names
    control = control or Control(names)
    if control.needs_coordinate_stats and not trainer.coordinate_stats:
        raise ValueError("a per-coordinate observation needs a trainer built with coordinate_stats=True")
    continuous = control.kind == "continuous"
    if resume is None:
        values = trainer.reset(*run_seeds(np_random(seed)[0]))
        policy.reset()
        control.reset()
        obs = control.observe(values, 0.0, trainer.lr_base)
        row = {"step": 0, "sgd_step": 0, **{k: values[k] for k in ("loss", "loss_xe", "loss_guidance")}}
        if evaluate:
            row.update(trainer.evaluate())
        history = [row]
        if on_row:
            on_row(row)
    else:
        trainer.reset(*run_seeds(np_random(seed)[0]))  # builds the SGD whose state is then loaded
        trainer.load_state_dict(resume["trainer"])
        policy.reset()
        policy.load_state_dict(resume["policy"])
        control.load_state_dict(resume.get("control", {"scale": [1.0] * len(names)}))
        values, obs, history = resume["values"], resume["obs"].numpy(), list(resume["history"])
    diverged = bool(history[-1].get("diverged"))
    with tqdm(total=trainer.T, initial=trainer.t, desc=desc, disable=not progress, leave=False) as bar:
        while trainer.t < trainer.T and not diverged:
            action = np.asarray(policy.act(obs), dtype=np.float64 if continuous else np.int64).reshape(-1)
            _same_on_every_rank(action)
            epoch_before = trainer.sgd_step // trainer.steps_per_epoch
            new = trainer.step(control.scales(action))
            diverged = not new["finite"]
            next_obs, reward, _ = control.outcome(obs, values, new, trainer.t, trainer.T, trainer.lr_base, 0.0)
            row = {"step": trainer.t, "sgd_step": trainer.sgd_step, "reward": None if diverged else reward,
                   **{k: new[k] for k in ("loss", "loss_xe", "loss_guidance")}, "diverged": diverged}
            row.update({f"action/{n}": float(a) if continuous else int(a) for n, a in zip(names, action)})
            if not diverged:
                values, obs = new, next_obs
                if evaluate and trainer.evaluation_due:
                    row.update(trainer.evaluate())
            history.append(row)
            if on_row:
                on_row(row)
            bar.update(1)
            if checkpoints is not None and not diverged and trainer.t < trainer.T and checkpoints.due(trainer, epoch_before):
                saved = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in values.items()}
                checkpoints({"trainer": trainer.state_dict(), "policy": policy.state_dict(), "values": saved,
                             "obs": torch.from_numpy(obs.copy()), "history": list(history),
                             "control": control.state_dict()})
    return history
