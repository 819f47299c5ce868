import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import asg_env
from asg_env import N_LEVELS, UserInputError


@pytest.fixture
def env(tiny_env_kwargs):
    e = gym.make("SynDigits-v0", evaluate_target=False, **tiny_env_kwargs)
    yield e
    e.close()


def _rollout(env, seed, actions):
    obs, _ = env.reset(seed=seed)
    trace = [obs]
    for a in actions:
        obs, r, *_ = env.step(a)
        trace += [obs, np.array([r])]
    return np.concatenate(trace)


def test_passes_gymnasium_and_sb3_checkers(env):
    gym_check_env(env.unwrapped, skip_render_check=True)
    sb3_check_env(env.unwrapped, warn=False)


def test_spaces_and_named_observation(env):
    u = env.unwrapped
    C = len(u.coordinates)
    assert env.action_space == gym.spaces.MultiDiscrete([N_LEVELS] * C)
    assert env.observation_space.shape == (5 + C,)
    assert np.all(np.isfinite(env.observation_space.low)) and np.all(np.isfinite(env.observation_space.high))
    assert u.obs_names[:5] == ["loss_xe", "loss_kl", "progress", "head_weight_mean", "head_weight_std"]
    assert len(u.obs_names) == 5 + C
    obs, info = env.reset(seed=0)
    w = u.student.new_head.weight
    assert obs[0] == pytest.approx(info["loss_xe"], rel=1e-5)
    assert obs[1] == pytest.approx(info["loss_kl"], rel=1e-5)
    assert obs[3] == pytest.approx(w.mean().item(), abs=1e-6)
    assert obs[4] == pytest.approx(w.std().item(), rel=1e-5)


def test_action_sets_layerwise_learning_rates_and_is_observed(env):
    env.reset(seed=0)
    C = len(env.unwrapped.coordinates)
    action = np.arange(C) % N_LEVELS
    obs, reward, terminated, truncated, info = env.step(action)
    lr_base = env.unwrapped.lr_base
    assert list(info["lr"].values()) == pytest.approx(list(action / 10 * lr_base))
    assert np.allclose(obs[5:], action / 10)
    assert obs[2] == pytest.approx(1 / env.unwrapped.T)


def test_reward_is_the_loss_decrease(env):
    _, info = env.reset(seed=0)
    prev = info["loss"]
    for _ in range(3):
        _, reward, _, _, info = env.step(env.action_space.sample())
        assert type(reward) is float
        assert reward == pytest.approx(prev - info["loss"], rel=1e-6)
        assert info["loss"] == pytest.approx(info["loss_xe"] + env.unwrapped.lam * info["loss_kl"], rel=1e-5)
        prev = info["loss"]


def test_episode_ends_after_T_actions(env):
    env.reset(seed=1)
    T = env.unwrapped.T
    ends = [env.step(env.action_space.sample())[2] for _ in range(T)]
    assert ends == [False] * (T - 1) + [True]


def test_same_seed_same_trajectory_different_seed_different(env):
    actions = [np.full(len(env.unwrapped.coordinates), k) for k in (10, 3, 7)]
    a = _rollout(env, 123, actions)
    b = _rollout(env, 123, actions)
    c = _rollout(env, 124, actions)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_reset_restores_imagenet_weights_from_memory(env):
    u = env.unwrapped
    env.reset(seed=0)
    conv0 = u.student.features.conv_stem.weight.detach().clone()
    bn0 = u.student.features.bn1.running_mean.clone()
    for _ in range(3):
        env.step(np.full(len(u.coordinates), 10))
    assert not torch.equal(conv0, u.student.features.conv_stem.weight)
    env.reset(seed=0)
    assert torch.equal(conv0, u.student.features.conv_stem.weight)
    assert torch.equal(bn0, u.student.features.bn1.running_mean)


def test_zero_scale_freezes_a_coordinate(env):
    u = env.unwrapped
    env.reset(seed=0)
    before = [p.detach().clone() for p in u.coordinates[0].params]
    action = np.full(len(u.coordinates), 10)
    action[0] = 0
    env.step(action)
    assert all(torch.equal(b, p) for b, p in zip(before, u.coordinates[0].params))
    assert not torch.equal(u.coordinates[1].params[0], u.coordinates[1].params[0].detach() * 0)


def test_heldout_reward_uses_one_fixed_batch(tiny_env_kwargs):
    env = gym.make("SynDigits-v0", evaluate_target=False, reward_batch="heldout", **tiny_env_kwargs)
    u = env.unwrapped
    _, info = env.reset(seed=0)
    # The reward batch is the fixed held-out one: re-measuring it gives the same loss.
    assert u._heldout_losses().total.item() == pytest.approx(info["loss"], rel=1e-6)
    action = np.zeros(len(u.coordinates), dtype=np.int64)  # nothing moves...
    _, reward, *_ = env.step(action)
    # ...except BatchNorm statistics, which the held-out pass (eval mode) reads but never writes.
    assert abs(reward) < 0.5


