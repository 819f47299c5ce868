"""The env's action, observation and reward options (asg_env/envs/control.py), each checked by hand."""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import asg_env  # noqa: F401
from agents.loading import load_policy
from agents.reinforce import ReinforceTrainer, policy_from_state
from agents.rollout import fine_tune
from asg_env import UserInputError
from asg_env.envs.control import ACTIONS, RELATIVE_FACTORS, REWARDS, log_feature


@pytest.fixture
def make(tiny_env_kwargs):
    def build(**kw):
        return gym.make("SynDigits-v0", **{**tiny_env_kwargs, "episode_steps": 2, "evaluate_target": False, **kw})
    return build


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("observation", ["paper", "per_coordinate"])
def test_every_option_passes_both_env_checkers(make, action, observation):
    env = make(action=action, observation=observation, batch_size=2, source_size=16, synthetic_eval_size=0)
    for reward in REWARDS:  # the reward changes no space, only the number returned
        env.unwrapped.control.reward_kind = reward
        check_env(env.unwrapped, skip_render_check=True)
    sb3_check_env(env.unwrapped, warn=False)
    obs, _ = env.reset(seed=0)
    assert obs.shape == env.observation_space.shape == (len(env.unwrapped.obs_names),)


def _rates(env):
    return np.array(list(env.unwrapped.trainer.learning_rates.values()))


def test_log_levels_and_continuous_set_rates_above_lr_base(make):
    env = make(action="log_levels", action_levels=5, action_min=0.1, action_max=10.0)
    env.reset(seed=0)
    C, lr = len(env.unwrapped.coordinate_names), env.unwrapped.trainer.lr_base
    obs, *_ = env.step(np.arange(C) % 5)
    np.testing.assert_allclose(_rates(env), lr * np.array([0.1, 10 ** -0.5, 1.0, 10 ** 0.5, 10.0])[np.arange(C) % 5])
    np.testing.assert_allclose(obs[5:5 + C], (np.arange(C) % 5) / 4, atol=1e-6)  # position on the log range
    env = make(action="continuous", action_min=0.01, action_max=10.0)
    env.reset(seed=0)
    env.step(np.linspace(-1, 1, C, dtype=np.float32))  # −1 … 1 onto 0.01 … 10, log-linearly
    np.testing.assert_allclose(_rates(env), lr * np.geomspace(0.01, 10.0, C), rtol=1e-5)


def test_relative_actions_multiply_the_current_rate_within_the_range(make):
    env = make(action="relative", action_min=0.25, action_max=4.0, episode_steps=4)
    env.reset(seed=0)
    lr, C = env.unwrapped.trainer.lr_base, len(env.unwrapped.coordinate_names)
    double, half = RELATIVE_FACTORS.index(2.0), RELATIVE_FACTORS.index(0.5)
    for k in range(3):
        env.step(np.full(C, double))
    np.testing.assert_allclose(_rates(env), lr * 4.0)  # 8 clipped to action_max
    env.step(np.full(C, half))
    np.testing.assert_allclose(_rates(env), lr * 2.0)
    env.reset(seed=1)
    env.step(np.full(C, half))
    np.testing.assert_allclose(_rates(env), lr * 0.5)  # every run starts at scale 1


def test_per_coordinate_features_are_the_gradient_update_distance_and_rate(make):
    env = make(observation="per_coordinate", sgd_steps_per_action=3, episode_steps=2)
    u = env.unwrapped
    env.reset(seed=0)
    coords = u.trainer.coordinates
    start = [[p.detach().clone() for p in c.params] for c in coords]
    action = np.arange(len(coords)) % 11
    obs, *_ = env.step(action)
    stats = u._values["coordinate_stats"]
    C = len(coords)
    for i, c in enumerate(coords):
        grads = [p.grad for p in c.params if p.grad is not None]
        grad = torch.cat([g.flatten() for g in grads]).norm().item() if grads else 0.0
        now = torch.cat([p.detach().flatten() for p in c.params])
        before = torch.cat([s.flatten() for s in start[i]])
        assert stats[i, 0] == pytest.approx(grad, rel=1e-5, abs=1e-12)
        assert stats[i, 1] == pytest.approx(((now - before).norm() / before.norm()).item(), rel=1e-5, abs=1e-12)
        assert stats[i, 2] == pytest.approx(stats[i, 1], rel=1e-5, abs=1e-12)  # after one window: the same
        features = obs[5 + C + 4 * i: 5 + C + 4 * i + 4]
        expected = log_feature([grad, stats[i, 1], stats[i, 2], action[i] / 10 * u.trainer.lr_base])
        np.testing.assert_allclose(features, expected, atol=1e-6)
    assert stats[0, 1] == 0.0 and stats[-1, 1] > 0  # level 0 freezes the first coordinate
    assert [n.split("/")[0] for n in u.obs_names[5 + C: 5 + C + 4]] == ["grad_norm", "update_ratio", "distance", "lr"]


@pytest.mark.parametrize("reward", ["log_loss_decrease", "final"])
def test_reward_forms(make, reward):
    env = make(reward=reward, episode_steps=3, reward_batch="heldout")
    _, info = env.reset(seed=0)
    previous = info["loss"]
    for t in range(3):
        _, r, done, _, info = env.step(env.action_space.sample())
        if reward == "final":
            assert r == (-info["loss"] if done else 0.0)
        else:
            assert r == pytest.approx(math.log(previous) - math.log(info["loss"]), rel=1e-9)
        previous = info["loss"]


def test_the_rollout_gives_the_envs_trajectory_with_options(make):
    kw = dict(action="relative", observation="per_coordinate", reward="log_loss_decrease", episode_steps=3)
    env = make(**kw)
    policy_env = make(**kw)
    actions = [np.array([i % 5] * len(env.unwrapped.coordinate_names)) for i in range(3)]

    class Fixed:
        def reset(self):
            self.t = 0

        def act(self, obs):
            self.t += 1
            return actions[self.t - 1]

    history = fine_tune(policy_env.unwrapped.trainer, Fixed(), 4, evaluate=False, control=policy_env.unwrapped.control)
    env.reset(seed=4)
    for t, a in enumerate(actions):
        _, r, *_ , info = env.step(a)
        assert history[t + 1]["loss"] == info["loss"] and history[t + 1]["reward"] == r


def test_reinforce_learns_any_number_of_levels_and_refuses_a_box(make):
    env = make(action="log_levels", action_levels=5)
    trainer = ReinforceTrainer(env, seed=0)
    result = trainer.run_episode(seed=1)
    assert all(0 <= a < 5 for a in np.ravel(result["actions"]))
    state = trainer.policy_state({"obs_names": env.unwrapped.obs_names})
    assert state["n_levels"] == 5 and policy_from_state(state).net.heads.out_features == 5 * 9
    with pytest.raises(UserInputError, match="SB3 agent"):
        ReinforceTrainer(make(action="continuous"), seed=0)
    with pytest.raises(UserInputError, match="paper's 11 levels"):
        load_policy("hand-tuned", make(action="relative"))


def test_bad_options_are_one_line_errors(make):
    with pytest.raises(UserInputError, match="action must be one of"):
        make(action="exponential")
    with pytest.raises(UserInputError, match="must be below action_max"):
        make(action="log_levels", action_min=2.0, action_max=1.0)
    with pytest.raises(UserInputError, match="belong to the env itself"):
        make(instances=[{"reward": "final"}])
