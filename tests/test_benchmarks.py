import csv
import importlib.util
import math
import os

import sys

import pytest


def _load(name):
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_compare_policies_writes_well_formed_tables_and_plots(tmp_path, cache_dir):
    compare = _load("compare_policies")
    out = tmp_path / "cmp"
    argv = ["--out", str(out), "--seeds", "2", "--steps", "4", "--eval-every", "2", "--policy-episodes", "1",
            "--policy-steps", "4", "--source-size", "160", "--target-eval-size", "60", "--batch-size", "8",
            "--data-root", cache_dir]
    assert compare.main(argv) == 0

    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    names = {r["setting"] for r in rows}
    assert len(rows) == len(compare.settings()) == 13
    assert {"large LR", "large LR + PG", "FC only + PG", "random + PG", "REINFORCE (learned) + PG",
            "RecurrentPPO (learned) + PG", "small backbone + large FC, λ=0.01"} <= names
    for r in rows:
        assert r["seeds"] == "2"
        for key in ("final_acc", "final_mean_class_acc", "best_acc", "best_mean_class_acc", "teacher_agreement"):
            value, std = float(r[key]), float(r[f"{key}_std"])
            assert 0 <= value <= 1 and math.isfinite(std) and std >= 0

    table = (out / "results.md").read_text()
    assert table.count("| REINFORCE (learned) + PG |") == 1 and "±" in table
    with open(out / "curves.csv") as fh:
        curve = list(csv.DictReader(fh))
    assert {int(r["sgd_step"]) for r in curve} == {0, 2, 4} and len(curve) == 13 * 2 * 3
    # The table's "final" is the mean over seeds of each run's last evaluation in the curves.
    for r in rows:
        last = [float(c["target_acc"]) for c in curve if c["setting"] == r["setting"] and c["sgd_step"] == "4"]
        assert len(last) == 2 and float(r["final_acc"]) == pytest.approx(sum(last) / 2)
    # Learned policies were trained and evaluated with the same observation (reward batch).
    import torch

    state = torch.load(out / "policies" / "reinforce.pt", weights_only=True)
    assert state["env_kwargs"]["reward_batch"] == compare.REWARD_BATCH
    for name in ("curves.png", "actions.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "policies" / "reinforce.pt").is_file() and (out / "policies" / "recurrent_ppo.pt").is_file()
