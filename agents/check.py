"""Has a policy learned? Score runs of a policy, its untrained initialisation and the random
policy on the same instances and run seeds, by the final synthetic cross-entropy (the env's
``synthetic_score``; the real target is never read), and compare them pairwise."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from agents.policies import RandomPolicy
from agents.reinforce import ReinforceConfig, build_network, policy_from_state


def initial_state(state: dict, seed: int) -> dict:
    """A REINFORCE or ES policy file's untrained initialisation: the network its seed built (as
    both agents build it), with a fresh observation normaliser."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_network(ReinforceConfig(**state["config"]), state["obs_dim"], state["n_coordinates"],
                            state["n_levels"])
    return {**state, "state_dict": net.state_dict()}


def score_run(env: gym.Env, policy, seed: int, options: dict | None = None) -> dict:
    """One run driven by ``policy``: its capped final synthetic score and its initial one."""
    obs, info = env.reset(seed=seed, options=options)
    policy.reset()
    initial, done = info["initial_score"], False
    while not done:
        obs, _, terminated, truncated, info = env.step(policy.act(obs))
        done = terminated or truncated
    return {"score": float(info["score"]), "initial": float(initial), "diverged": bool(info.get("diverged")),
            "sgd_steps": int(info.get("sgd_step", 0))}


def bootstrap_ci(diff: np.ndarray, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap CI of the mean of ``diff``."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def held_out_scores(env: gym.Env, state: dict, train_seed: int, instances: list[dict], runs: int) -> dict:
    """``runs`` runs each of the trained policy (greedy), its initialisation and the random
    policy: run k on instance k mod len(instances) with a run seed no training episode used."""
    trained, init = policy_from_state(state), policy_from_state(initial_state(state, train_seed))
    policies = {"trained": lambda k: trained, "init": lambda k: init,
                "random": lambda k: RandomPolicy(state["n_coordinates"], seed=k)}
    seeds = np.random.SeedSequence(train_seed, spawn_key=(2**31,)).generate_state(runs)  # apart from episode_seed's keys
    options = [{"instance": instances[k % len(instances)]} if instances else None for k in range(runs)]
    return {name: np.array([score_run(env, make(k), int(seeds[k]), options[k])["score"] for k in range(runs)])
            for name, make in policies.items()}


def check_table(scores: dict) -> list[str]:
    """The check's table (mean score, and trained − each other policy with its 95 % CI) and a verdict."""
    trained = scores["trained"]
    lines = [f"held-out check: {len(trained)} runs per policy, train-split instances, run seeds not trained on "
             "(final synthetic cross-entropy, lower is better)",
             f"  {'policy':<8} {'score':>7}   trained − it [95 % CI]",
             f"  {'trained':<8} {trained.mean():7.4f}"]
    beaten = []
    for name, values in scores.items():
        if name != "trained":
            low, high = bootstrap_ci(trained - values)
            lines.append(f"  {name:<8} {values.mean():7.4f}   {np.mean(trained - values):+.4f} [{low:+.4f}, {high:+.4f}]")
            beaten.append(high < 0)
    if all(beaten):
        lines.append("the policy beats random and its own initialisation on these runs (95 % CI below 0).")
    else:
        lines.append("not yet distinguishable from random or its initialisation (the difference is within noise "
                     "on these runs): train longer with --episodes, or run the learning gate "
                     "(python -m benchmarks.learning_gate) for the full test.")
    return lines
