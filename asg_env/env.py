"""ASG fine-tuning as a Gymnasium environment (ASG §2, Algorithm 1).

One episode is one fine-tuning run (:class:`~asg_env.trainer.Trainer`) of an ImageNet model
on synthetic images, ``T`` decisions long. Each decision picks a learning-rate scale
``a_c ∈ {0, 0.1, …, 1.0}`` for every optimization coordinate ``c``; the trainer then holds it
for a window of SGD steps with ``lr_c = a_c · lr_base``.

Observation (float32, clipped to finite bounds; names in ``obs_names``)::

    [L_XE, L_guidance, t/T, mean(θ_n), std(θ_n), a_{t-1,1}/10, …, a_{t-1,C}/10]

Reward: ``r_t = L_{t-1} − L_t`` (Algorithm 1, line 8), a Python float, with ``L`` measured on
the batch that ``reward_batch`` names (see :class:`~asg_env.trainer.Trainer`). The official
release likewise averages its observation over the window (``obs_avg=True``).

Instances (:mod:`asg_env.instances`): ``reset(options={"instance": {...}})`` runs one episode in
the env's configuration with those settings on top (another backbone, η_base, run length…; the
next plain reset returns to the env's own); an env made with ``instances=[...]`` draws one of
them per episode, uniformly, from the reset's seed. The trainer is rebuilt only when the instance changes, and every instance must give the
coordinates the spaces were made for (EfficientNet-Lite0/1/2 all give the same 9).
``info["instance"]`` is the index of the episode's instance in that list (-1: none).

Divergence: a non-finite loss ends the episode (``terminated=True``) with reward
``divergence_penalty`` and ``info["diverged"] = True``; the observation is the last finite one.
"""

from __future__ import annotations

import inspect

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from asg_env.errors import UserInputError
from asg_env.settings import ENV_FREE_FORM, ENV_SETTINGS, check_settings
from asg_env.trainer import Trainer, run_seeds

N_LEVELS = 11  # learning-rate scales 0, 0.1, …, 1.0
_LOSS_MAX, _STAT_MAX = 1e4, 1e3  # finite observation bounds; values are clipped into them
BASE_OBS_NAMES = ["loss_xe", "loss_guidance", "progress", "head_weight_mean", "head_weight_std"]


def observation_bounds(n_coordinates: int) -> tuple[np.ndarray, np.ndarray]:
    low = np.array([0.0, 0.0, 0.0, -_STAT_MAX, 0.0] + [0.0] * n_coordinates, np.float32)
    high = np.array([_LOSS_MAX, _LOSS_MAX, 1.0, _STAT_MAX, _STAT_MAX] + [1.0] * n_coordinates, np.float32)
    return low, high


def observation(values: dict[str, float], progress: float, last_action: np.ndarray) -> np.ndarray:
    """The policy's input after a decision: the losses, t/T, θ_n's statistics, the last action."""
    obs = np.concatenate([
        [values["loss_xe"], values["loss_guidance"], progress, values["head_weight_mean"], values["head_weight_std"]],
        np.asarray(last_action) / (N_LEVELS - 1),
    ]).astype(np.float32)
    return np.clip(obs, *observation_bounds(len(last_action)))


