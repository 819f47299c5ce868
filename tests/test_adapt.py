"""CBST / CRST (asg_env/adaptation/self_training.py, adapt.py): each rule by hand, then whole runs."""

import csv
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_cli import TINY

import adapt
import apply_policy
from asg_env.adaptation.self_training import (
    IGNORE,
    ConfidenceCollector,
    SelfTrainingConfig,
    hard_labels,
    one_hot,
    self_training_loss,
    soft_labels,
)

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def test_class_thresholds_take_each_classs_top_portion_of_its_own_predictions():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.45, 0.55]])
    collector = ConfidenceCollector(3)
    collector.add(probs[:2])
    collector.add(probs[2:])  # batches add up
    thresholds = collector.thresholds(0.5)
    # class 0: 0.9, 0.8, 0.7, 0.6 → floor(4 · 0.5) = 2nd largest; class 1: floor(0.5) = 0 → 1.0; class 2 unseen → 1.0
    np.testing.assert_allclose(thresholds, [0.8, 1.0, 1.0])
    np.testing.assert_allclose(collector.thresholds(1.0)[:2], [0.6, 0.55])


def test_pixel_confidences_are_subsampled_per_image_and_class():
    probs = torch.zeros(1, 2, 2, 4)
    probs[0, 0] = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.5, 0.4, 0.3, 0.2]]) + 0.5  # class 0 wins everywhere
    collector = ConfidenceCollector(2, ds_rate=4)
    collector.add(probs)
    assert np.concatenate(collector.values[0]).tolist() == pytest.approx([1.4, 1.0])  # pixels 0 and 4


def test_hard_labels_divide_by_the_thresholds_and_ignore_below_one():
    probs = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.55, 0.45]])
    labels = hard_labels(probs, np.array([0.8, 0.35]))
    # p/λ: [0.75, 1.14] → 1; [0.375, 2.0] → 1; [0.69, 1.29] → 1 (the rarer class wins on its own scale)
    assert labels.tolist() == [1, 1, 1]
    labels = hard_labels(probs, np.array([0.5, 0.9]))
    assert labels.tolist() == [0, IGNORE, 0]  # [1.2, .44]; [.6, .78] < 1; [1.1, .5]


def test_soft_labels_follow_lrents_formula_and_selection():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.34, 0.33, 0.33]])
    lam, alpha = np.array([0.6, 0.5, 0.9]), 0.25
    soft = soft_labels(probs, lam, alpha)
    for i in range(2):
        w = (probs[i].numpy() / lam) ** (1 / alpha)
        y = w / w.sum()
        reg = (-y * np.log(probs[i].numpy()) + alpha * y * np.log(y)).sum()
        keep = reg < (-y * np.log(lam)).sum()
        np.testing.assert_allclose(soft[i].numpy(), y * keep, rtol=1e-5)
    assert soft[0].sum() == pytest.approx(1.0) and soft[1].sum() == 0  # the confident row kept, the flat one not


def test_loss_is_the_labelled_cross_entropy_plus_the_target_mrkld_term():
    torch.manual_seed(0)
    logits = torch.randn(4, 3)
    labels = torch.tensor([0, IGNORE, 2, 1])
    is_target = torch.tensor([False, True, True, True])
    logp = torch.log_softmax(logits, 1)
    ce = -(logp[0, 0] + logp[2, 2] + logp[3, 1]) / 3
    assert self_training_loss(logits, labels, is_target) == pytest.approx(float(ce))
    kld = -(logp[2].mean() + logp[3].mean()) / 2  # the target's labelled samples only
    assert self_training_loss(logits, labels, is_target, 0.1) == pytest.approx(float(ce + 0.1 * kld))
    soft = one_hot(labels, 3)  # hard labels as soft ones give the same loss
    assert self_training_loss(logits, soft, is_target, 0.1) == pytest.approx(float(ce + 0.1 * kld))
    seg = self_training_loss(logits.T.reshape(1, 3, 2, 2), labels.view(1, 2, 2), torch.tensor([True]))
    assert seg == pytest.approx(float(ce))  # per pixel, the same rule


def test_portions_grow_each_round_up_to_their_caps():
    cfg = SelfTrainingConfig(rounds=8)
    tgt, src = 0.2, 0.03
    for r in range(14):  # summed round by round, as crst_seg.py does (0.03 + 2 × 0.0025 is not 0.035 in floats)
        assert cfg.portions(r) == (tgt, src)
        tgt, src = min(tgt + 0.05, 0.5), min(src + 0.0025, 0.06)
    assert cfg.portions(20) == (0.5, 0.06)
    assert SelfTrainingConfig(method="crst-mrkld-lrent").weights == (0.1, 0.25)


