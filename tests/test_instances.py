"""Instance families and files, instances in the env, and the schedule baselines."""

import math

import gymnasium as gym
import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import asg_env  # noqa: F401
from agents.policies import OpenLoopPolicy, make_baseline, schedule_levels, warmup_cosine
from asg_env import UserInputError
from asg_env.envs.instances import FAMILIES, LITE, LogUniform, instance_key, load_instances, write_instances

FILES = {"syndigits": "configs/instances/syndigits.yaml", "digitscenes": "configs/instances/digitscenes.yaml"}


@pytest.mark.parametrize("family", sorted(FILES))
def test_instance_files_are_the_familys_seeded_draws_with_disjoint_splits(family):
    with open(FILES[family]) as fh:
        data = yaml.safe_load(fh)
    assert data == write_instances(family, len(data["train"]), len(data["test"]), data["seed"])
    train, test = ({instance_key(i) for i in data[s]} for s in ("train", "test"))
    assert len(train) == len(data["train"]) and len(test) == len(data["test"]) and not train & test
    assert not {i["render_seed"] for i in data["train"]} & {i["render_seed"] for i in data["test"]}
    unseeded = lambda i: instance_key({k: v for k, v in i.items() if k != "render_seed"})  # noqa: E731
    assert not {unseeded(i) for i in data["train"]} & {unseeded(i) for i in data["test"]}  # not only the images differ
    fam = FAMILIES[family]
    assert all(not fam.outside_training(i) for i in data["train"])
    outside = [fam.outside_training(i) for i in data["test"]]
    assert any("backbone" in o for o in outside) and any("lr_base" in o for o in outside)
    assert {i["backbone"] for i in data["train"]} == set(LITE[:2]) and LITE[2] in {i["backbone"] for i in data["test"]}
    assert {i["epochs"] for i in data["train"]} == {1, 2, 3, 4} and {i["image_size"] for i in data["train"]} == {48, 64}
    lrs = [i["lr_base"] for i in data["train"]]
    assert max(lrs) / min(lrs) >= 5  # η_base spans most of its decade
    for split in ("train", "test"):
        loaded = load_instances(FILES[family], split)
        assert loaded.env_id == fam.env_id and loaded.instances == data[split]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_sampler_is_seeded_stratified_and_keeps_train_inside_its_ranges(n, seed):
    fam = FAMILIES["syndigits"]
    train, test = fam.sample("train", n, seed), fam.sample("test", n, seed)
    assert train == fam.sample("train", n, seed) and len(train) == n
    assert all(not fam.outside_training(i) for i in train)
    eta = fam.axes["lr_base"]
    assert sum(eta.outside(i["lr_base"]) for i in test) == math.ceil(n / 2)
    assert all(eta.test[0] * 0.99 <= i["lr_base"] <= eta.test[1] * 1.01 for i in test)
    backbones = [i["backbone"] for i in test]
    assert len(set(backbones)) == min(n, 3)  # every value before any repeats


def test_another_seed_draws_other_instances():
    fam = FAMILIES["syndigits"]
    assert fam.sample("train", 6, 0) != fam.sample("train", 6, 1)


def test_log_uniform_train_draws_cover_equal_strata():
    axis = LogUniform((1e-3, 1e-1), (1e-4, 1.0))
    draws = sorted(axis.draw(np.random.default_rng(0), "train", 4))
    assert [math.floor(2 * math.log10(d / 1e-3)) for d in draws] == [0, 1, 2, 3]  # one per half-decade


def _write(tmp_path, data) -> str:
    path = tmp_path / "instances.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_bad_instance_files_are_one_line_errors(tmp_path):
    good = write_instances("syndigits", 3, 2, 0)
    with pytest.raises(UserInputError, match="not found"):
        load_instances(str(tmp_path / "missing.yaml"), "train")
    with pytest.raises(UserInputError, match="unknown split"):
        load_instances(_write(tmp_path, good), "validation")
    with pytest.raises(UserInputError, match="not an instance file"):
        load_instances(_write(tmp_path, {"train": good["train"]}), "train")
    with pytest.raises(UserInputError, match="both the train and the test split"):
        load_instances(_write(tmp_path, {**good, "test": [good["train"][0], *good["test"]]}), "test")
    with pytest.raises(UserInputError, match=r"train\[1\]\.lr_base must be"):
        bad = [good["train"][0], {**good["train"][1], "lr_base": -1}]
        load_instances(_write(tmp_path, {**good, "train": bad}), "train")
    with pytest.raises(UserInputError, match="unknown setting"):
        load_instances(_write(tmp_path, {**good, "train": [{"learning_rate": 0.1}]}), "train")


# -------------------------------------------------------------------------------- the env
def test_reset_with_an_instance_runs_that_configuration(tiny_env_kwargs):
    instance = {"lr_base": 0.005, "backbone": "efficientnet_lite1", "render_seed": 3, "source_size": 80}
    env = gym.make("SynDigits-v0", **tiny_env_kwargs)
    direct = gym.make("SynDigits-v0", **{**tiny_env_kwargs, **instance})
    action = np.full(env.action_space.shape, 6)
    obs, info = env.reset(seed=5, options={"instance": instance})
    u = env.unwrapped
    assert u.trainer.lr_base == 0.005 and u.backbone_name.endswith("lite1") and len(u.trainer.task.source) == 80
    assert u.config["lr_base"] == tiny_env_kwargs["lr_base"]  # the env's own configuration is kept
    obs_d, _ = direct.reset(seed=5)
    np.testing.assert_array_equal(obs, obs_d)
    for _ in range(u.T):
        a, b = env.step(action), direct.step(action)
        np.testing.assert_array_equal(a[0], b[0])
        assert a[1] == b[1]
    assert a[4]["instance"] == -1
    env.reset(seed=5)  # no instance: the env's own configuration again
    assert env.unwrapped.trainer.lr_base == tiny_env_kwargs["lr_base"] and env.unwrapped.backbone_name.endswith("lite0")


