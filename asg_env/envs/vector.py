"""N ASG envs of one configuration in one process, as one batched trainer: Gymnasium's native
vector env for the embedded tasks.

``gym.make_vec("SynDigits-v0", num_envs=N)`` returns it (``vectorization_mode=
"vector_entry_point"``, the default for ids that register one). Sub-env ``i`` behaves as
:class:`~asg_env.envs.env.ASGEnv` would with the same seed and actions: the same observation,
reward, termination and info, within float tolerance, because its run is run ``i`` of a
:class:`~asg_env.training.trainer.BatchedTrainer` of ``num_envs=N`` (:mod:`asg_env.training.batched`): its own θ_n,
data order, learning rates and SGD state; one teacher and one cache for all. A decision of all
N envs is one step of the batched trainer per SGD step (vmap, or on a CPU the runs in a loop:
the trainer's ``batching``) and one host–device transfer.

Autoreset follows Gymnasium's modes (``autoreset_mode``): ``NEXT_STEP`` (the default: the
step after an episode ends resets that env, ignores its action and returns reward 0),
``SAME_STEP`` (reset at once; ``info["final_obs"]`` and ``info["final_info"]`` hold the ended
episode's last observation and info) and ``DISABLED`` (``reset(options={"reset_mask": m})``
resets some envs; stepping an env whose episode has ended returns its last observation, reward
0 and ``terminated=True``, as a diverged :class:`~asg_env.envs.env.ASGEnv` does).

What it cannot batch it refuses, with the reason: instance lists (runs of one batched model
share one backbone and configuration), ``bn_stats="train"``, file-based tasks, torchrun and
``compile``. ``gym.make_vec(..., vectorization_mode="async")`` runs those in processes.

:class:`DeviceSplitVectorEnv` spreads N envs over several GPUs, or a CPU's cores: one batched
env per device, each in its own process; :func:`native_vector_env` picks the layout for the
machine.
"""

from __future__ import annotations

import inspect
import os

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from asg_env.envs.env import capped_score, control, own_settings
from asg_env.envs.settings import ENV_FIELDS
from asg_env.errors import UserInputError
from asg_env.training.optim import poly_factor
from asg_env.training.settings import BATCHED_FIELDS, DEFAULTS, FIELDS, keyword_signature
from asg_env.training.trainer import (
    BatchedTrainer,
    batching_refusals,
    run_seeds,
)


