"""The interface every learning-rate policy shares, and the non-learned baselines.

A policy sees one observation at a time and returns one MultiDiscrete action (levels
0-10 per coordinate, scale = level / 10). ``reset()`` starts a new episode, which is where
recurrent policies clear their hidden state. ``state_dict()`` holds what a run needs to
continue the policy mid-episode (hidden state, sampling RNG), for checkpoints.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from asg_env import N_LEVELS, UserInputError

TOP = N_LEVELS - 1  # level 10: scale 1.0


class Policy(Protocol):
    def reset(self) -> None: ...

    def act(self, obs: np.ndarray) -> np.ndarray: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class RandomPolicy:
    """Uniform over the 11 levels for every coordinate, every step (the paper's random policy)."""

    def __init__(self, n_coordinates: int, seed: int | None = None):
        self.n = n_coordinates
        self.rng = np.random.default_rng(seed)

    def reset(self) -> None:
        pass

    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.rng.integers(0, N_LEVELS, size=self.n)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


class ConstantPolicy:
    """The same levels at every step: the hand-tuned layer-wise learning rates."""

    def __init__(self, levels):
        self.levels = np.asarray(levels, dtype=np.int64)
        if self.levels.ndim != 1 or self.levels.min() < 0 or self.levels.max() > TOP:
            raise UserInputError(f"constant levels must be integers 0-{TOP}, got {list(levels)}")

    def reset(self) -> None:
        pass

    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.levels.copy()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def hand_tuned_levels(name: str, n_coordinates: int) -> list[int]:
    """Named settings from the paper's Figure 1/5 (the classifier is the last coordinate)."""
    backbone = n_coordinates - 1
    settings = {
        "large-everywhere": [TOP] * n_coordinates,
        "small-backbone-large-classifier": [1] * backbone + [TOP],
        "classifier-only": [0] * backbone + [TOP],
    }
    settings["hand-tuned"] = settings["small-backbone-large-classifier"]  # with BASELINE_ENV_KWARGS' schedule
    if name not in settings:
        raise UserInputError(f"unknown setting {name!r}; choose one of {', '.join(settings)}")
    return settings[name]


BASELINES = ("random", "hand-tuned", "large-everywhere", "small-backbone-large-classifier", "classifier-only")
# "hand-tuned" is the official train.py: backbone 0.1 × η_base, classifier 1.0 × η_base, under its
# per-step schedule (quadratic warm-up, poly decay 0.9). The env applies that schedule, so the
# baseline carries it as env settings; "small-backbone-large-classifier" is the constant version.
BASELINE_ENV_KWARGS: dict[str, dict] = {"hand-tuned": {"lr_schedule": "poly"}}


def is_baseline(spec: str) -> bool:
    """Whether ``spec`` names a baseline rather than a policy file."""
    return spec in BASELINES or spec.startswith("constant:")


def baseline_env_kwargs(spec: str) -> dict:
    """The env settings a baseline needs besides its actions (none for most)."""
    return dict(BASELINE_ENV_KWARGS.get(spec, {}))


def make_baseline(spec: str, n_coordinates: int, seed: int | None = None) -> Policy:
    """``random``, a named hand-tuned setting, or ``constant:L1,L2,…`` (one level per coordinate)."""
    if spec == "random":
        return RandomPolicy(n_coordinates, seed)
    if spec.startswith("constant:"):
        try:
            levels = [int(v) for v in spec.split(":", 1)[1].split(",")]
        except ValueError:
            raise UserInputError(f"cannot parse {spec!r}; write constant:L1,L2,… with levels 0-{TOP}")
        if len(levels) != n_coordinates:
            raise UserInputError(f"{spec!r} gives {len(levels)} levels; this env has {n_coordinates} coordinates")
        return ConstantPolicy(levels)
    return ConstantPolicy(hand_tuned_levels(spec, n_coordinates))
