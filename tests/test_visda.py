import os

import gymnasium as gym
import numpy as np
import pytest
from PIL import Image

import asg_env  # noqa: F401  (registers the ids)
from asg_env import UserInputError
from asg_env.data.visda import VISDA_CLASSES, VisDA17


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
    assert u.task.num_classes == 12 and u.action_space.shape == (9,)
    env.reset(seed=0)
    for _ in range(2):
        obs, reward, terminated, _, info = env.step(env.action_space.sample())
    assert terminated and np.isfinite(reward) and env.observation_space.contains(obs)
    assert 0 <= info["target_mean_class_acc"] <= 1


def test_visda_defaults_follow_the_paper():
    spec = gym.spec("VisDA-v0")
    assert spec.kwargs["backbone"] == "resnet101" and spec.kwargs["lr_base"] == 1e-4


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