@pytest.fixture
def fine_tuned(tmp_path, cache_dir):
    out = str(tmp_path / "fine-tuned")
    assert apply_policy.main(["--policy", "small-backbone-large-classifier", "--steps", "6", "--out", out,
                              "--data-root", cache_dir, *TINY[2:]]) == 0
    return out


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_adapt_runs_every_method_and_never_reads_the_target_labels(fine_tuned, tmp_path, cache_dir, monkeypatch):
    before = load_file(os.path.join(fine_tuned, "model.safetensors"))
    out = str(tmp_path / "lrent")
    assert adapt.main(["--model", fine_tuned, "--method", "crst-mrkld-lrent", "--rounds", "2", "--out", out,
                       "--config", os.path.join(CONFIGS, "uda_syndigits.yaml")]) == 0
    rows = _rows(os.path.join(out, "rounds.csv"))
    assert [r["round"] for r in rows] == ["0", "1", "2"]
    assert [float(r["target_portion"]) for r in rows[1:]] == [0.2, 0.25]
    assert 0 < float(rows[1]["pseudo_labelled"]) <= 1 and int(rows[1]["source_images"]) == 4  # floor(160 · 0.03)
    adapted = load_file(os.path.join(out, "model.safetensors"))
    assert any(not torch.equal(before[k], adapted[k]) for k in before)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["method"] == "crst-mrkld-lrent" and not os.path.exists(os.path.join(out, "checkpoint.pt"))

    load = adapt.load_model

    def poisoned(*args, **kwargs):  # the same images, every label moved on by one class
        trainer = load(*args, **kwargs)
        trainer.task.target.labels = (trainer.task.target.labels + 1) % 10
        return trainer

    for method in ("cbst", "crst-mrkld"):
        runs = {}
        for name, loader in (("clean", load), ("poisoned", poisoned)):
            monkeypatch.setattr(adapt, "load_model", loader)
            run = str(tmp_path / f"{method}-{name}")
            assert adapt.main(["--model", os.path.join(fine_tuned, "model.safetensors"), "--method", method,
                               "--rounds", "1", "--out", run]) == 0
            runs[name] = (load_file(os.path.join(run, "model.safetensors")), _rows(os.path.join(run, "rounds.csv")))
        assert all(torch.equal(runs["clean"][0][k], runs["poisoned"][0][k]) for k in before)  # the same trajectory
        scores = {name: [runs[name][1][1][k] for k in ("target_acc", "target_mean_class_acc")] for name in runs}
        assert scores["clean"] != scores["poisoned"]  # the evaluation saw the poisoned labels; training did not


def test_a_killed_adaptation_resumes_to_the_uninterrupted_result(fine_tuned, tmp_path, monkeypatch, one_thread):
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    assert adapt.main(["--model", fine_tuned, "--method", "crst-mrkld", "--rounds", "2", "--out", whole]) == 0
    real = adapt.adapt

    def killed_after_the_first_checkpoint(trainer, cfg, on_round=None, checkpoint=None, resume=None):
        def save_then_die(state):
            checkpoint(state)
            raise KeyboardInterrupt
        return real(trainer, cfg, on_round, save_then_die, resume)

    monkeypatch.setattr(adapt, "adapt", killed_after_the_first_checkpoint)
    assert adapt.main(["--model", fine_tuned, "--method", "crst-mrkld", "--rounds", "2", "--out", parts]) == 130
    monkeypatch.setattr(adapt, "adapt", real)
    assert torch.load(os.path.join(parts, "checkpoint.pt"), weights_only=True)["history"][-1]["round"] == 1
    assert adapt.main(["--out", parts, "--resume"]) == 0
    a, b = (load_file(os.path.join(d, "model.safetensors")) for d in (whole, parts))
    assert all(torch.equal(a[k], b[k]) for k in a)
    same = ("round", "pseudo_labelled", "train_loss", "target_acc")
    assert [[r[k] for k in same] for r in _rows(os.path.join(parts, "rounds.csv"))] == \
        [[r[k] for k in same] for r in _rows(os.path.join(whole, "rounds.csv"))]


@pytest.mark.parametrize("argv, message", [
    (["--method", "cbst"], "--model is required"),
    (["--model", "nowhere"], "not found"),
    (["--model", "FINE", "--set", "lr_ratio=-1"], "lr_ratio must be"),
    (["--model", "FINE", "--set", "portion=0.3"], "unknown setting self_training.portion"),
    (["--model", "FINE", "--rounds", "0"], "rounds must be"),
    (["--out", "OUT", "--resume"], "checkpoint not found"),
    (["--out", "OUT", "--resume", "--method", "cbst"], "drop --method"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, fine_tuned, tmp_path, capsys):
    argv = [a.replace("FINE", fine_tuned).replace("OUT", str(tmp_path / "none")) for a in argv]
    assert adapt.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_segmentation_adapts_with_per_pixel_pseudo_labels(tmp_path, cache_dir):
    out = str(tmp_path / "scenes")
    tiny = ["--env", "SynDigitScenes-v0", "--set", "env.kwargs.source_size=16", "--set", "env.kwargs.batch_size=4",
            "--set", "env.kwargs.target_eval_size=8", "--set", "env.kwargs.synthetic_eval_size=0",
            "--set", "env.kwargs.imagenet_photos=0", "--set", "env.kwargs.image_size=64", "--data-root", cache_dir]
    assert apply_policy.main(["--policy", "classifier-only", "--steps", "2", "--out", out, *tiny]) == 0
    adapted = str(tmp_path / "adapted")
    assert adapt.main(["--model", out, "--method", "crst-mrkld", "--rounds", "1", "--out", adapted,
                       "--config", os.path.join(CONFIGS, "uda_digitscenes.yaml")]) == 0
    rows = _rows(os.path.join(adapted, "rounds.csv"))
    assert len(rows) == 2 and 0 < float(rows[1]["pseudo_labelled"]) < 1 and 0 <= float(rows[1]["target_miou"]) <= 1
