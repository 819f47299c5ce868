"""N runs as one batched model (asg_env.training.batched, BatchedTrainer) and the native vector
env (asg_env.envs.vector): the same runs as N single ones, Gymnasium's autoreset semantics, and
clear refusals of what cannot be batched.

The embedded tasks' rendered digits have flat backgrounds, so many activations share one value
and sit on ReLU6's kinks together: a 1e-7 change of the input moves some early-layer gradients
by about 2 % (measured on one run alone). A batched forward pass rounds differently from a
single one, so trainer-level comparisons use a loose relative tolerance over a few steps; the
SGD itself is compared exactly on a smooth model.
"""

from __future__ import annotations

import inspect

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

import asg_env  # noqa: F401  (registers the ids)
from asg_env.envs.vector import ASGVectorEnv
from asg_env.errors import UserInputError
from asg_env.training.batched import StackedRuns
from asg_env.training.coordinates import Coordinate
from asg_env.training.optim import make_sgd
from asg_env.training.trainer import BatchedTrainer, Trainer

KW = dict(task="syndigits", image_size=32, source_size=96, batch_size=8, episode_steps=3, sgd_steps_per_action=2,
          target_eval_size=50, synthetic_eval_size=20, imagenet_photos=0, lr_base=3e-3)
ENV_KW = dict(KW, episode_steps=2, evaluate_target=False)