class ASGEnv(gym.Env):
    """Layer-wise learning-rate control of proxy-guided syn→real fine-tuning.

    Args:
        instances: a list of instances (mappings of trainer settings), one drawn per episode.
        evaluate_target: evaluate on the real target when the trainer says an evaluation is
            due (``eval_every``, and at the end); off makes policy training faster.
        divergence_penalty: reward when the loss becomes non-finite.
        **trainer_kwargs: the fine-tuning run (task, backbone, λ, η_base, windows…): see
            :class:`~asg_env.trainer.Trainer`.
    """

    metadata = {"render_modes": []}

    def __init__(self, evaluate_target: bool = True, divergence_penalty: float = -10.0,
                 instances: list[dict] | None = None, **trainer_kwargs):
        check_settings({"evaluate_target": evaluate_target, "divergence_penalty": divergence_penalty}, ENV_SETTINGS)
        self.instances = [_checked_instance(i, trainer_kwargs) for i in instances or []]
        self._base_kwargs = dict(trainer_kwargs)
        self.instance, self.instance_index = (self.instances[0], 0) if self.instances else ({}, -1)
        self.trainer = Trainer(**{**trainer_kwargs, **self.instance})
        # the env's own configuration, without an instance on top
        self.config = {**_trainer_defaults(), **trainer_kwargs, "evaluate_target": evaluate_target,
                       "divergence_penalty": divergence_penalty}
        self.evaluate_target_enabled = bool(evaluate_target)
        self.divergence_penalty = float(divergence_penalty)
        C = len(self.trainer.coordinates)
        self.coordinate_names = self.trainer.coordinate_names
        self.obs_names = BASE_OBS_NAMES + [f"last_action/{n}" for n in self.coordinate_names]
        self.observation_space = spaces.Box(*observation_bounds(C), dtype=np.float32)
        self.action_space = spaces.MultiDiscrete([N_LEVELS] * C)
        self.last_action = np.full(C, N_LEVELS - 1, dtype=np.int64)

    @property
    def T(self) -> int:
        return self.trainer.T

    @property
    def backbone_name(self) -> str:
        return self.trainer.backbone_name

    # ----------------------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        seeds = run_seeds(self.np_random)  # first, so an instance's run is the run a driver starts with this seed
        if options and "instance" in options:
            self._use_instance(_checked_instance(options["instance"], self._base_kwargs), -1)
        elif self.instances:
            index = int(self.np_random.integers(len(self.instances)))
            self._use_instance(self.instances[index], index)
        else:
            self._use_instance({}, -1)  # the env's own configuration again
        self._values = self.trainer.reset(*seeds)
        self.diverged = False
        self.last_action = np.full(len(self.coordinate_names), N_LEVELS - 1, dtype=np.int64)
        self._obs = observation(self._values, 0.0, self.last_action)
        return self._obs.copy(), self._info(self._values)

    def step(self, action):
        action = np.asarray(action, dtype=np.int64).reshape(-1)
        if not self.action_space.contains(action):
            raise UserInputError(f"action {action.tolist()} is outside {self.action_space}")
        if self.diverged:
            return self._obs.copy(), 0.0, True, False, {"diverged": True}
        self.last_action = action
        values = self.trainer.step(action / (N_LEVELS - 1))
        t, T = self.trainer.t, self.trainer.T
        if not values["finite"]:
            self.diverged = True
            self._obs[2] = t / T
            return self._obs.copy(), self.divergence_penalty, True, False, self._info(values)
        previous, self._values = self._values["loss"], values
        self._obs = observation(values, t / T, action)
        info = self._info(values)
        if self.evaluate_target_enabled and self.trainer.evaluation_due:
            info.update(self.trainer.evaluate())
        return self._obs.copy(), previous - values["loss"], t >= T, False, info

    def _use_instance(self, instance: dict, index: int) -> None:
        self.instance_index = index
        if instance == self.instance:
            return
        trainer = Trainer(**{**self._base_kwargs, **instance})
        if trainer.coordinate_names != self.coordinate_names:
            raise UserInputError(f"instance {instance} has coordinates {trainer.coordinate_names}; this env's spaces "
                                 f"were made for {self.coordinate_names}")
        self.trainer, self.instance = trainer, dict(instance)

    def evaluate_target(self) -> dict[str, float]:
        """The trainer's evaluation (:meth:`~asg_env.trainer.Trainer.evaluate`)."""
        return self.trainer.evaluate()

    def _info(self, values: dict[str, float]) -> dict:
        return {"step": self.trainer.t, "sgd_step": self.trainer.sgd_step,
                **{k: values[k] for k in ("loss", "loss_xe", "loss_guidance")},
                "lr": self.trainer.learning_rates, "diverged": self.diverged, "instance": self.instance_index}


def _trainer_defaults() -> dict:
    return {k: p.default for k, p in inspect.signature(Trainer).parameters.items()}


def _checked_instance(instance, base: dict) -> dict:
    """An instance's settings, checked on top of the env's before anything is built."""
    if not isinstance(instance, dict):
        raise UserInputError(f"an instance is a mapping of env settings, not {instance!r}")
    own = sorted(set(instance) & {"evaluate_target", "divergence_penalty", "instances"})
    if own:
        raise UserInputError(f"an instance holds fine-tuning settings; {', '.join(own)} belong to the env itself")
    check_settings({**base, **instance}, ENV_SETTINGS, "instance: ", ignore=ENV_FREE_FORM)
    return dict(instance)