def test_env_draws_one_instance_per_episode_from_the_reset_seed(tiny_env_kwargs):
    instances = [{"lr_base": 0.01}, {"lr_base": 0.02, "render_seed": 1}, {"lr_base": 0.03, "render_seed": 2}]
    env = gym.make("SynDigits-v0", **tiny_env_kwargs, instances=instances)
    drawn = []
    for seed in range(12):
        _, info = env.reset(seed=seed)
        drawn.append(info["instance"])
        assert env.unwrapped.trainer.lr_base == instances[drawn[-1]]["lr_base"]
    assert set(drawn) == {0, 1, 2}
    again = gym.make("SynDigits-v0", **tiny_env_kwargs, instances=instances)
    assert [again.reset(seed=s)[1]["instance"] for s in range(12)] == drawn
    # the run of a drawn instance is the run an explicit instance gives with the same seed
    env.reset(seed=3)
    first = env.step(np.full(env.action_space.shape, 5))[0]
    other = gym.make("SynDigits-v0", **tiny_env_kwargs)
    other.reset(seed=3, options={"instance": instances[drawn[3]]})
    np.testing.assert_array_equal(first, other.step(np.full(env.action_space.shape, 5))[0])


def test_instances_are_checked_before_anything_is_built(tiny_env_kwargs):
    with pytest.raises(UserInputError, match="instance: lr_base must be"):
        gym.make("SynDigits-v0", **tiny_env_kwargs, instances=[{"lr_base": -0.1}])
    env = gym.make("SynDigits-v0", **tiny_env_kwargs)
    with pytest.raises(UserInputError, match="unknown setting instance: lrbase"):
        env.reset(seed=0, options={"instance": {"lrbase": 0.1}})
    with pytest.raises(UserInputError, match="evaluate_target belong to the env itself"):
        env.reset(seed=0, options={"instance": {"evaluate_target": False}})
    with pytest.raises(UserInputError, match="spaces were made for"):  # another coordinate layout
        env.reset(seed=0, options={"instance": {"backbone": "resnet50", "weights": None}})


# ----------------------------------------------------------------------- schedule baselines
def test_layer_decay_schedule_is_constant_and_decays_towards_the_input():
    levels = schedule_levels("llrd:0.8,0.5", 4, 3)
    assert levels.tolist() == [[1, 2, 4, 8]] * 3  # 0.8 · 0.5^k → nearest tenth


def test_cosine_schedule_warms_up_then_decays():
    f = warmup_cosine(10, 0.3)
    peak = int(np.argmax(f))
    assert np.all(np.diff(f[: peak + 1]) > 0) and np.all(np.diff(f[peak:]) < 0) and f[-1] < 0.05
    levels = schedule_levels("cosine:1.0,0.3,1.0", 2, 10)
    assert levels[:, 0].tolist() == levels[:, 1].tolist() and levels.max() == 10 and levels[-1].max() == 0


def test_open_loop_policies_never_read_the_observation():
    policy = make_baseline("cosine:0.9,0.2,0.7", 3, decisions=5)
    policy.reset()
    a = [policy.act(np.zeros(8)) for _ in range(5)]
    policy.reset()
    b = [policy.act(np.full(8, 1e3)) for _ in range(5)]
    assert np.array_equal(a, b) and np.array_equal(a, schedule_levels("cosine:0.9,0.2,0.7", 3, 5))
    replay = OpenLoopPolicy([[1, 2], [3, 4]])
    assert [replay.act(None).tolist() for _ in range(3)] == [[1, 2], [3, 4], [3, 4]]


@pytest.mark.parametrize("spec", ["llrd:1.5,0.5", "llrd:0.5", "cosine:0.5,1.0,0.5", "cosine:a,b,c", "llrd:0.5,0"])
def test_bad_schedules_are_one_line_errors(spec):
    with pytest.raises(UserInputError):
        make_baseline(spec, 4, decisions=4)


def test_segmentation_family_runs_a_lite2_test_instance(cache_dir):
    split = load_instances(FILES["digitscenes"], "test")
    instance = next(i for i in split.instances if i["backbone"] == LITE[2])
    tiny = {"image_size": 32, "source_size": 16, "epochs": 1}
    env = gym.make("SynDigitScenes-v0", **{**split.base, "batch_size": 8, "episode_steps": 2, "target_eval_size": 8,
                                           "synthetic_eval_size": 8, "imagenet_photos": 2, "data_root": cache_dir})
    lite0_names = env.unwrapped.coordinate_names
    env.reset(seed=0, options={"instance": {**instance, **tiny}})
    assert env.unwrapped.backbone_name == LITE[2] and env.unwrapped.coordinate_names == lite0_names
    obs, reward, terminated, _, _ = env.step(np.full(env.action_space.shape, 5))
    assert np.isfinite(reward) and not terminated
