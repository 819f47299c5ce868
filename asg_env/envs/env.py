"""ASG fine-tuning as a Gymnasium environment (ASG §2, Algorithm 1).

One episode is one fine-tuning run (:class:`~asg_env.training.trainer.Trainer`) of an ImageNet model
on synthetic images, ``T`` decisions long. Each decision picks a learning-rate scale
``a_c ∈ {0, 0.1, …, 1.0}`` for every optimization coordinate ``c``; the trainer then holds it
for a window of SGD steps with ``lr_c = a_c · lr_base``.

Observation (float32, clipped to finite bounds; names in ``obs_names``)::

    [L_XE, L_guidance, t/T, mean(θ_n), std(θ_n), a_{t-1,1}/10, …, a_{t-1,C}/10]

Reward: ``r_t = L_{t-1} − L_t`` (Algorithm 1, line 8), a Python float, with ``L`` measured on
the batch that ``reward_batch`` names (see :class:`~asg_env.training.trainer.Trainer`). The official
release likewise averages its observation over the window (``obs_avg=True``).

These are the defaults; ``action``, ``observation`` and ``reward`` choose others (log-spaced,
continuous or relative learning rates, per-coordinate features, log or final-loss rewards; see
:mod:`asg_env.envs.control`).

Instances (:mod:`asg_env.envs.instances`): ``reset(options={"instance": {...}})`` runs one episode in
the env's configuration with those settings on top (another backbone, η_base, run length…; the
next plain reset returns to the env's own); an env made with ``instances=[...]`` draws one of
them per episode, uniformly, from the reset's seed. The trainer is rebuilt only when the instance changes, and every instance must give the
coordinates the spaces were made for (EfficientNet-Lite0/1/2 all give the same 9).
``info["instance"]`` is the index of the episode's instance in that list (-1: none).

Divergence: a non-finite loss ends the episode (``terminated=True``) with reward
``divergence_penalty`` and ``info["diverged"] = True``; the observation is the last finite one.

Score (``synthetic_score=True``): the reset's info holds ``initial_score``, θ_n's cross-entropy
on the ``synthetic_eval_size`` held-out synthetic images, and the episode's last info ``score``,
the same cross-entropy at the end, capped at the initial one (:func:`capped_score`). It is what
the evolution-strategies agent maximises (negated) and what the learning gate compares; it
reads no real target image.
"""

from __future__ import annotations

import inspect
from typing import Any

import gymnasium as gym
import numpy as np

from asg_env.envs.control import Control
from asg_env.envs.settings import ENV_FIELDS, ENV_FREE_FORM, ENV_OWN, ENV_SETTINGS, check_settings
from asg_env.errors import UserInputError
from asg_env.training.settings import DEFAULTS, FIELDS, keyword_signature
from asg_env.training.trainer import Trainer, run_seeds


