import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from torch import nn
from torchmetrics.functional.classification import multiclass_confusion_matrix

import apply_policy
from asg_env import UserInputError
from asg_env.tasks.digitscenes import dilate_labels, render_scenes
from asg_env.training.segmentation import BilinearDeconv, DenseKLGuidance, FCN8sHead, iou_from_confusion, patch_logits


@pytest.fixture
def seg_kwargs(cache_dir):
    return dict(data_root=cache_dir, image_size=32, batch_size=8, source_size=32, target_eval_size=16,
                synthetic_eval_size=8, imagenet_photos=2, episode_steps=3)


def test_scenes_are_deterministic_and_labelled_per_pixel():
    images, labels = render_scenes("synthetic", 6, 48, seed=3, progress=False)
    again, labels_again = render_scenes("synthetic", 6, 48, seed=3, progress=False)
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    assert images.shape == (6, 48, 48, 3) and labels.shape == (6, 48, 48) and labels.max() <= 10
    for label in labels:
        digits = set(np.unique(label)) - {0}
        assert 1 <= len(digits) <= 3 and (label == 0).mean() > 0.5  # 2-3 digits (two may repeat), mostly background
    real, real_labels = render_scenes("real", 4, 48, seed=3, progress=False)
    assert real_labels.max() <= 10 and (real_labels > 0).any()
    # The label marks where the real ink is: those pixels differ from the background around them.
    for image, label in zip(real, real_labels):
        ink = label > 0
        assert np.abs(image[ink].astype(float).mean(0) - image[~ink].astype(float).mean(0)).max() > 20


def test_label_dilation_grows_each_digit_over_the_background_only():
    labels = np.zeros((1, 7, 9), dtype=np.uint8)
    labels[0, 3, 2] = 4  # a one-pixel "digit" of class 4
    labels[0, 3, 6] = 2  # and one of class 2, 4 pixels to its right
    assert dilate_labels(labels, 0) is labels
    grown = dilate_labels(labels, 1)
    expected = np.zeros_like(labels)
    expected[0, 2:5, 1:4] = 4
    expected[0, 2:5, 5:8] = 2
    assert np.array_equal(grown, expected)
    # Radius 2: the margins meet in column 4, where the lower class wins; the digits keep theirs.
    grown = dilate_labels(labels, 2)
    assert grown[0, 3, 2] == 4 and grown[0, 3, 6] == 2 and (grown[0, 1:6, 4] == 2).all()
    assert (grown[0, 1:6, 0:4] == 4).all() and (grown[0, 1:6, 5:9] == 2).all() and (grown[0, 0] == 0).all()
    with pytest.raises(ValueError):
        dilate_labels(labels, -1)


def test_miou_from_a_hand_computed_confusion_matrix():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 0]])
    preds = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    confusion = multiclass_confusion_matrix(preds, target, 4, ignore_index=255)
    # true 0: predicted 0 twice, 1 once; true 1: 1 twice; true 2: 2 once, 0 once; class 3 never occurs.
    assert confusion.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    iou, miou = iou_from_confusion(confusion)
    by_hand = [2 / (3 + 3 - 2), 2 / (2 + 3 - 2), 1 / (2 + 1 - 1), 0.0]
    assert iou.tolist() == pytest.approx(by_hand)
    assert miou.item() == pytest.approx(sum(by_hand[:3]) / 3)  # class 3 is absent from labels and predictions


