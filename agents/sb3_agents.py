"""stable-baselines3 / sb3-contrib agents on the same env, for comparison.

Only the policy network's tensors are saved (``torch.load(weights_only=True)`` can read
them); loading rebuilds the network from the env's spaces and the saved ``policy_kwargs``,
so no pickled object from a user's file is ever executed.

They train behind SB3's ``VecNormalize`` (observations and rewards; SB3's documentation calls
normalisation usually crucial for PPO and A2C) unless ``agent.<name>.normalize`` is false. Its
observation statistics are saved in the policy file and frozen when the policy is applied.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from sb3_contrib import RecurrentPPO
from stable_baselines3 import A2C, PPO

from agents.reinforce import POLICY_FORMAT
from asg_env import UserInputError

ALGOS = {"recurrent-ppo": (RecurrentPPO, "MlpLstmPolicy"), "ppo": (PPO, "MlpPolicy"), "a2c": (A2C, "MlpPolicy")}


def check_hyperparams(agent: str, hyperparams: dict, prefix: str) -> None:
    """Refuse a keyword that the SB3 algorithm does not take, before any env is built."""
    import inspect

    known = set(inspect.signature(ALGOS[agent][0].__init__).parameters) - {"self", "policy", "env"} | {"normalize"}
    unknown = sorted(set(hyperparams) - known)
    if unknown:
        raise UserInputError(f"unknown setting {prefix}{unknown[0]}; {ALGOS[agent][0].__name__} takes "
                             f"{', '.join(sorted(known))}")


def make_sb3(agent: str, env: gym.Env, seed: int, hyperparams: dict | None = None, tensorboard_log: str | None = None):
    """Build an SB3 model on ``env`` (CPU: the policy is tiny next to the env's CNN)."""
    algo, policy = ALGOS[agent]
    hyperparams = dict(hyperparams or {})
    policy_kwargs = {"normalize_images": False, **hyperparams.pop("policy_kwargs", {})}
    try:
        return algo(policy, env, seed=seed, policy_kwargs=policy_kwargs, tensorboard_log=tensorboard_log,
                    device="cpu", verbose=0, **hyperparams)
    except (TypeError, ValueError, AssertionError) as exc:  # a keyword or value that SB3 refuses
        raise UserInputError(f"agent.{agent}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


def normalizer_state(venv) -> dict:
    """VecNormalize's running statistics as tensors (``weights_only``-loadable)."""
    stats = {"clip_obs": float(venv.clip_obs), "clip_reward": float(venv.clip_reward), "epsilon": float(venv.epsilon)}
    for name in ("obs_rms", "ret_rms"):
        rms = getattr(venv, name)
        stats[name] = {"mean": torch.as_tensor(rms.mean), "var": torch.as_tensor(rms.var), "count": float(rms.count)}
    return stats


def load_normalizer_state(venv, stats: dict) -> None:
    venv.clip_obs, venv.clip_reward, venv.epsilon = stats["clip_obs"], stats["clip_reward"], stats["epsilon"]
    for name in ("obs_rms", "ret_rms"):
        rms = getattr(venv, name)
        rms.mean, rms.var, rms.count = (stats[name]["mean"].numpy().copy(), stats[name]["var"].numpy().copy(),
                                        stats[name]["count"])


def normalize_obs(obs: np.ndarray, stats: dict) -> np.ndarray:
    """VecNormalize's ``normalize_obs`` with frozen statistics."""
    rms = stats["obs_rms"]
    z = (obs - rms["mean"].numpy()) / np.sqrt(rms["var"].numpy() + stats["epsilon"])
    return np.clip(z, -stats["clip_obs"], stats["clip_obs"]).astype(np.float32)


class SB3Policy:
    """An SB3 model behind the common ``reset()/act(obs)`` interface; recurrent state is
    carried within an episode and cleared by ``reset()``. ``normalizer``: the frozen
    VecNormalize statistics it was trained behind, if any."""

    def __init__(self, model, deterministic: bool = True, normalizer: dict | None = None):
        self.model, self.deterministic, self.normalizer = model, deterministic, normalizer
        self.reset()

    def reset(self) -> None:
        self.state, self.episode_start = None, np.ones((1,), dtype=bool)

    def act(self, obs: np.ndarray) -> np.ndarray:
        if self.normalizer is not None:
            obs = normalize_obs(obs, self.normalizer)
        action, self.state = self.model.predict(
            obs, state=self.state, episode_start=self.episode_start, deterministic=self.deterministic
        )
        self.episode_start = np.zeros((1,), dtype=bool)
        return np.asarray(action)

    def state_dict(self) -> dict:
        """The LSTM state of a recurrent policy (sampled actions draw from torch's global RNG,
        which the trainer's checkpoint holds)."""
        state = {"episode_start": torch.from_numpy(self.episode_start)}
        if self.state is not None:
            state["lstm"] = [torch.from_numpy(np.asarray(s)) for s in self.state]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.episode_start = state["episode_start"].numpy()
        self.state = tuple(s.numpy() for s in state["lstm"]) if "lstm" in state else None


def sb3_policy_state(agent: str, model, metadata: dict) -> dict:
    venv = model.get_vec_normalize_env()
    return {
        "format": POLICY_FORMAT, "agent": agent,
        "obs_dim": model.observation_space.shape[0], "n_coordinates": model.action_space.shape[0],
        "policy_kwargs": {k: v for k, v in model.policy_kwargs.items() if isinstance(v, (int, float, bool, str, list))},
        "state_dict": model.policy.state_dict(), **({"vec_normalize": normalizer_state(venv)} if venv else {}),
        **metadata,
    }


def sb3_policy_from_state(state: dict, env: gym.Env, deterministic: bool = True, seed: int | None = None) -> SB3Policy:
    model = make_sb3(state["agent"], env, seed=seed or 0, hyperparams={"policy_kwargs": state["policy_kwargs"]})
    model.policy.load_state_dict(state["state_dict"])
    return SB3Policy(model, deterministic, state.get("vec_normalize"))