class _Smooth(nn.Module):
    """A tanh MLP objective with the trainer's interface: ``[L, L, 0]`` of one batch."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x, y, teacher):
        loss = nn.functional.cross_entropy(self.b(torch.tanh(self.a(x))), y)
        return torch.stack([loss, loss, loss * 0])


@pytest.mark.parametrize("batching", ["vmap", "loop"])
@pytest.mark.parametrize("form", ["official", "torch"])
def test_stacked_sgd_takes_each_runs_own_steps(form, batching):
    torch.manual_seed(0)
    template = _Smooth()
    starts = [{n: torch.randn_like(p) for n, p in template.named_parameters()} for _ in range(3)]
    data = [(torch.randn(4, 6, 5), torch.randint(0, 3, (4, 6))) for _ in range(3)]  # run r's batches
    lrs = torch.rand(4, 3, 2)  # step, run, coordinate
    coords = lambda m: [Coordinate("a", list(m.a.parameters())), Coordinate("b", list(m.b.parameters()))]  # noqa: E731
    singles = []
    for r in range(3):
        m = _Smooth()
        m.load_state_dict(starts[r])
        opt = make_sgd(form, [{"params": c.params, "lr": 1.0} for c in coords(m)], lr=1.0, momentum=0.9, weight_decay=5e-4)
        for s in range(4):
            for group, lr in zip(opt.param_groups, lrs[s, r]):
                group["lr"] = float(lr)
            opt.zero_grad()
            m(data[r][0][s], data[r][1][s], None)[0].backward()
            opt.step()
        singles.append(m)
    runs = StackedRuns(template, coords(template), 3, form, 0.9, 5e-4, batching)
    for r in range(3):
        runs.load_run(r, {f"{k}": v for k, v in starts[r].items()})
    everyone = torch.ones(3, dtype=torch.bool)
    for s in range(4):
        x = torch.stack([data[r][0][s] for r in range(3)])
        y = torch.stack([data[r][1][s] for r in range(3)])
        runs.backward(runs.losses(x, y, None), everyone)
        runs.sgd_step(lrs[s], None if s % 2 else everyone)  # in place, or masked
    for r in range(3):
        for n, p in singles[r].named_parameters():
            torch.testing.assert_close(runs.params[n][r], p.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_a_run_that_is_not_moving_keeps_its_weights_and_velocity(batching):
    torch.manual_seed(1)
    template = _Smooth()
    runs = StackedRuns(template, [Coordinate("all", list(template.parameters()))], 2, "official", 0.9, 0.0, batching)
    x, y = torch.randn(2, 6, 5), torch.randint(0, 3, (2, 6))
    runs.backward(runs.losses(x, y, None), torch.tensor([True, True]))
    runs.sgd_step(torch.full((2, 1), 0.1), torch.tensor([True, True]))
    frozen = {n: (p[1].clone(), runs.velocity[n][1].clone()) for n, p in runs.params.items()}
    moved = {n: p[0].clone() for n, p in runs.params.items()}
    runs.backward(runs.losses(x, y, None), torch.tensor([True, False]))
    runs.sgd_step(torch.full((2, 1), 0.1), torch.tensor([True, False]))
    for n, p in runs.params.items():
        assert torch.equal(p[1], frozen[n][0]) and torch.equal(runs.velocity[n][1], frozen[n][1])
    assert any(not torch.equal(p[0], moved[n]) for n, p in runs.params.items())


def _close(a: dict, b: dict, rel: float = 2e-3) -> None:
    for key in ("loss", "loss_xe", "head_weight_mean", "head_weight_std"):
        assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-5), key
    assert a["loss_guidance"] == pytest.approx(b["loss_guidance"], rel=0.05, abs=1e-4)


def _run_updates(trainer: BatchedTrainer) -> list[torch.Tensor]:
    return trainer.runs.coordinate_tensors({n: p.detach().clone() for n, p in trainer.runs.params.items()})


def _update_error(update: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """The largest relative difference of two runs' weight updates over the coordinates."""
    return max(float((u - r).norm() / r.norm()) for u, r in zip(update, reference))


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_batched_trainer_gives_the_single_runs(cache_dir, batching):
    kw = dict(KW, data_root=cache_dir, coordinate_stats=True, reward_batch="heldout")
    seeds = {0: (1, 2), 1: (3, 4), 2: (5, 6)}
    scales = np.random.default_rng(0).uniform(0, 1, size=(2, 3, 9))
    batched = BatchedTrainer(3, batching=batching, **kw)
    out = [batched.reset(seeds)]
    start = _run_updates(batched)
    out += [batched.step(scales[t], [0, 1, 2]) for t in range(2)]
    moved = [now - then for now, then in zip(_run_updates(batched), start)]
    for r, (head, data) in seeds.items():
        updates = {}
        for driver in ((r + 1) % 3, r):  # another run's scales (to show the check can fail), then its own
            single = Trainer(**kw)
            ref = [single.reset(head, data)]
            first = single._weights()
            ref += [single.step(scales[t, driver]) for t in range(2)]
            updates[driver] = [now[0] - then[0] for now, then in zip(single._weights(), first)]
        for a, b in zip(out, ref):
            _close(a[r], b)
            np.testing.assert_allclose(a[r]["coordinate_stats"], b["coordinate_stats"], rtol=0.05, atol=1e-6)
        # the SGD itself: each coordinate's update within 3 % of the single run's (vmap's rounding
        # moves it by up to 1 %); another run's scales move it by 10 % or more, a skipped step by 100 %
        own = [m[r] for m in moved]
        assert _update_error(own, updates[r]) < 0.03
        assert _update_error(own, updates[(r + 1) % 3]) > 0.05
        assert _update_error([u * 0 for u in own], updates[r]) == 1.0
    assert batched.t == [2, 2, 2] and batched.sgd_step == [4, 4, 4]
    # run 1 starts again while the others go on: it is then a fresh run of its new seeds
    batched.reset({1: (7, 8)})
    step = batched.step(scales[0], [1])
    single = Trainer(**kw)
    single.reset(7, 8)
    _close(step[1], single.step(scales[0, 1]))
    assert batched.t == [2, 1, 2]
    assert batched.evaluate(1)["synthetic_acc"] == pytest.approx(single.evaluate()["synthetic_acc"], abs=0.051)