def test_divergence_ends_episode_with_penalty_and_flag(tiny_env_kwargs):
    kwargs = {**tiny_env_kwargs, "lr_base": 1e12, "episode_steps": 20}
    env = gym.make("SynDigits-v0", evaluate_target=False, divergence_penalty=-7.0, **kwargs)
    env.reset(seed=0)
    for _ in range(20):
        obs, reward, terminated, truncated, info = env.step(np.full(len(env.unwrapped.coordinates), 10))
        if info["diverged"]:
            break
    assert info["diverged"] and terminated and reward == -7.0
    assert np.all(np.isfinite(obs)) and env.observation_space.contains(obs)


def test_invalid_action_is_a_clear_error(env):
    env.reset(seed=0)
    with pytest.raises(UserInputError, match="outside"):
        env.step(np.full(len(env.unwrapped.coordinates), N_LEVELS))


def test_target_metrics_every_eval_every_and_at_the_end(tiny_env_kwargs):
    env = gym.make("SynDigits-v0", eval_every=2, **{**tiny_env_kwargs, "episode_steps": 5})
    env.reset(seed=0)
    evaluated = []
    for t in range(1, 6):
        *_, info = env.step(env.action_space.sample())
        if "target_acc" in info:
            evaluated.append(t)
            assert 0 <= info["target_mean_class_acc"] <= 1 and 0 <= info["teacher_agreement"] <= 1
    assert evaluated == [2, 4, 5]


def test_teacher_agreement_is_perfect_before_any_update(tiny_env_kwargs):
    env = gym.make("SynDigits-v0", **tiny_env_kwargs)
    u = env.unwrapped
    u.student.load_state_dict(u._imagenet_state, strict=False)  # before reset's first forward
    assert u.evaluate_target()["teacher_agreement"] == 1.0


def test_target_never_reaches_training_observation_or_reward(tiny_env_kwargs):
    """Poisoning the real target set changes nothing but the evaluation numbers, and
    evaluating (even every step) does not perturb the training trajectory."""
    actions = [np.full(9, k) for k in (10, 5, 10, 2)]

    def run(**kw):
        env = gym.make("SynDigits-v0", **{**tiny_env_kwargs, **kw})
        return env, _rollout(env, 7, actions)

    _, reference = run(evaluate_target=False)
    env, evaluated = run(eval_every=1)
    assert np.array_equal(reference, evaluated)

    env.unwrapped.task.target.images.fill_(0)
    env.unwrapped.task.target.labels.fill_(3)
    assert np.array_equal(reference, _rollout(env, 7, actions))
    source = env.unwrapped.task.source
    assert source.images.data_ptr() != env.unwrapped.task.target.images.data_ptr()


def test_unknown_task_and_bad_reward_batch_are_clear_errors(tiny_env_kwargs):
    with pytest.raises(UserInputError, match="unknown task"):
        asg_env.ASGEnv(task="imagenet", **tiny_env_kwargs)
    with pytest.raises(UserInputError, match="reward_batch"):
        asg_env.ASGEnv(reward_batch="target", **tiny_env_kwargs)


def test_zero_scale_also_freezes_batchnorm_statistics(env):
    """A coordinate at scale 0 is frozen entirely: its BatchNorm running statistics stay put,
    while those of coordinates that train keep following the synthetic batches."""
    u = env.unwrapped
    env.reset(seed=0)
    frozen_bn, trained_bn = u._coordinate_norms[2][0], u._coordinate_norms[3][0]
    frozen_before, trained_before = frozen_bn.running_mean.clone(), trained_bn.running_mean.clone()
    action = np.full(len(u.coordinates), 10)
    action[2] = 0
    for _ in range(2):
        env.step(action)
    assert torch.equal(frozen_bn.running_mean, frozen_before)
    assert not torch.equal(trained_bn.running_mean, trained_before)


def test_frozen_bn_stats_keep_imagenet_statistics_everywhere(tiny_env_kwargs):
    env = gym.make("SynDigits-v0", evaluate_target=False, bn_stats="frozen", **tiny_env_kwargs)
    u = env.unwrapped
    env.reset(seed=0)
    before = [m.running_var.clone() for norms in u._coordinate_norms for m in norms]
    env.step(np.full(len(u.coordinates), 10))
    after = [m.running_var for norms in u._coordinate_norms for m in norms]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not torch.equal(u.coordinates[0].params[0], u._imagenet_state["features.conv_stem.weight"])


def test_teacher_cache_gives_the_same_trajectory_as_running_the_teacher(tiny_env_kwargs):
    actions = [np.full(9, k) for k in (10, 4, 10)]
    runs = []
    for cache in (True, False):
        env = gym.make("SynDigits-v0", evaluate_target=False, cache_teacher=cache, **tiny_env_kwargs)
        _rollout(env, 3, actions)  # first episode fills the cache
        runs.append(_rollout(env, 3, actions))
    assert env.unwrapped._teacher_cache is None  # the uncached env never built one
    assert np.allclose(runs[0], runs[1], rtol=1e-4, atol=1e-5)
