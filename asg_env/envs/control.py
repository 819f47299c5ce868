"""What a policy does, sees and is rewarded for: the layer between the trainer and the agent.

The paper's choices are the defaults, and the benchmarks' reference. The others are options
for L2O research (DACBench's continuous and log-scale actions and pluggable state and reward,
the per-tensor features of learned optimizers, Xu et al. 2019's multiplicative actions):

* ``action``: what one decision sets for each coordinate, as a scale of η_base:

  - ``"levels"`` (the paper's): 11 levels 0, 0.1, …, 1.0;
  - ``"log_levels"``: ``action_levels`` levels, log-spaced from ``action_min`` to
    ``action_max`` (above η_base too);
  - ``"continuous"``: a Box in [−1, 1] per coordinate (SB3's advice for Box actions), mapped
    linearly onto the log10 scales from ``action_min`` to ``action_max``;
  - ``"relative"``: multiply each coordinate's current scale by one of :data:`RELATIVE_FACTORS`
    (kept within [``action_min``, ``action_max``]; every run starts at scale 1).

* ``observation``: ``"paper"`` (``L_XE, L_guidance, t/T, mean(θ_n), std(θ_n)``, then each
  coordinate's current scale) or ``"per_coordinate"``, which adds four features per coordinate:
  its gradient norm, its update-to-weight ratio over the window, its relative distance from the
  run's start and its learning rate, each as ``clip((log10 x + 10) / 12, 0, 1)`` so that 1e-10…1e2
  spans [0, 1]. The trainer measures them in the decision's one host–device transfer.

* ``reward``: ``"loss_decrease"`` (the paper's ``L_{t-1} − L_t``), ``"log_loss_decrease"``
  (``log L_{t-1} − log L_t``, the same for any loss scale) or ``"final"`` (sparse: ``−L_T`` at
  the last decision, 0 before).

In ``"levels"`` mode a scale is shown as level/10, as the paper's observation has it; in the
other modes as its position on the log range, (log10 s − log10 min) / (log10 max − log10 min).
"""

from __future__ import annotations

import math

import numpy as np
from gymnasium import spaces

ACTIONS = ("levels", "log_levels", "continuous", "relative")
OBSERVATIONS = ("paper", "per_coordinate")
REWARDS = ("loss_decrease", "log_loss_decrease", "final")
RELATIVE_FACTORS = (0.5, 2 ** -0.5, 1.0, 2 ** 0.5, 2.0)
N_LEVELS = 11  # the paper's learning-rate scales 0, 0.1, …, 1.0
BASE_OBS_NAMES = ["loss_xe", "loss_guidance", "progress", "head_weight_mean", "head_weight_std"]
COORDINATE_FEATURES = ("grad_norm", "update_ratio", "distance", "lr")
_LOSS_MAX, _STAT_MAX = 1e4, 1e3  # finite observation bounds; values are clipped into them


def log_feature(x) -> np.ndarray:
    """``clip((log10 x + 10) / 12, 0, 1)``: 1e-10 → 0, 1e2 → 1 (0 for x = 0)."""
    x = np.maximum(np.asarray(x, dtype=float), 1e-30)
    return np.clip((np.log10(x) + 10.0) / 12.0, 0.0, 1.0)


