import glob
import os

import gymnasium as gym
import numpy as np
import pytest
import torch
from PIL import Image

import asg_env  # noqa: F401  (registers the ids)
from asg_env import UserInputError
from asg_env.tasks.visda import VISDA_CLASSES, VisDA17


def make_fake_visda(root, per_class=2, size=40):
    """A tiny tree with the VisDA-17 layout: two splits, class folders, image lists."""
    rng = np.random.default_rng(0)
    for split, ext in (("train", "png"), ("validation", "jpg")):
        lines = []
        for label, name in enumerate(VISDA_CLASSES):
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(per_class):
                rel = f"{name}/{split}_{i:03d}.{ext}"
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / split / rel)
                lines.append(f"{rel} {label}")
        (root / split / "image_list.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def visda_root(tmp_path):
    return make_fake_visda(tmp_path / "visda")


def test_visda_env_runs_on_the_fake_tree(visda_root):
    env = gym.make(
        "VisDA-v0", data_root=str(visda_root), backbone="efficientnet_lite0", image_size=32,
        batch_size=4, episode_steps=2, num_workers=0,
    )
    u = env.unwrapped
    assert u.trainer.task.num_classes == 12 and u.action_space.shape == (9,)
    env.reset(seed=0)
    for _ in range(2):
        obs, reward, terminated, _, info = env.step(env.action_space.sample())
    assert terminated and np.isfinite(reward) and env.observation_space.contains(obs)
    assert 0 <= info["target_mean_class_acc"] <= 1


def test_visda_defaults_follow_the_paper():
    spec = gym.spec("VisDA-v0")
    assert spec.kwargs["backbone"] == "resnet101" and spec.kwargs["lr_base"] == 1e-4
    assert spec.kwargs["eval_every"] == "epoch"  # not 55,388 validation images every few steps


def test_root_from_environment_variable(visda_root, monkeypatch):
    monkeypatch.setenv("ASG_DATA", str(visda_root))
    assert len(VisDA17(None, "validation")) == 24


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda r: None, "needs a data root"),
        (lambda r: os.remove(r / "validation" / "image_list.txt"), "missing validation/image_list.txt"),
        (lambda r: (r / "train" / "image_list.txt").write_text("car/x.png notanumber\n"), "cannot parse"),
        (lambda r: (r / "train" / "image_list.txt").write_text("car/train_000.png 12\n"), "bad entry"),
        (lambda r: os.remove(r / "train" / "car" / "train_000.png"), "image not found"),
    ],
)
def test_bad_layouts_give_one_clear_error(visda_root, monkeypatch, breakage, message):
    monkeypatch.delenv("ASG_DATA", raising=False)
    breakage(visda_root)
    root = None if message == "needs a data root" else str(visda_root)
    with pytest.raises(UserInputError, match=message) as err:
        VisDA17(root, "train")
    assert "\n" not in str(err.value)
    if message != "image not found":
        assert "image_list.txt" in str(err.value)  # names the expected layout


def test_corrupt_image_names_the_file(visda_root):
    (visda_root / "train" / "bus" / "train_001.png").write_bytes(b"garbage")
    ds = VisDA17(str(visda_root), "train")
    index = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("bus/train_001.png")][0]
    with pytest.raises(UserInputError, match="corrupt image .*train_001.png"):
        ds[index]


def test_a_tree_too_small_for_a_batch_and_the_heldout_batch_is_one_clear_error(visda_root):
    # 24 training images cannot give a training batch of 32 plus a held-out batch of 32.
    with pytest.raises(UserInputError, match="has 24 images; it needs at least 64") as err:
        gym.make("VisDA-v0", data_root=str(visda_root), backbone="efficientnet_lite0", image_size=32,
                 batch_size=32, num_workers=0)
    assert "\n" not in str(err.value)


def _visda(root, **kw):
    return gym.make("VisDA-v0", data_root=str(root), backbone="efficientnet_lite0", image_size=32,
                    batch_size=4, episode_steps=3, num_workers=0, evaluate_target=False, **kw).unwrapped


def test_official_recipe_fixed_transforms_and_a_disk_cache_of_teacher_logits(visda_root, tmp_path, monkeypatch):
    """Resize + CenterCrop with no random augmentation, so the teacher's logits are cached once
    on disk (fp16, memory-mapped) and reused by the next env; the trajectory matches running the
    teacher on every batch up to fp16 rounding, and L_KL starts at 0 (up to that rounding)."""
    cache_dir = str(tmp_path / "cache")
    monkeypatch.setenv("ASG_CACHE", cache_dir)
    env = _visda(visda_root)
    x1, _, _ = env.trainer.task.cached_images[3]
    x2, _, _ = env.trainer.task.cached_images[3]
    assert torch.equal(x1, x2) and x1.shape == (3, 32, 32)
    files = glob.glob(os.path.join(cache_dir, "teacher-logits", "*.npy"))
    assert len(files) == 1
    cached = np.load(files[0], mmap_mode="r")
    assert cached.dtype == np.float16 and cached.shape == (24, 1000)
    with torch.inference_mode():
        direct = env.trainer.teacher(x1[None])[0]
    assert torch.allclose(torch.from_numpy(cached[3].astype(np.float32)), direct, atol=2e-2)
    mtime = os.path.getmtime(files[0])
    again = _visda(visda_root)  # the same images: the cache is opened, not rebuilt
    assert os.path.getmtime(files[0]) == mtime and isinstance(again.trainer._teacher_cache, type(env.trainer._teacher_cache))

    action = np.full(9, 10)
    runs = []
    for e in (env, _visda(visda_root, cache_teacher=False)):
        obs, info = e.reset(seed=1)
        trace = [info["loss_guidance"]]
        for _ in range(3):
            obs, reward, *_ = e.step(action)
            trace.append(reward)
        runs.append(trace)
    assert runs[0][0] <= 1e-5 and runs[1][0] <= 1e-6
    assert np.allclose(runs[0], runs[1], atol=1e-3)


def test_official_two_layer_head_is_an_option(visda_root):
    env = _visda(visda_root, head="mlp")
    head = env.trainer.student.new_head
    assert [m.out_features for m in head if isinstance(m, torch.nn.Linear)] == [512, 12]
    assert env.trainer.coordinates[-1].name == "new_head" and len(env.trainer.coordinates[-1].params) == 4
    obs, _ = env.reset(seed=0)
    assert obs[4] == pytest.approx(head[2].weight.std().item(), rel=1e-5)  # θ_n stats: the last layer
    assert _visda(visda_root).trainer.student.new_head.out_features == 12  # the paper's single layer by default


def test_apply_then_adapt_on_the_fake_tree_with_the_uda_config(visda_root, tmp_path):
    import json
    import os

    import adapt
    import apply_policy

    applied = str(tmp_path / "applied")
    tiny = ["--set", "env.kwargs.backbone=efficientnet_lite0", "--set", "env.kwargs.image_size=32",
            "--set", "env.kwargs.batch_size=4", "--set", "env.kwargs.num_workers=0", "--set", "env.kwargs.imagenet_photos=0"]
    assert apply_policy.main(["--policy", "hand-tuned", "--env", "VisDA-v0", "--steps", "2", "--out", applied,
                              "--data-root", str(visda_root), *tiny]) == 0
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "uda_visda.yaml")
    out = str(tmp_path / "cbst")
    assert adapt.main(["--model", applied, "--method", "cbst", "--rounds", "2", "--out", out, "--config", config,
                       "--data-root", str(visda_root)]) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["task"] == "VisDA-17" and summary["final"]["round"] == 2
    assert 0 <= summary["final"]["target_mean_class_acc"] <= 1