class ASGEnv(gym.Env):
    """Layer-wise learning-rate control of proxy-guided syn→real fine-tuning.

    Args:
        instances: a list of instances (mappings of trainer settings), one drawn per episode.
        **trainer_kwargs: the env's own settings (:class:`~asg_env.envs.settings.EnvSettings`: the action,
            observation and reward, the divergence penalty, what it reports) and the fine-tuning
            run's (:class:`~asg_env.training.settings.FineTuningSettings`: task, backbone, λ,
            η_base, windows…). ``batching`` is the vector env's and is ignored here.
    """

    metadata = {"render_modes": []}

    def __init__(self, instances: list[dict] | None = None, **trainer_kwargs: Any):
        own = own_settings(trainer_kwargs)
        if "num_envs" in trainer_kwargs:
            raise UserInputError("ASGEnv is one run; for N runs as one batched model use gym.make_vec "
                                 "(asg_env.envs.vector.ASGVectorEnv)")
        trainer_kwargs.pop("batching", None)  # how a vector env computes its runs; one run has nothing to batch
        if own["observation"] == "per_coordinate":
            trainer_kwargs["coordinate_stats"] = True
        self.instances = [_checked_instance(i, trainer_kwargs) for i in instances or []]
        self._base_kwargs = dict(trainer_kwargs)
        self.instance, self.instance_index = (self.instances[0], 0) if self.instances else ({}, -1)
        self.trainer = Trainer(**{**trainer_kwargs, **self.instance})
        # the env's own configuration, without an instance on top
        self.config = {**DEFAULTS, **trainer_kwargs, **own}
        self.evaluate_target_enabled = bool(own["evaluate_target"])
        self.divergence_penalty = float(own["divergence_penalty"])
        self.synthetic_score = bool(own["synthetic_score"])
        self.coordinate_names = self.trainer.coordinate_names
        self.control = control(self.coordinate_names, own)
        self.obs_names = self.control.obs_names
        self.observation_space, self.action_space = self.control.observation_space, self.control.action_space

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
        self.control.reset()
        self._obs = self.control.observe(self._values, 0.0, self.trainer.lr_base)
        info = self._info(self._values)
        if self.synthetic_score:
            self._initial_score = info["initial_score"] = self.trainer.evaluate_synthetic()["synthetic_xe"]
        return self._obs.copy(), info

    def step(self, action):
        continuous = isinstance(self.action_space, gym.spaces.Box)
        action = np.asarray(action, dtype=np.float32 if continuous else np.int64).reshape(-1)
        if not self.action_space.contains(action):
            raise UserInputError(f"action {action.tolist()} is outside {self.action_space}")
        if self.diverged or self.trainer.t >= self.trainer.T:  # ended: it stays so until reset
            return self._obs.copy(), 0.0, True, False, {"diverged": self.diverged}
        values = self.trainer.step(self.control.scales(action))
        t, T = self.trainer.t, self.trainer.T
        self.diverged = not values["finite"]
        self._obs, reward, terminated = self.control.outcome(self._obs, self._values, values, t, T, self.trainer.lr_base,
                                                             self.divergence_penalty)
        info = self._info(values)
        if not self.diverged:
            self._values = values
            if self.evaluate_target_enabled and self.trainer.evaluation_due:
                info.update(self.trainer.evaluate())
        if self.synthetic_score and terminated:
            info["score"] = self._initial_score if self.diverged else capped_score(
                self.trainer.evaluate_synthetic()["synthetic_xe"], self._initial_score)
        return self._obs.copy(), reward, terminated, False, info

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
        """The trainer's evaluation (:meth:`~asg_env.training.trainer.Trainer.evaluate`)."""
        return self.trainer.evaluate()

    def _info(self, values: dict[str, float]) -> dict:
        return {"step": self.trainer.t, "sgd_step": self.trainer.sgd_step,
                **{k: values[k] for k in ("loss", "loss_xe", "loss_guidance")},
                "lr": self.trainer.learning_rates, "diverged": self.diverged, "instance": self.instance_index}


def capped_score(final: float, initial: float) -> float:
    """A run's score: its final synthetic cross-entropy, or its initial one where it ended
    higher or non-finite (a run that diverged or got worse made no progress)."""
    return final if np.isfinite(final) and final < initial else initial


def own_settings(settings: dict) -> dict:
    """The env's own settings (:class:`~asg_env.envs.settings.EnvSettings`), taken out of
    ``settings`` with their defaults and checked before anything is built."""
    own = {f.name: settings.pop(f.name, f.default) for f in ENV_FIELDS}
    check_settings(own, ENV_SETTINGS)
    if own["action_min"] >= own["action_max"]:
        raise UserInputError(f"action_min ({own['action_min']:g}) must be below action_max ({own['action_max']:g})")
    return own


def control(coordinate_names: list[str], own: dict) -> Control:
    """The action, observation and reward layer of these own settings."""
    return Control(coordinate_names, own["action"], own["action_levels"], own["action_min"], own["action_max"],
                   own["observation"], own["reward"])


ASGEnv.__init__.__signature__ = keyword_signature(
    [*ENV_FIELDS, *FIELDS], first=[inspect.Parameter("instances", inspect.Parameter.KEYWORD_ONLY, default=None)])


def _checked_instance(instance, base: dict) -> dict:
    """An instance's settings, checked on top of the env's before anything is built."""
    if not isinstance(instance, dict):
        raise UserInputError(f"an instance is a mapping of env settings, not {instance!r}")
    own = sorted(set(instance) & {*ENV_OWN, "instances", "num_envs", "batching"})
    if own:
        raise UserInputError(f"an instance holds fine-tuning settings; {', '.join(own)} belong to the env itself")
    check_settings({**base, **instance}, ENV_SETTINGS, "instance: ", ignore=ENV_FREE_FORM)
    return dict(instance)