def test_looped_runs_keep_the_channels_last_layout_per_run(cache_dir):
    trainer = BatchedTrainer(2, **KW, data_root=cache_dir)  # a CPU: auto is loop
    assert trainer.batching == "loop"
    trainer.reset({0: (1, 2), 1: (3, 4)})
    conv = next(p for p in trainer.runs.params.values() if p.dim() == 5)
    x = trainer._batch[0]
    for r in range(2):
        assert conv[r].is_contiguous(memory_format=torch.channels_last)
        assert trainer.runs._views[r][next(n for n, p in trainer.runs.params.items() if p is conv)].data_ptr() == conv[r].data_ptr()
        assert x[r].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_a_run_gone_non_finite_leaves_the_others_exact(cache_dir, batching):
    scales = np.random.default_rng(3).uniform(0, 1, size=(2, 3, 9))
    twins = [BatchedTrainer(3, batching=batching, **KW, data_root=cache_dir) for _ in range(2)]
    blowing_up = scales.copy()
    blowing_up[:, 1] = 1e30  # run 1's learning rates send its weights to inf and its losses to NaN
    for trainer in twins:
        trainer.reset({0: (1, 2), 1: (3, 4), 2: (5, 6)})
    out = [[trainer.step(s[t], [0, 1, 2]) for t in range(2)] for trainer, s in zip(twins, (scales, blowing_up))]
    assert out[0][0][1]["finite"] and not out[1][0][1]["finite"] and not out[1][1][1]["finite"]
    for r in (0, 2):
        for t in range(2):
            assert out[0][t][r] == out[1][t][r]
        for n, p in twins[0].runs.params.items():
            assert torch.equal(p[r], twins[1].runs.params[n][r]), n


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_batched_runs_resume_from_their_state_exactly(cache_dir, batching):
    kw = dict(KW, data_root=cache_dir, coordinate_stats=True)
    scales = np.random.default_rng(4).uniform(0, 1, size=(3, 2, 9))
    whole = BatchedTrainer(2, batching=batching, **kw)
    whole.reset({0: (1, 2), 1: (3, 4)})
    whole.step(scales[0], [0, 1])
    state = whole.state_dict()
    rest = [whole.step(scales[t], [0, 1] if t < 2 else [1]) for t in (1, 2)]
    resumed = BatchedTrainer(2, batching=batching, **kw)
    resumed.load_state_dict(state)
    again = [resumed.step(scales[t], [0, 1] if t < 2 else [1]) for t in (1, 2)]
    for a, b in zip(rest, again):
        assert a.keys() == b.keys()
        for r in a:
            assert {k: v for k, v in a[r].items() if k != "coordinate_stats"} == \
                   {k: v for k, v in b[r].items() if k != "coordinate_stats"}
            np.testing.assert_array_equal(a[r]["coordinate_stats"], b[r]["coordinate_stats"])
    assert resumed.t == whole.t == [2, 3] and resumed.sgd_step == whole.sgd_step
    for n, p in whole.runs.params.items():
        assert torch.equal(p, resumed.runs.params[n]) and torch.equal(whole.runs.velocity[n], resumed.runs.velocity[n])
    with pytest.raises(UserInputError, match="holds 2 runs"):
        BatchedTrainer(3, batching=batching, **kw).load_state_dict(state)


@pytest.mark.parametrize("setting, words", [({"bn_stats": "train"}, "bn_stats"), ({"guidance": "l2sp"}, "guidance"),
                                            ({"compile": "aot_eager"}, "compile")])
def test_batched_runs_refuse_what_vmap_cannot_batch(cache_dir, setting, words):
    with pytest.raises(UserInputError, match=words):
        BatchedTrainer(2, **KW, data_root=cache_dir, **setting)


def test_the_single_env_refuses_num_envs_and_the_vector_env_instances(cache_dir):
    with pytest.raises(UserInputError, match="make_vec"):
        gym.make("SynDigits-v0", **ENV_KW, data_root=cache_dir, num_envs=2)
    with pytest.raises(UserInputError, match="async"):
        ASGVectorEnv(2, **ENV_KW, data_root=cache_dir, instances=[{"lr_base": 1e-3}])


def _both(cache_dir, mode, n=3):
    kw = dict(ENV_KW, data_root=cache_dir)
    native = gym.make_vec("SynDigits-v0", num_envs=n, autoreset_mode=mode, **kw)
    ref = gym.vector.SyncVectorEnv([lambda: gym.make("SynDigits-v0", **kw) for _ in range(n)], autoreset_mode=mode)
    return native, ref


