"""SB3's VecEnv over a Gymnasium vector env, so the SB3 agents train on the native batched env.

SB3 predates Gymnasium's vector API: its VecEnv resets an env as soon as its episode ends and
hands the ended episode's last observation over in ``info["terminal_observation"]``. That is
Gymnasium's ``SAME_STEP`` autoreset, so the vector env must use that mode; the adapter only
reshapes the step's results (dones, one info dict per env).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import VecEnv

from asg_env.envs.vector import env_info as per_env


class GymnasiumVecEnv(VecEnv):
    """``venv`` (a Gymnasium ``VectorEnv`` in ``SAME_STEP`` autoreset mode) as an SB3 VecEnv."""

    def __init__(self, venv: gym.vector.VectorEnv):
        if venv.metadata.get("autoreset_mode") != gym.vector.AutoresetMode.SAME_STEP:
            raise ValueError("SB3 needs a vector env in SAME_STEP autoreset mode")
        self.venv = venv  # before VecEnv's constructor, which reads attributes through get_attr
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)
        self._actions: np.ndarray | None = None

    def reset(self):
        if any(self._options):
            raise ValueError("the batched vector env takes no reset options from SB3")
        seeds = None if all(s is None for s in self._seeds) else self._seeds
        obs, info = self.venv.reset(seed=seeds)
        self.reset_infos = [per_env(info, i) for i in range(self.num_envs)]
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self):
        obs, rewards, terminated, truncated, info = self.venv.step(self._actions)
        dones = terminated | truncated
        infos = []
        for i in range(self.num_envs):
            entry = per_env(info, i)
            if dones[i]:  # SB3 reads the ended episode's info and last observation; the rest is the reset's
                final, last = entry.pop("final_info"), entry.pop("final_obs")
                self.reset_infos[i] = entry
                entry = {**final, "terminal_observation": last, "TimeLimit.truncated": bool(truncated[i] and not terminated[i])}
            infos.append(entry)
        return obs, rewards.astype(np.float32), dones, infos

    def close(self) -> None:
        self.venv.close()

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        return [getattr(self.venv, attr_name) for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        raise AttributeError("the sub-envs of a batched vector env share one object; set attributes on it directly")

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
        raise AttributeError("the sub-envs of a batched vector env are not separate objects")

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