class ASGVectorEnv(gym.vector.VectorEnv):
    """``num_envs`` ASG envs as one batched trainer; every other argument is
    :class:`~asg_env.envs.env.ASGEnv`'s."""

    metadata = {"render_modes": []}

    def __init__(self, num_envs: int, autoreset_mode: str | AutoresetMode = AutoresetMode.NEXT_STEP,
                 **trainer_kwargs):
        own = own_settings(trainer_kwargs)
        if not isinstance(num_envs, int) or isinstance(num_envs, bool) or num_envs < 1:
            raise UserInputError(f"num_envs must be a whole number of at least 1, not {num_envs!r}")
        check_batchable(trainer_kwargs)
        trainer_kwargs.pop("instances", None)
        if own["observation"] == "per_coordinate":
            trainer_kwargs["coordinate_stats"] = True
        self.autoreset_mode = AutoresetMode(autoreset_mode)
        self.metadata = {**self.metadata, "autoreset_mode": self.autoreset_mode}
        self.num_envs = num_envs
        self.trainer = BatchedTrainer(num_envs, **trainer_kwargs)
        self.config = {**DEFAULTS, **trainer_kwargs, **own}
        self.evaluate_target_enabled, self.divergence_penalty = bool(own["evaluate_target"]), float(own["divergence_penalty"])
        self.synthetic_score = bool(own["synthetic_score"])
        self._initial_score = np.zeros(num_envs)
        self.coordinate_names = self.trainer.coordinate_names
        self.controls = [control(self.coordinate_names, own) for _ in range(num_envs)]
        self.obs_names = self.controls[0].obs_names
        self.single_observation_space = self.controls[0].observation_space
        self.single_action_space = self.controls[0].action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._rngs: list[np.random.Generator | None] = [None] * num_envs
        self._obs = np.zeros((num_envs, *self.single_observation_space.shape), dtype=np.float32)
        self._values: list[dict | None] = [None] * num_envs
        self._ended = np.zeros(num_envs, dtype=bool)  # the episode is over (DISABLED mode keeps it so)
        self._diverged = np.zeros(num_envs, dtype=bool)
        self._autoreset = np.zeros(num_envs, dtype=bool)  # NEXT_STEP: reset at the next step

    @property
    def T(self) -> int:
        return self.trainer.T

    @property
    def backbone_name(self) -> str:
        return self.trainer.backbone_name

    # ----------------------------------------------------------------------------- gym API
    def reset(self, *, seed: int | list[int | None] | None = None, options: dict | None = None):
        """Reset every env, or those of ``options["reset_mask"]``; ``seed`` as SyncVectorEnv takes it."""
        options = dict(options or {})
        mask = options.pop("reset_mask", None)
        if options:
            raise UserInputError(f"the native vector env takes only reset_mask as an option, not {sorted(options)}")
        if mask is None:
            mask = np.ones(self.num_envs, dtype=bool)
        elif not (isinstance(mask, np.ndarray) and mask.dtype == np.bool_ and mask.shape == (self.num_envs,)
                  and mask.any()):
            raise ValueError(f"options['reset_mask'] must be a bool array of shape ({self.num_envs},) with a True")
        if seed is None or isinstance(seed, int):
            seeds = [None if seed is None else seed + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"{len(seeds)} seeds for {self.num_envs} envs")
        for i in np.flatnonzero(mask):
            if seeds[i] is not None or self._rngs[i] is None:
                self._rngs[i], _ = gym.utils.seeding.np_random(seeds[i])
        info = self._reset_envs(list(np.flatnonzero(mask)))
        return self._obs.copy(), self._batched(info)

    def step(self, actions):
        continuous = isinstance(self.single_action_space, gym.spaces.Box)
        actions = np.asarray(actions, dtype=np.float32 if continuous else np.int64).reshape(self.num_envs, -1)
        rewards = np.zeros(self.num_envs)
        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = np.zeros(self.num_envs, dtype=bool)
        resetting = list(np.flatnonzero(self._autoreset))
        info = self._reset_envs(resetting) if resetting else {}
        for i in np.flatnonzero(self._ended):  # DISABLED: an ended episode stays ended until reset
            terminated[i] = True
            info[i] = {"diverged": bool(self._diverged[i])}
        stepping = [i for i in range(self.num_envs) if not self._ended[i] and i not in resetting]
        scales = np.ones((self.num_envs, len(self.coordinate_names)))
        for i in stepping:
            if not self.single_action_space.contains(actions[i]):
                raise UserInputError(f"action {actions[i].tolist()} of env {i} is outside {self.single_action_space}")
            scales[i] = self.controls[i].scales(actions[i])
        values = self.trainer.step(scales, stepping) if stepping else {}
        T = self.trainer.T
        for i in stepping:
            v, t = values[i], self.trainer.t[i]
            self._diverged[i] = not v["finite"]
            self._obs[i], rewards[i], terminated[i] = self.controls[i].outcome(
                self._obs[i], self._values[i], v, t, T, self.trainer.lr_base, self.divergence_penalty)
            info[i] = self._info(i, v)
            if not self._diverged[i]:
                self._values[i] = v
                if self.evaluate_target_enabled and self.trainer.evaluation_due[i]:
                    info[i].update(self.trainer.evaluate(i))
            if self.synthetic_score and terminated[i]:
                info[i]["score"] = self._initial_score[i] if self._diverged[i] else capped_score(
                    self.trainer.evaluate_synthetic(i)["synthetic_xe"], self._initial_score[i])
        ended = [i for i in stepping if terminated[i]]
        self._ended[ended] = True
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            self._autoreset[:] = False
            self._autoreset[ended] = True
        elif self.autoreset_mode == AutoresetMode.SAME_STEP and ended:
            finals = {i: {"final_obs": self._obs[i].copy(), "final_info": info[i]} for i in ended}
            info.update({i: {**finals[i], **new} for i, new in self._reset_envs(ended).items()})
        return self._obs.copy(), rewards, terminated, truncated, self._batched(info)

    def evaluate_target(self, env: int) -> dict[str, float]:
        """The trainer's evaluation of env ``env``'s run."""
        return self.trainer.evaluate(env)

    # ---------------------------------------------------------------------------- helpers
    def _reset_envs(self, envs: list[int]) -> dict[int, dict]:
        """Start the runs of ``envs`` (one batched reset); their infos, by env."""
        seeds = {}
        for i in envs:
            if self._rngs[i] is None:
                self._rngs[i], _ = gym.utils.seeding.np_random(None)
            seeds[i] = run_seeds(self._rngs[i])
        values = self.trainer.reset(seeds)
        info = {}
        for i in envs:
            self.controls[i].reset()
            self._values[i] = values[i]
            self._obs[i] = self.controls[i].observe(values[i], 0.0, self.trainer.lr_base)
            self._ended[i] = self._diverged[i] = self._autoreset[i] = False
            info[i] = self._info(i, values[i])
            if self.synthetic_score:
                self._initial_score[i] = info[i]["initial_score"] = self.trainer.evaluate_synthetic(i)["synthetic_xe"]
        return info

    def _batched(self, info: dict[int, dict]) -> dict:
        """Per-env infos as Gymnasium's batched info dict (arrays and ``_key`` masks)."""
        out: dict = {}
        for i in sorted(info):
            out = self._add_info(out, info[i], i)
        return out

    def _info(self, i: int, values: dict) -> dict:
        trainer = self.trainer
        step = trainer.sgd_step[i]
        poly = trainer.lr_schedule == "poly" and step > 0  # a fresh run reports η_base, as ASGEnv's SGD does
        factor = poly_factor(step - 1, trainer.total_sgd_steps, trainer.warmup_steps) if poly else 1.0
        lr = {n: float(s) * trainer.lr_base * factor for n, s in zip(self.coordinate_names, self.controls[i].scale)}
        return {"step": trainer.t[i], "sgd_step": step, **{k: values[k] for k in ("loss", "loss_xe", "loss_guidance")},
                "lr": lr, "diverged": bool(self._diverged[i]), "instance": -1}