def _same_step(a, b, n):
    np.testing.assert_allclose(a[0], b[0], rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(a[1], b[1], rtol=0.05, atol=2e-3)
    assert np.array_equal(a[2], b[2]) and np.array_equal(a[3], b[3])
    for i in range(n):
        assert a[4]["_step"][i] == b[4]["_step"][i] and a[4]["step"][i] == b[4]["step"][i]


@pytest.mark.parametrize("mode", ["NextStep", "SameStep"])
def test_native_vector_env_matches_sync_vector_env(cache_dir, mode):
    native, ref = _both(cache_dir, mode)
    assert isinstance(native, ASGVectorEnv) and native.observation_space == ref.observation_space
    assert native.action_space == ref.action_space
    obs, _ = native.reset(seed=10)
    np.testing.assert_allclose(obs, ref.reset(seed=10)[0], rtol=1e-5, atol=1e-6)
    rng = np.random.default_rng(0)
    for t in range(5):  # T = 2: two autoresets
        a = rng.integers(0, 11, size=(3, 9))
        got, want = native.step(a), ref.step(a)
        assert native.observation_space.contains(got[0])
        _same_step(got, want, 3)
        if mode == "SameStep" and got[2].any():
            np.testing.assert_allclose(got[4]["final_obs"][0], want[4]["final_obs"][0], rtol=2e-3, atol=1e-4)
            assert got[4]["final_info"]["step"][0] == 2
        if mode == "NextStep" and t == 2:  # the step after the end: reset, reward 0
            assert not got[2].any() and np.all(got[1] == 0) and np.all(got[4]["step"] == 0)


def test_native_vector_env_resets_a_masked_env_alone(cache_dir):
    native, ref = _both(cache_dir, "Disabled", n=2)
    native.reset(seed=3)
    ref.reset(seed=3)
    a = np.full((2, 9), 10)
    _same_step(native.step(a), ref.step(a), 2)
    mask = np.array([False, True])
    got, want = native.reset(options={"reset_mask": mask}), ref.reset(options={"reset_mask": mask.copy()})
    np.testing.assert_allclose(got[0], want[0], rtol=2e-3, atol=1e-4)
    _same_step(native.step(a), ref.step(a), 2)  # env 0 ends its episode while env 1 is at its first step
    assert native.trainer.t == [2, 1]
    again = native.step(a)  # env 0 has ended and is not reset: last observation, reward 0, still terminated
    assert again[2][0] and again[1][0] == 0 and again[2][1]


def test_the_same_seed_gives_the_same_episode_and_another_seed_another(cache_dir):
    env = ASGVectorEnv(2, **ENV_KW, data_root=cache_dir)
    first = env.reset(seed=[5, 5])[0]
    np.testing.assert_allclose(first[0], first[1], rtol=1e-5)
    other = env.reset(seed=[5, 6])[0]
    assert not np.allclose(other[0], other[1])


def test_one_native_env_is_a_batch_of_one(cache_dir):
    env = gym.make_vec("SynDigits-v0", **ENV_KW, data_root=cache_dir)  # num_envs defaults to 1
    obs, _ = env.reset(seed=4)
    single = gym.make("SynDigits-v0", **ENV_KW, data_root=cache_dir)
    np.testing.assert_allclose(obs[0], single.reset(seed=4)[0], rtol=1e-5, atol=1e-6)
    assert env.step(np.full((1, 9), 10))[0].shape == (1, single.observation_space.shape[0])


def test_sb3_sees_the_ended_episode_and_the_reset(cache_dir):
    from agents.sb3_vec import GymnasiumVecEnv

    venv = GymnasiumVecEnv(ASGVectorEnv(2, autoreset_mode="SameStep", **ENV_KW, data_root=cache_dir))
    venv.seed(3)
    first = venv.reset()
    assert venv.reset_infos[0]["step"] == 0
    venv.step(np.full((2, 9), 10))
    obs, rewards, dones, infos = venv.step(np.full((2, 9), 10))  # T = 2: both end and are reset at once
    assert dones.all() and rewards.dtype == np.float32
    assert infos[0]["step"] == 2 and infos[0]["terminal_observation"][2] == 1.0  # t/T of the ended episode
    assert obs[0][2] == 0.0 and venv.reset_infos[0]["step"] == 0
    venv.seed(3)
    np.testing.assert_allclose(venv.reset(), first, rtol=1e-5, atol=1e-6)


def test_a_reset_does_not_report_the_previous_runs_gradient(cache_dir):
    trainer = Trainer(**KW, data_root=cache_dir, coordinate_stats=True)
    first = trainer.reset(1, 2)["coordinate_stats"]
    trainer.step(np.ones(9))
    again = trainer.reset(1, 2)["coordinate_stats"]
    assert np.all(first[:, 0] == 0)
    np.testing.assert_array_equal(again, first)


def test_envs_split_over_devices_are_the_same_envs(cache_dir):
    from asg_env.envs.vector import DeviceSplitVectorEnv

    kw = dict(ENV_KW, data_root=cache_dir)
    split = DeviceSplitVectorEnv(3, ["cpu", "cpu"], **kw)  # two processes, of 2 and 1 envs
    whole = ASGVectorEnv(3, **kw)
    try:
        assert split.chunks == [[0, 1], [2]] and split.observation_space == whole.observation_space
        np.testing.assert_allclose(split.reset(seed=7)[0], whole.reset(seed=7)[0], rtol=1e-5, atol=1e-6)
        a = np.random.default_rng(1).integers(0, 11, size=(3, 9))
        for _ in range(3):  # the third step autoresets (T = 2)
            _same_step(split.step(a), whole.step(a), 3)
        mask = np.array([False, False, True])
        got, want = split.reset(options={"reset_mask": mask}), whole.reset(options={"reset_mask": mask.copy()})
        np.testing.assert_allclose(got[0], want[0], rtol=2e-3, atol=1e-4)
        assert list(got[1]["_step"]) == [False, False, True]
    finally:
        split.close()


@pytest.mark.parametrize("sgd, batching", [("official", "vmap"), ("torch", "loop")])
def test_batched_runs_follow_the_poly_schedule_in_either_sgd_form(cache_dir, sgd, batching):
    kw = dict(KW, data_root=cache_dir, lr_schedule="poly", warmup_steps=2, sgd=sgd, window="growing", epochs=None,
              sgd_steps=6, sgd_steps_per_action=1)
    scales = np.random.default_rng(2).uniform(0, 1, size=(2, 9))
    batched = BatchedTrainer(2, batching=batching, **kw)
    batched.reset({0: (1, 2), 1: (3, 4)})
    out = [batched.step(np.stack([scales[0], scales[1]]), [0, 1]) for _ in range(2)]
    for r, seeds in enumerate([(1, 2), (3, 4)]):
        single = Trainer(**kw)
        single.reset(*seeds)
        for values in out:
            _close(values[r], single.step(scales[r]))
    assert batched.sgd_step == [single.sgd_step] * 2


def test_native_vector_env_takes_the_registered_settings_and_splits_over_cores(cache_dir, monkeypatch):
    import asg_env.envs.vector as vector

    calls = []
    monkeypatch.setattr(vector, "DeviceSplitVectorEnv", lambda n, devices, **kw: calls.append((n, devices, kw)))
    monkeypatch.setattr(vector.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    tiny = {k: v for k, v in ENV_KW.items() if k != "lr_base"}
    vector.native_vector_env("SynDigits-v0", 3, data_root=cache_dir, **tiny)
    vector.native_vector_env("SynDigits-v0", 8, data_root=cache_dir, **tiny)
    assert [(n, d, kw["threads"]) for n, d, kw in calls] == [(3, ["cpu"] * 3, 1), (8, ["cpu"] * 4, 1)]
    registered = gym.spec("SynDigits-v0").kwargs["lr_base"]
    assert registered != inspect.signature(Trainer).parameters["lr_base"].default  # so the check below can fail
    assert calls[0][2]["lr_base"] == registered
    with pytest.raises(UserInputError, match='bn_stats="frozen"'):  # refused before any worker starts
        vector.native_vector_env("SynDigits-v0", 2, data_root=cache_dir, bn_stats="train", **tiny)
    assert len(calls) == 2
    one = vector.native_vector_env("SynDigits-v0", 1, data_root=cache_dir, **tiny)  # one env: this process
    assert isinstance(one, ASGVectorEnv) and one.trainer.lr_base == registered


def test_the_native_env_reports_each_runs_synthetic_score_as_one_env_does(cache_dir):
    native = ASGVectorEnv(2, **ENV_KW, data_root=cache_dir, synthetic_score=True, autoreset_mode="Disabled")
    _, info = native.reset(seed=[4, 5])
    actions = np.stack([np.full(9, 3), np.full(9, 8)])
    for _ in range(2):
        _, _, terminated, _, last = native.step(actions)
    assert terminated.all()
    for i, seed in enumerate((4, 5)):
        single = gym.make("SynDigits-v0", **ENV_KW, data_root=cache_dir, synthetic_score=True)
        _, first = single.reset(seed=seed)
        for _ in range(2):
            _, _, _, _, end = single.step(actions[i])
        assert info["initial_score"][i] == pytest.approx(first["initial_score"], rel=1e-5)
        assert last["score"][i] == pytest.approx(end["score"], rel=1e-4)
    assert info["initial_score"][0] != info["initial_score"][1]  # each run its own head
