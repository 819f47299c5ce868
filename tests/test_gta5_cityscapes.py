import inspect
import os

import gymnasium as gym
import numpy as np
import pytest
import torch
from PIL import Image

import asg_env  # noqa: F401  (registers the ids)
from asg_env import UserInputError
from asg_env.tasks.gta5_cityscapes import (
    CITYSCAPES_CLASSES,
    EvalTransform,
    SegmentationFiles,
    cityscapes_val_pairs,
    gta5_pairs,
    to_train_ids,
)

IDS = np.array([0, 7, 8, 26, 33, 4, 23])  # unlabeled, road, sidewalk, car, bicycle, static, sky


def _save(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array, mode).save(path)


def make_fake_gta5_cityscapes(root, gta=8, size=(40, 24)):
    """Tiny trees in the released layouts: GTA5 frames with label-id PNGs (palette mode, as
    released), Cityscapes val cities with *_gtFine_labelIds.png."""
    rng = np.random.default_rng(0)
    w, h = size
    for i in range(1, gta + 1):
        _save(root / "gta5" / "images" / f"{i:05d}.png", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        label = Image.fromarray(rng.choice(IDS, (h, w)).astype(np.uint8), "P")
        label.putpalette([v for c in range(256) for v in (c, c, c)])
        os.makedirs(root / "gta5" / "labels", exist_ok=True)
        label.save(root / "gta5" / "labels" / f"{i:05d}.png")
    for city in ("frankfurt", "lindau"):
        for j in range(2):
            stem = f"{city}_000000_{j:06d}"
            _save(root / "cityscapes" / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png",
                  rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            _save(root / "cityscapes" / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png",
                  rng.choice(IDS, (h, w)).astype(np.uint8))
    return root


@pytest.fixture
def seg_root(tmp_path):
    return make_fake_gta5_cityscapes(tmp_path / "data")


def test_label_ids_map_to_the_19_train_ids_and_255():
    assert to_train_ids(IDS).tolist() == [255, 0, 1, 13, 18, 255, 10]
    assert len(CITYSCAPES_CLASSES) == 19 and to_train_ids(np.arange(34)).max() == 255
    assert sorted(set(to_train_ids(np.arange(256)).tolist()) - {255}) == list(range(19))


def test_loaders_read_the_released_layouts(seg_root):
    gta = gta5_pairs(str(seg_root))
    city = cityscapes_val_pairs(str(seg_root))
    assert len(gta) == 8 and len(city) == 4 and city[0][1].endswith("frankfurt_000000_000000_gtFine_labelIds.png")
    x, y = SegmentationFiles(city, EvalTransform(None, (0.5,) * 3, (0.5,) * 3))[0]
    raw = np.asarray(Image.open(city[0][1]))
    assert x.shape == (3, 24, 40) and torch.equal(y, torch.from_numpy(to_train_ids(raw).astype(np.int64)))


@pytest.mark.parametrize("damage, message", [
    (lambda r: os.remove(r / "gta5" / "labels" / "00003.png"), "has no label file"),
    (lambda r: (r / "gta5" / "images" / "00002.png").write_bytes(b"not a png"), "corrupt image"),
    (lambda r: os.rename(r / "cityscapes" / "gtFine", r / "cityscapes" / "gt"), "missing cityscapes/gtFine/val/"),
])
def test_bad_trees_are_one_line_errors(seg_root, damage, message):
    damage(seg_root)
    with pytest.raises(UserInputError, match=message) as err:
        files = SegmentationFiles(gta5_pairs(str(seg_root)), EvalTransform(None, (0.5,) * 3, (0.5,) * 3))
        for i in range(len(files)):
            files[i]
        cityscapes_val_pairs(str(seg_root))
    assert "\n" not in str(err.value)


def test_missing_root_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("ASG_DATA", raising=False)
    with pytest.raises(UserInputError, match="needs a data root"):
        gta5_pairs(None)


def test_gta5_cityscapes_env_runs_on_the_fixture_tree(seg_root):
    env = gym.make("GTA5-Cityscapes-v0", data_root=str(seg_root), backbone="efficientnet_lite0", image_size=32,
                   batch_size=2, episode_steps=2, num_workers=0, imagenet_photos=0, lam=1.0)
    u = env.unwrapped
    assert u.trainer.task.num_classes == 19 and u.trainer.task.heldout[1].shape == (2, 32, 32)
    obs, info = env.reset(seed=0)
    assert info["loss_guidance"] == 0.0  # the student starts at the teacher, on augmented crops too
    for _ in range(2):
        obs, reward, done, _, info = env.step(np.full(9, 10))
    assert done and np.isfinite(reward)
    assert 0 <= info["target_miou"] <= 1 and len([k for k in info if k.startswith("target_iou/")]) == 19


@pytest.mark.parametrize("name", ["gta5_fcn_vgg16", "gta5_fcn_resnet50"])
def test_configs_hold_the_papers_settings_and_only_valid_options(name):
    from agents.config import load_config
    from asg_env.training.trainer import Trainer

    kwargs = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.yaml"))["env"]["kwargs"]
    valid = set(inspect.signature(Trainer).parameters) | {"evaluate_target", "divergence_penalty"}
    assert set(kwargs) <= valid
    assert (kwargs["image_size"], kwargs["batch_size"], kwargs["lr_base"], kwargs["lam"]) == (512, 6, 1e-3, 75.0)
    assert (kwargs["momentum"], kwargs["weight_decay"]) == (0.9, 5e-4)


def test_train_and_apply_a_policy_on_gta5_cityscapes_with_the_config(seg_root, tmp_path):
    import apply_policy
    import train_policy

    config = os.path.join(os.path.dirname(__file__), "..", "configs", "gta5_fcn_vgg16.yaml")
    tiny = ["--set", "env.kwargs.backbone=efficientnet_lite0", "--set", "env.kwargs.image_size=32",
            "--set", "env.kwargs.batch_size=2", "--set", "env.kwargs.episode_steps=2", "--set", "env.kwargs.num_workers=0",
            "--set", "env.kwargs.imagenet_photos=0"]
    out = str(tmp_path / "run")
    assert train_policy.main(["--config", config, "--episodes", "1", "--out", out, "--data-root", str(seg_root), *tiny]) == 0
    applied = str(tmp_path / "applied")
    assert apply_policy.main(["--policy", os.path.join(out, "policy.pt"), "--out", applied,
                              "--data-root", str(seg_root)]) == 0
    import json

    summary = json.load(open(os.path.join(applied, "summary.json")))
    assert summary["env"] == "GTA5-Cityscapes-v0" and summary["env_kwargs"]["lam"] == 75.0
    assert 0 <= summary["final"]["target_miou"] <= 1 and "target_iou/bicycle" in summary["final"]

    from safetensors.torch import load_file

    import adapt  # CRST from that model, with the papers' settings, on the unlabelled Cityscapes images

    weights = []
    for k in range(2):  # half the GTA5 crops beside the full-size Cityscapes images (cropped): twice, the same
        adapted = str(tmp_path / f"adapted{k}")
        assert adapt.main(["--model", applied, "--method", "crst-mrkld-lrent", "--rounds", "1", "--out", adapted,
                           "--config", os.path.join(os.path.dirname(config), "uda_gta5.yaml"),
                           "--set", "init_src_port=0.5", "--data-root", str(seg_root)]) == 0
        weights.append(load_file(os.path.join(adapted, "model.safetensors")))
    result = json.load(open(os.path.join(adapted, "summary.json")))
    assert result["final"]["round"] == 1 and 0 <= result["final"]["target_miou"] <= 1
    assert result["config"]["test_flipping"] and result["final"]["source_images"] == 3
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