ASGVectorEnv.__init__.__signature__ = keyword_signature(
    [*ENV_FIELDS, *(f for f in BATCHED_FIELDS if f.name != "num_envs"), *FIELDS],
    first=[inspect.Parameter("num_envs", inspect.Parameter.POSITIONAL_OR_KEYWORD),
           inspect.Parameter("autoreset_mode", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=AutoresetMode.NEXT_STEP)])


class DeviceSplitVectorEnv(gym.vector.VectorEnv):
    """``num_envs`` envs split over ``devices`` (several GPUs, or ``["cpu"] * k`` for k groups
    of a CPU's cores, each worker taking ``threads`` intra-op threads), one batched
    :class:`ASGVectorEnv` per device, each in its own process; env ``i`` belongs to the device
    of its contiguous chunk. Same arguments, semantics and infos as :class:`ASGVectorEnv`."""

    metadata = {"render_modes": []}

    def __init__(self, num_envs: int, devices: list[str], autoreset_mode: str | AutoresetMode = AutoresetMode.NEXT_STEP,
                 threads: int = 1, **kwargs):
        import multiprocessing as mp

        if not 1 <= len(devices) <= num_envs:
            raise UserInputError(f"{num_envs} envs cannot be split over {len(devices)} devices")
        self.num_envs, self.autoreset_mode = num_envs, AutoresetMode(autoreset_mode)
        self.devices, self.threads = list(devices), threads
        self.metadata = {**self.metadata, "autoreset_mode": self.autoreset_mode}
        self.chunks = [list(c) for c in np.array_split(np.arange(num_envs), len(devices))]
        ctx = mp.get_context("spawn")
        self._pipes, self._processes = [], []
        for chunk, device in zip(self.chunks, devices):
            parent, child = ctx.Pipe()
            process = ctx.Process(target=_worker, args=(child, len(chunk), device, self.autoreset_mode, threads, kwargs),
                                  daemon=True)
            process.start()
            child.close()
            self._pipes.append(parent)
            self._processes.append(process)
        try:
            first, *_ = [self._receive(pipe) for pipe in self._pipes]
        except Exception:  # a refusal: no worker is left behind
            for pipe, process in zip(self._pipes, self._processes):
                process.terminate()
                process.join(timeout=5)
                pipe.close()
            raise
        self.single_observation_space, self.single_action_space = first["spaces"]
        for key in ("T", "coordinate_names", "obs_names", "backbone_name", "config"):
            setattr(self, key, first[key])
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._obs = np.zeros((num_envs, *self.single_observation_space.shape), dtype=np.float32)

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict | None = None):
        options = dict(options or {})
        mask = options.pop("reset_mask", np.ones(self.num_envs, dtype=bool))
        if seed is None or isinstance(seed, int):
            seed = [None if seed is None else seed + i for i in range(self.num_envs)]
        asked = []
        for pipe, chunk in zip(self._pipes, self.chunks):
            if mask[chunk].any():
                pipe.send(("reset", {"seed": [seed[i] for i in chunk],
                                     "options": {**options, "reset_mask": np.asarray(mask[chunk])}}))
                asked.append((pipe, chunk))
        info = {}
        for pipe, chunk in asked:
            obs, sub = self._receive(pipe)
            self._obs[chunk] = obs
            info = self._gather(info, sub, chunk)
        return self._obs.copy(), info

    def step(self, actions):
        actions = np.asarray(actions)
        for pipe, chunk in zip(self._pipes, self.chunks):
            pipe.send(("step", actions[chunk]))
        rewards = np.zeros(self.num_envs)
        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = np.zeros(self.num_envs, dtype=bool)
        info = {}
        for pipe, chunk in zip(self._pipes, self.chunks):
            obs, rewards[chunk], terminated[chunk], truncated[chunk], sub = self._receive(pipe)
            self._obs[chunk] = obs
            info = self._gather(info, sub, chunk)
        return self._obs.copy(), rewards, terminated, truncated, info

    def close_extras(self, **kwargs) -> None:
        for pipe in self._pipes:
            try:
                pipe.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
        for process in self._processes:
            process.join(timeout=30)

    def _gather(self, info: dict, sub: dict, chunk: list[int]) -> dict:
        """A worker's batched info dict, at its envs' global indices."""
        for j, i in enumerate(chunk):
            one = env_info(sub, j)
            if one:
                info = self._add_info(info, one, i)
        return info

    @staticmethod
    def _receive(pipe):
        status, payload = pipe.recv()
        if status == "error":
            kind, message = payload
            if kind in ("UserInputError", "TypeError"):  # bad input (TypeError: an unknown setting)
                raise (UserInputError if kind == "UserInputError" else TypeError)(message)
            raise RuntimeError(f"a worker failed: {kind}: {message}")
        return payload


