"""A CNN-free env with the ASG interface, for fast agent tests.

Each coordinate has one best level; the reward is higher the closer every coordinate's
level is to it. Observations mimic ASG's layout (five statistics, then the last action).
"""

import gymnasium as gym
import numpy as np

from asg_env import N_LEVELS


class ToyLREnv(gym.Env):
    def __init__(self, best=(2, 8, 5), episode_steps=10, noise=0.05):
        self.best, self.T, self.noise = np.array(best), episode_steps, noise
        C = len(best)
        self.coordinate_names = [f"c{i}" for i in range(C)]
        self.obs_names = ["loss_xe", "loss_guidance", "progress", "head_weight_mean", "head_weight_std"] + [
            f"last_action/{n}" for n in self.coordinate_names]
        self.backbone_name = "toy"
        self.observation_space = gym.spaces.Box(-10, 10, (5 + C,), np.float32)
        self.action_space = gym.spaces.MultiDiscrete([N_LEVELS] * C)

    def _obs(self, action):
        stats = [1.0 - self.t / self.T, 0.1, self.t / self.T, 0.0, 0.1]
        return np.concatenate([stats, action / 10]).astype(np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(np.zeros(len(self.best))), {}

    def step(self, action):
        self.t += 1
        reward = -float(np.abs(np.asarray(action) - self.best).mean()) / 10 + self.noise * self.np_random.normal()
        info = {"loss": 1.0, "loss_xe": 1.0, "loss_guidance": 0.0, "step": self.t}
        return self._obs(np.asarray(action)), reward, self.t >= self.T, False, info
