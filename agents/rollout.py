"""Drive one fine-tuning run with a frozen policy and record what happened at every step."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

from agents.policies import Policy

EVAL_KEYS = ("target_acc", "target_mean_class_acc", "target_kl", "teacher_agreement", "synthetic_acc",
             "imagenet_top1", "imagenet_teacher_top1")


def episode_seed(run_seed: int, episode: int) -> int:
    """The env seed of ``episode`` in the run seeded ``run_seed``. Spawned from
    ``numpy.random.SeedSequence(run_seed)``, so the episodes of runs with different seeds never
    share a seed (``run_seed + episode`` would: run 0's episode 1 is run 1's episode 0)."""
    return int(np.random.SeedSequence(run_seed, spawn_key=(episode,)).generate_state(1)[0])


def fine_tune(env: gym.Env, policy: Policy, seed: int, progress: bool = False, desc: str = "fine-tuning") -> list[dict]:
    """One episode. Row 0 is the state after reset (target metrics if evaluation is on);
    row t holds step t's action, reward, losses, and target metrics when they were evaluated."""
    obs, info = env.reset(seed=seed)
    policy.reset()
    u = env.unwrapped
    row = {"step": 0, "sgd_step": 0, "loss": info["loss"], "loss_xe": info["loss_xe"], "loss_guidance": info["loss_guidance"]}
    if u.evaluate_target_enabled:
        row.update(u.evaluate_target())
    history = [row]
    done = False
    with tqdm(total=u.T, desc=desc, disable=not progress, leave=False) as bar:
        while not done:
            action = np.asarray(policy.act(obs))
            obs, reward, terminated, truncated, info = env.step(action)
            done = terminated or truncated
            row = {"step": info["step"], "sgd_step": info["sgd_step"], "reward": reward, "loss": info["loss"], "loss_xe": info["loss_xe"],
                   "loss_guidance": info["loss_guidance"], "diverged": info["diverged"]}
            row.update({f"action/{n}": int(a) for n, a in zip(u.coordinate_names, action)})
            row.update({k: info[k] for k in EVAL_KEYS if k in info})
            history.append(row)
            bar.update(1)
    return history