def test_dense_kl_pools_patches_through_the_imagenet_head_by_hand():
    torch.manual_seed(0)
    head = nn.Linear(3, 5)
    student_map, teacher_map = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)

    class Student:
        imagenet_head = head

        def imagenet_logits(self, final_map):
            return patch_logits(head, final_map, 2)

    teacher = patch_logits(head, teacher_map, 2).flatten(1)  # as the teacher cache stores it
    got = DenseKLGuidance()(Student(), student_map, teacher)
    kls = []
    for b in range(2):
        for i in range(2):
            for j in range(2):
                s = head(student_map[b, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean((1, 2)))
                t = head(teacher_map[b, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean((1, 2)))
                p, q = t.softmax(-1), s.softmax(-1)
                kls.append((p * (p.log() - q.log())).sum())
    assert got.item() == pytest.approx(torch.stack(kls).mean().item(), rel=1e-5)
    one = patch_logits(head, student_map, 1)
    assert torch.allclose(one[:, 0], head(student_map.mean((2, 3))))  # grid 1: the whole map, as the official code


@pytest.mark.parametrize("stride", [2, 8])
def test_learned_upsampling_starts_as_bilinear_interpolation(stride):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 7)
    up = BilinearDeconv(3, stride)
    bilinear = torch.nn.functional.interpolate(x, scale_factor=stride, mode="bilinear", align_corners=False)
    assert torch.allclose(up(x, bilinear.shape[-2:]), bilinear, atol=1e-5)  # borders included


def test_fcn8s_decoder_with_learned_upsampling_matches_bilinear_at_start_then_learns():
    torch.manual_seed(0)
    learned, fixed = FCN8sHead((4, 5, 6), 3, "deconv"), FCN8sHead((4, 5, 6), 3, "bilinear")
    for name in ("score_pool3", "score_pool4", "score_fr"):  # non-zero scores, so the upsampling shows
        for conv in (getattr(learned, name), getattr(fixed, name)):
            torch.manual_seed(len(name))
            torch.nn.init.normal_(conv.weight)
    maps = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 4, 4), torch.randn(2, 6, 2, 2)
    out = learned(*maps, (64, 64))
    assert torch.allclose(out, fixed(*maps, (64, 64)), atol=1e-4)
    out.square().mean().backward()
    assert all(getattr(learned, n).deconv.weight.grad.abs().sum() > 0 for n in ("upscore2", "upscore_pool4", "upscore8"))
    odd = torch.randn(1, 4, 10, 10), torch.randn(1, 5, 5, 5), torch.randn(1, 6, 3, 3)  # sizes that do not halve
    assert learned(*odd, (77, 77)).shape == (1, 3, 77, 77)
    scaled = FCN8sHead((4, 5, 6), 3, "deconv", skip_scales=(0.5, 0.25))
    scaled.load_state_dict(learned.state_dict())
    with torch.no_grad():  # the scales multiply the stride-16 and stride-8 maps before scoring
        assert torch.allclose(scaled(*maps, (64, 64)), learned(maps[0] * 0.25, maps[1] * 0.5, maps[2], (64, 64)))
    with pytest.raises(UserInputError, match="upsample must be one of"):
        FCN8sHead((4, 5, 6), 3, "nearest")


@pytest.mark.parametrize("patch_grid", [1, 2])
def test_segmentation_env_starts_at_the_teacher_and_learns(seg_kwargs, patch_grid):
    env = gym.make("SynDigitScenes-v0", evaluate_target=False, patch_grid=patch_grid, **seg_kwargs)
    u = env.unwrapped
    assert u.coordinate_names[-1] == "new_head" and len(u.coordinate_names) == 9
    obs, info = env.reset(seed=0)
    assert info["loss_guidance"] == 0.0 and info["loss_xe"] == pytest.approx(np.log(11), rel=1e-5)  # zero-init scores
    for _ in range(3):
        obs, reward, done, _, info = env.step(np.full(9, 10))
    assert done and info["loss_xe"] < np.log(11) and info["loss_guidance"] > 0


def test_segmentation_evaluation_and_the_target_stays_out_of_training(seg_kwargs):
    env = gym.make("SynDigitScenes-v0", eval_every=1, **seg_kwargs)
    u = env.unwrapped
    env.reset(seed=1)
    before = u.evaluate_target()
    assert before["target_kl"] == pytest.approx(0.0, abs=1e-6) and before["teacher_agreement"] == 1.0
    assert {"target_miou", "target_pixel_acc", "synthetic_miou", "target_iou/background", "target_iou/9"} <= set(before)

    def run():
        obs, _ = env.reset(seed=1)
        trace = [obs]
        for level in (10, 4, 10):
            obs, reward, *_ = env.step(np.full(9, level))
            trace += [obs, np.array([reward])]
        return np.concatenate(trace)

    reference = run()
    u.trainer.task.target.images.fill_(0)
    u.trainer.task.target.labels.fill_(3)
    assert np.array_equal(reference, run())
    check_env(u, skip_render_check=True)


def test_target_eval_size_0_takes_every_real_scene_and_more_is_capped(seg_kwargs, monkeypatch):
    import asg_env.tasks.digitscenes

    monkeypatch.setattr(asg_env.tasks.digitscenes, "REAL_SCENES", 24)  # 2,000 in the shipped task
    for asked, scenes in ((0, 24), (16, 16), (100, 24)):
        env = gym.make("SynDigitScenes-v0", **{**seg_kwargs, "target_eval_size": asked}).unwrapped
        assert len(env.trainer.task.target) == scenes, asked
    first = gym.make("SynDigitScenes-v0", **{**seg_kwargs, "target_eval_size": 16}).unwrapped.trainer.task.target
    assert torch.equal(first.images, env.trainer.task.target.images[:16])  # a smaller set is a prefix of the whole