def check_batchable(settings: dict) -> None:
    """Refuse, in one line, env settings that the native vector env cannot run as batched runs."""
    if settings.get("instances"):
        raise UserInputError("the native vector env runs one configuration (one batched model); for a list of "
                             "instances use vectorization_mode='async'")
    why = batching_refusals(settings)
    if why:
        raise UserInputError("batched runs need " + ", ".join(why))


def native_vector_env(env_id: str, num_envs: int, device: str = "cpu", **kwargs) -> gym.vector.VectorEnv:
    """``env_id``'s native vector env (its registered settings under ``kwargs``), laid out for
    the machine: on several GPUs one batched env per GPU; on a CPU of several cores one batched
    env per core (N below the core count: one per env, the threads shared out), each in its
    own process; otherwise :class:`ASGVectorEnv` in this process. On 2 CPU cores the split ran
    0.91–1.14× as many episodes per minute as one process at N = 2 to 8, and 1.39× at N = 16
    (benchmarks/bench_parallel_episodes.py). ``kwargs`` are :class:`ASGVectorEnv`'s; what
    cannot be batched is refused before any process starts."""
    spec = gym.spec(env_id)
    if spec.vector_entry_point is None:
        raise UserInputError(f"{env_id} has no native vector env")
    kwargs = {**spec.kwargs, **kwargs}
    check_batchable(kwargs)  # before any worker is started
    if device.startswith("cuda") and ":" not in device and torch.cuda.device_count() > 1:
        devices = [f"cuda:{i}" for i in range(min(torch.cuda.device_count(), num_envs))]
        return DeviceSplitVectorEnv(num_envs, devices, **kwargs)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if torch.device(device).type == "cpu" and cores > 1 and num_envs > 1:
        workers = min(cores, num_envs)
        return DeviceSplitVectorEnv(num_envs, ["cpu"] * workers, threads=cores // workers, **kwargs)
    return ASGVectorEnv(num_envs, device=device, **kwargs)


def _worker(pipe, n: int, device: str, mode: AutoresetMode, threads: int, kwargs: dict) -> None:
    torch.set_num_threads(threads)
    try:
        env = ASGVectorEnv(n, autoreset_mode=mode, device=device, **kwargs)
        pipe.send(("ok", {"spaces": (env.single_observation_space, env.single_action_space), "T": env.T,
                          "coordinate_names": env.coordinate_names, "obs_names": env.obs_names,
                          "backbone_name": env.backbone_name, "config": env.config}))
        while True:
            command, data = pipe.recv()
            if command == "close":
                break
            pipe.send(("ok", env.reset(**data) if command == "reset" else env.step(data)))
    except Exception as exc:  # the parent raises it
        pipe.send(("error", (type(exc).__name__, str(exc))))
    finally:
        pipe.close()


def env_info(info: dict, i: int) -> dict:
    """Env ``i``'s entries of a Gymnasium batched info dict, as plain Python values."""
    out = {}
    for key, value in info.items():
        if key.startswith("_") or not info.get(f"_{key}", np.ones(i + 1, dtype=bool))[i]:
            continue
        value = env_info(value, i) if isinstance(value, dict) else value[i]
        out[key] = value.item() if isinstance(value, np.generic) else value
    return out
