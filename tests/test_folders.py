import json
import os

import gymnasium as gym
import numpy as np
import pytest
import torch
from PIL import Image

import apply_policy
import train_policy
from asg_env import ASGEnv, UserInputError

CLASSES = ("circle", "square", "stripes")


def _classification_tree(root, classes=CLASSES, per_class=6, seed=0):
    """Tiny images of three kinds, different enough to learn, one folder per class."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        os.makedirs(root / name / "sub", exist_ok=True)
        for i in range(per_class):
            image = rng.integers(0, 60, (40, 40, 3), dtype=np.uint8)
            image[8 + 8 * (label % 2) : 32, 8 : 32 - 8 * (label // 2)] += np.uint8(150)
            folder = root / name / ("sub" if i % 2 else "")
            Image.fromarray(image).save(folder / f"{i}.png")
    return root


def _segmentation_tree(root, classes=("ground", "box", "ball"), count=10, seed=0):
    rng = np.random.default_rng(seed)
    for sub in ("images", "labels"):
        os.makedirs(root / sub, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for i in range(count):
        label = np.zeros((40, 40), dtype=np.uint8)
        label[5:20, 5:20], label[22:35, 22:35], label[0, :] = 1, 2, 255
        image = (rng.integers(0, 40, (40, 40, 3)) + 100 * label[..., None].clip(0, 2)).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{i:03d}.jpg")
        Image.fromarray(label).save(root / "labels" / f"{i:03d}.png")
    return root


TINY = {"image_size": 32, "batch_size": 4, "episode_steps": 2, "num_workers": 0, "imagenet_photos": 2}


def test_an_imagefolder_task_runs_in_the_env_with_class_names_matched_by_name(tmp_path):
    source, target = _classification_tree(tmp_path / "syn"), _classification_tree(tmp_path / "real", seed=1)
    env = gym.make("ImageFolder-v0", source_root=str(source), target_root=str(target), **TINY).unwrapped
    task = env.trainer.task
    assert task.class_names == CLASSES and task.num_classes == 3
    assert len(task.source) + len(task.heldout[1]) == 18 and len(task.target) == 18  # subfolders count too
    assert env.coordinate_names[-1] == "new_head" and len(env.coordinate_names) == 9
    obs, _ = env.reset(seed=0)
    for _ in range(2):
        obs, reward, done, _, info = env.step(env.action_space.sample())
    assert done and np.isfinite(reward) and 0 <= info["target_acc"] <= 1 and np.isfinite(info["target_kl"])


def test_imagefolder_layout_problems_are_one_line_each(tmp_path):
    source = _classification_tree(tmp_path / "syn")
    other = _classification_tree(tmp_path / "other", classes=("circle", "square", "triangle"))
    (tmp_path / "empty").mkdir()
    os.makedirs(tmp_path / "hollow" / "circle")
    broken = _classification_tree(tmp_path / "broken")
    (broken / "square" / "0.png").write_bytes(b"\x89PNG garbage")
    cases = [({"target_root": str(other)}, "only in source_root: stripes; only in target_root: triangle"),
             ({"target_root": None}, "target_root is needed"),
             ({"target_root": str(tmp_path / "nope")}, "is not a folder"),
             ({"target_root": str(tmp_path / "empty")}, "holds no class folders"),
             ({"target_root": str(tmp_path / "hollow")}, "no images in class folder(s) circle"),
             ({"target_root": str(broken)}, "corrupt image")]
    for kwargs, message in cases:
        with pytest.raises(UserInputError) as err:
            gym.make("ImageFolder-v0", source_root=str(source), **{**TINY, **kwargs})
        assert message in str(err.value) and "\n" not in str(err.value)


def test_a_segfolder_task_runs_in_the_env_and_ignores_255(tmp_path):
    source, target = _segmentation_tree(tmp_path / "syn"), _segmentation_tree(tmp_path / "real", seed=1, count=3)
    env = gym.make("SegFolder-v0", source_root=str(source), target_root=str(target), **TINY).unwrapped
    assert env.trainer.task.class_names == ("ground", "box", "ball")
    env.reset(seed=0)
    _, y = env.trainer.task.heldout
    assert set(torch.unique(y).tolist()) <= {0, 1, 2, 255} and (y == 255).any()
    for _ in range(2):
        _, reward, done, _, info = env.step(env.action_space.sample())
    assert done and np.isfinite(reward) and 0 <= info["target_miou"] <= 1 and "target_iou/ball" in info


def test_segfolder_layout_problems_are_one_line_each(tmp_path):
    source = _segmentation_tree(tmp_path / "syn")
    renamed = _segmentation_tree(tmp_path / "renamed", classes=("ground", "box", "sphere"))
    unlabelled = _segmentation_tree(tmp_path / "unlabelled", count=2)
    os.remove(unlabelled / "labels" / "001.png")
    (tmp_path / "bare").mkdir()
    rgb_labels = _segmentation_tree(tmp_path / "rgb", count=2)
    Image.new("RGB", (40, 40)).save(rgb_labels / "labels" / "000.png")
    broken = _segmentation_tree(tmp_path / "broken", count=2)
    (broken / "images" / "001.jpg").write_bytes(b"not a jpeg")
    cases = [(renamed, "list different classes in classes.txt"), (unlabelled, "has no label file"),
             (tmp_path / "bare", "has no classes.txt"), (rgb_labels, "is not a 40×40 single-channel map"),
             (broken, "corrupt image")]
    for target, message in cases:
        with pytest.raises(UserInputError, match=message):
            gym.make("SegFolder-v0", source_root=str(source), target_root=str(target), **TINY)


def test_your_own_data_with_a_timm_and_a_torchvision_model_from_local_weights(tmp_path, capsys):
    """The README's two commands on a tiny tree: learn a policy on ImageFolder-v0, then apply it,
    with timm:tf_efficientnet_lite0 (the packaged ImageNet weights in timm's names, from a
    safetensors file) and with torchvision:mobilenet_v3_small (a state dict file)."""
    import torchvision
    from safetensors.torch import save_file

    from asg_env.training.backbones import build_backbone

    lite = build_backbone("efficientnet_lite0")
    state = {**lite.features.state_dict(), **{f"classifier.{k}": v for k, v in lite.imagenet_head.state_dict().items()}}
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "lite0.safetensors")
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), tmp_path / "mnv3.pth")
    source, target = _classification_tree(tmp_path / "syn"), _classification_tree(tmp_path / "real", seed=1)
    data = ["--set", f"env.kwargs.source_root={source}", "--set", f"env.kwargs.target_root={target}",
            *[a for k, v in TINY.items() for a in ("--set", f"env.kwargs.{k}={v}")]]
    for backbone, weights, coordinates in (("timm:tf_efficientnet_lite0", "lite0.safetensors", 9),
                                           ("torchvision:mobilenet_v3_small", "mnv3.pth", 11)):
        model = ["--set", f"env.kwargs.backbone={backbone}", "--set", f"env.kwargs.weights={tmp_path / weights}"]
        run = tmp_path / backbone.replace(":", "_")
        assert train_policy.main(["--env", "ImageFolder-v0", "--episodes", "1", "--out", str(run), *data, *model]) == 0
        policy = torch.load(run / "policy.pt", weights_only=True)
        assert policy["backbone"] == backbone and len(policy["coordinate_names"]) == coordinates
        assert apply_policy.main(["--policy", str(run / "policy.pt"), "--out", str(run / "applied")]) == 0
        summary = json.load(open(run / "applied" / "summary.json"))
        assert summary["env"] == "ImageFolder-v0" and summary["decisions_made"] == 2
        assert 0 <= summary["final"]["target_mean_class_acc"] <= 1
        capsys.readouterr()


def test_a_new_dataset_is_one_registry_entry(monkeypatch, tmp_path):
    """A task builder registered by name runs through the env like the shipped ones, and its
    kind picks the family that trains and measures it."""
    from asg_env.tasks.registry import TASKS, Task, TensorSource

    def noise_task(o):
        rng = np.random.default_rng(0)
        images = rng.integers(0, 255, (24, o.image_size, o.image_size, 3), dtype=np.uint8)
        labels = (images.mean((1, 2, 3)) > 127).astype(np.int64)
        source = TensorSource(images[:16], labels[:16], o.batch_size, o.device, o.mean, o.std)
        heldout = TensorSource(images[16:20], labels[16:20], 4, o.device, o.mean, o.std).all()
        target = TensorSource(images[20:], labels[20:], 4, o.device, o.mean, o.std)
        return Task("Noise", 2, source, heldout, target, class_names=("dark", "bright"))

    monkeypatch.setitem(TASKS, "noise", noise_task)
    env = ASGEnv(task="noise", image_size=32, batch_size=4, episode_steps=2, imagenet_photos=0)
    env.reset(seed=0)
    *_, info = env.step(env.action_space.sample())
    assert env.trainer.headline == "target_mean_class_acc" and "loss" in info
    with pytest.raises(UserInputError, match="unknown task 'nope'; choose one of 'syndigits'"):
        ASGEnv(task="nope")
