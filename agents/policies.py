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


def layer_decay_scales(head: float, decay: float, n_coordinates: int) -> np.ndarray:
    """Layer-wise learning-rate decay as fine-tuning practice uses it: the classifier (the last
    coordinate) at ``head``, each coordinate below at ``decay`` times the one above it."""
    return head * decay ** np.arange(n_coordinates - 1, -1, -1, dtype=float)


def to_levels(scales: np.ndarray) -> np.ndarray:
    """The nearest of the 11 levels: a schedule lives in the policies' own action space."""
    return np.clip(np.rint(np.asarray(scales) * TOP), 0, TOP).astype(np.int64)


class OpenLoopPolicy:
    """A fixed sequence of actions, one row per decision, that never reads the observation:
    tuned schedules, and the replay of a learned policy's mean actions. A run longer than the
    sequence keeps its last row."""

    def __init__(self, levels):
        self.levels = np.asarray(levels, dtype=np.int64)
        if self.levels.ndim != 2 or self.levels.min() < 0 or self.levels.max() > TOP:
            raise UserInputError(f"an action sequence is decisions × coordinates of levels 0-{TOP}")
        self.t = 0

    def reset(self) -> None:
        self.t = 0

    def act(self, obs: np.ndarray) -> np.ndarray:
        row = self.levels[min(self.t, len(self.levels) - 1)].copy()
        self.t += 1
        return row

    def state_dict(self) -> dict:
        return {"t": self.t}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])


def warmup_cosine(decisions: int, warmup: float) -> np.ndarray:
    """The factor of each decision (at its midpoint): linear warm-up over the first ``warmup``
    fraction of the run, then cosine decay to 0 at its end."""
    x = (np.arange(decisions) + 0.5) / decisions
    if warmup <= 0:
        return 0.5 * (1 + np.cos(np.pi * x))
    return np.where(x < warmup, x / warmup, 0.5 * (1 + np.cos(np.pi * (x - warmup) / max(1 - warmup, 1e-9))))


def _numbers(spec: str, count: int, form: str) -> list[float]:
    try:
        values = [float(v) for v in spec.split(":", 1)[1].split(",")]
    except ValueError:
        values = []
    if len(values) != count or not all(np.isfinite(values)):
        raise UserInputError(f"cannot parse {spec!r}; write {form}")
    return values


def schedule_levels(spec: str, n_coordinates: int, decisions: int) -> np.ndarray:
    """The action sequence of a parametrised schedule (``decisions`` × ``n_coordinates``):

    * ``llrd:HEAD,DECAY``: constant layer-wise decay (:func:`layer_decay_scales`);
    * ``cosine:PEAK,WARMUP,DECAY``: the same layer-wise decay from a peak ``PEAK``, under a
      warm-up over the first ``WARMUP`` fraction of the run and a cosine decay (:func:`warmup_cosine`).
    """
    if spec.startswith("llrd:"):
        head, decay = _numbers(spec, 2, "llrd:HEAD,DECAY with HEAD in [0, 1] and DECAY in (0, 1]")
        if not (0 <= head <= 1 and 0 < decay <= 1):
            raise UserInputError(f"{spec!r}: HEAD must lie in [0, 1] and DECAY in (0, 1]")
        return np.tile(to_levels(layer_decay_scales(head, decay, n_coordinates)), (decisions, 1))
    peak, warmup, decay = _numbers(spec, 3, "cosine:PEAK,WARMUP,DECAY with PEAK in [0, 1], WARMUP in [0, 1), DECAY in (0, 1]")
    if not (0 <= peak <= 1 and 0 <= warmup < 1 and 0 < decay <= 1):
        raise UserInputError(f"{spec!r}: PEAK must lie in [0, 1], WARMUP in [0, 1) and DECAY in (0, 1]")
    return to_levels(warmup_cosine(decisions, warmup)[:, None] * layer_decay_scales(peak, decay, n_coordinates))


SCHEDULES = ("llrd:", "cosine:")
BASELINES = ("random", "hand-tuned", "large-everywhere", "small-backbone-large-classifier", "classifier-only")
# "hand-tuned" is the official train.py: backbone 0.1 × η_base, classifier 1.0 × η_base, under its
# per-step schedule (quadratic warm-up, poly decay 0.9). The env applies that schedule, so the
# baseline carries it as env settings; "small-backbone-large-classifier" is the constant version.
BASELINE_ENV_KWARGS: dict[str, dict] = {"hand-tuned": {"lr_schedule": "poly"}}


def is_baseline(spec: str) -> bool:
    """Whether ``spec`` names a baseline rather than a policy file."""
    return spec in BASELINES or spec.startswith(("constant:", *SCHEDULES))


def baseline_env_kwargs(spec: str) -> dict:
    """The env settings a baseline needs besides its actions (none for most)."""
    return dict(BASELINE_ENV_KWARGS.get(spec, {}))


def make_baseline(spec: str, n_coordinates: int, seed: int | None = None, decisions: int = 1) -> Policy:
    """``random``, a named hand-tuned setting, ``constant:L1,L2,…`` (one level per coordinate),
    or a schedule over ``decisions`` decisions (``llrd:…``, ``cosine:…``, see :func:`schedule_levels`)."""
    if spec == "random":
        return RandomPolicy(n_coordinates, seed)
    if spec.startswith(SCHEDULES):
        return OpenLoopPolicy(schedule_levels(spec, n_coordinates, decisions))
    if spec.startswith("constant:"):
        try:
            levels = [int(v) for v in spec.split(":", 1)[1].split(",")]
        except ValueError:
            raise UserInputError(f"cannot parse {spec!r}; write constant:L1,L2,… with levels 0-{TOP}")
        if len(levels) != n_coordinates:
            raise UserInputError(f"{spec!r} gives {len(levels)} levels; this env has {n_coordinates} coordinates")
        return ConstantPolicy(levels)
    return ConstantPolicy(hand_tuned_levels(spec, n_coordinates))