class Control:
    """The action space, the observation and the reward of one env configuration, shared by the
    env and by ``agents.rollout.fine_tune`` (which drives the trainer without the env)."""

    def __init__(self, coordinate_names: list[str], action: str = "levels", action_levels: int = 11,
                 action_min: float = 0.01, action_max: float = 10.0, observation: str = "paper",
                 reward: str = "loss_decrease"):
        self.names, self.kind, self.observation_kind, self.reward_kind = list(coordinate_names), action, observation, reward
        C = len(self.names)
        self.low, self.high = math.log10(action_min), math.log10(action_max)
        if action == "levels":
            self.action_space = spaces.MultiDiscrete([N_LEVELS] * C)
        elif action == "log_levels":
            self.levels = np.geomspace(action_min, action_max, action_levels)
            self.action_space = spaces.MultiDiscrete([action_levels] * C)
        elif action == "continuous":
            self.action_space = spaces.Box(-1.0, 1.0, shape=(C,), dtype=np.float32)
        else:
            self.action_space = spaces.MultiDiscrete([len(RELATIVE_FACTORS)] * C)
        self.obs_names = BASE_OBS_NAMES + [f"last_action/{n}" for n in self.names]
        if observation == "per_coordinate":
            self.obs_names += [f"{f}/{n}" for n in self.names for f in COORDINATE_FEATURES]
        n_extra = len(self.obs_names) - len(BASE_OBS_NAMES)
        self.observation_space = spaces.Box(
            np.array([0.0, 0.0, 0.0, -_STAT_MAX, 0.0] + [0.0] * n_extra, np.float32),
            np.array([_LOSS_MAX, _LOSS_MAX, 1.0, _STAT_MAX, _STAT_MAX] + [1.0] * n_extra, np.float32), dtype=np.float32)
        self.reset()

    @property
    def needs_coordinate_stats(self) -> bool:
        return self.observation_kind == "per_coordinate"

    def reset(self) -> None:
        """A run starts at scale 1 everywhere (the paper's ``a_0``: level 10)."""
        self.scale = np.ones(len(self.names))

    def scales(self, action) -> np.ndarray:
        """The scales (of η_base) that ``action`` sets, remembered as the current ones."""
        a = np.asarray(action)
        if self.kind == "levels":
            scale = a / (N_LEVELS - 1)
        elif self.kind == "log_levels":
            scale = self.levels[a]
        elif self.kind == "continuous":
            scale = 10.0 ** (self.low + (np.clip(a.astype(float), -1, 1) + 1) / 2 * (self.high - self.low))
        else:
            scale = np.clip(self.scale * np.asarray(RELATIVE_FACTORS)[a], 10.0 ** self.low, 10.0 ** self.high)
        self.scale = np.asarray(scale, dtype=float)
        return self.scale.copy()

    def shown_scales(self) -> np.ndarray:
        if self.kind == "levels":
            return self.scale
        return (np.log10(np.maximum(self.scale, 1e-30)) - self.low) / (self.high - self.low)

    def observe(self, values: dict, progress: float, lr_base: float) -> np.ndarray:
        """The policy's input after a decision (or at reset, with progress 0)."""
        parts = [[values["loss_xe"], values["loss_guidance"], progress, values["head_weight_mean"],
                  values["head_weight_std"]], self.shown_scales()]
        if self.observation_kind == "per_coordinate":
            stats = np.asarray(values["coordinate_stats"], dtype=float)
            lr = (self.scale * lr_base)[:, None]
            parts.append(log_feature(np.concatenate([stats, lr], axis=1)).flatten())
        obs = np.concatenate(parts).astype(np.float32)
        return np.clip(obs, self.observation_space.low, self.observation_space.high)

    def outcome(self, last_obs: np.ndarray, previous: dict, values: dict, t: int, T: int, lr_base: float,
                divergence_penalty: float) -> tuple[np.ndarray, float, bool]:
        """A decision's observation, reward and termination from the trainer's ``values`` after
        decision ``t`` of ``T`` (``previous``: the last finite values), for the env, the vector
        env and the rollouts alike: a non-finite loss ends the run with ``divergence_penalty``
        and the last finite observation, its progress updated."""
        if not values["finite"]:
            obs = last_obs.copy()
            obs[2] = t / T
            return obs, divergence_penalty, True
        return self.observe(values, t / T, lr_base), self.reward(previous, values, t >= T), t >= T

    def reward(self, previous: dict, values: dict, last: bool) -> float:
        if self.reward_kind == "loss_decrease":
            return previous["loss"] - values["loss"]
        if self.reward_kind == "log_loss_decrease":
            return math.log(max(previous["loss"], 1e-12)) - math.log(max(values["loss"], 1e-12))
        return -values["loss"] if last else 0.0

    def state_dict(self) -> dict:
        return {"scale": self.scale.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.scale = np.asarray(state["scale"], dtype=float)