def test_segmentation_refuses_what_it_does_not_support(seg_kwargs):
    with pytest.raises(UserInputError, match="segmentation takes guidance"):
        gym.make("SynDigitScenes-v0", guidance="l2sp", **seg_kwargs)
    with pytest.raises(UserInputError, match="label_dilation must be a whole number ≥ 0, not -1"):
        gym.make("SynDigitScenes-v0", label_dilation=-1, **seg_kwargs)
    from asg_env.training.backbones import Backbone
    from asg_env.training.segmentation import dense_backbone

    with pytest.raises(UserInputError, match="segmentation is built for"):
        dense_backbone(Backbone(nn.Identity(), nn.Linear(2, 2), "mobilenet"))


@pytest.mark.parametrize("backbone", ["vgg16", "resnet50"])
def test_fcn_on_vgg16_and_resnet50_has_the_papers_coordinates_and_starts_at_the_teacher(backbone):
    """§3.2: FCN-VGG16 has conv1 … conv5, fc6&7 (as convolutions) and the projection and
    upsampling layers; FCN-ResNet50 has conv1, bn1, layer1-4 and the head. θ_o for VGG is
    the ImageNet fc6-fc8 on each patch pooled to 7×7, as ``forward_fc`` after pool5."""
    from asg_env.training.backbones import build_backbone
    from asg_env.training.coordinates import optimization_coordinates
    from asg_env.training.segmentation import DenseTeacher, SegStudentNet, dense_backbone

    parts = build_backbone(backbone, None)
    vgg_classifier = parts.features.classifier.eval() if backbone == "vgg16" else None
    dense = dense_backbone(parts)
    student, teacher = SegStudentNet(dense, 19, patch_grid=2).eval(), DenseTeacher(dense, patch_grid=2)
    names = [c.name for c in optimization_coordinates(student.features, student.new_head)]
    expected = {"vgg16": ["features.0+features.2", "features.5+features.7", "features.10+features.12+features.14",
                          "features.17+features.19+features.21", "features.24+features.26+features.28", "fc", "new_head"],
                "resnet50": ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "new_head"]}[backbone]
    assert names == expected
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        scores, guided = student(x)
        assert scores.shape == (2, 19, 64, 64) and torch.equal(student.imagenet_logits(guided), teacher(x))
        # FCN8sAtOnce scales pool4 and pool3 before scoring them; the other backbones do not.
        assert student.new_head.skip_scales == ((0.01, 0.0001) if backbone == "vgg16" else (1.0, 1.0))
        if backbone == "vgg16":  # fc6 as a 7x7 convolution holds the ImageNet fc6 weights
            conv6 = student.features.fc[0]
            assert torch.equal(conv6.weight.flatten(1), vgg_classifier[0].weight)
            pool5 = student.features.features(x)
            by_hand = vgg_classifier[:6](torch.nn.functional.adaptive_avg_pool2d(pool5, 7).flatten(1))
            assert torch.allclose(student.classify(x), parts.imagenet_head(by_hand), atol=1e-5)


def test_apply_policy_on_the_segmentation_task(tmp_path, cache_dir):
    out = str(tmp_path / "seg")
    argv = ["--env", "SynDigitScenes-v0", "--policy", "classifier-only", "--steps", "2", "--eval-every", "1",
            "--out", out, "--data-root", cache_dir, "--set", "env.kwargs.image_size=32", "--set", "env.kwargs.batch_size=8",
            "--set", "env.kwargs.source_size=32", "--set", "env.kwargs.target_eval_size=16",
            "--set", "env.kwargs.synthetic_eval_size=8", "--set", "env.kwargs.imagenet_photos=2"]
    assert apply_policy.main(argv) == 0
    import csv
    import json

    curve = list(csv.DictReader(open(f"{out}/curve.csv")))
    assert len(curve) == 3 and all(0 <= float(r["target_miou"]) <= 1 and r["target_iou/7"] for r in curve)
    summary = json.load(open(f"{out}/summary.json"))
    assert "best_target_miou_oracle" in summary and summary["final"]["target_kl"] == 0  # classifier-only: θ_s frozen
