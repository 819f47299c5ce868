import importlib
import json
import re
import os
import time

import numpy as np
import pytest
import torch


def _load(name):
    return importlib.import_module(f"benchmarks.{name}")


@pytest.mark.slow
def test_compare_policies_writes_tables_plots_and_resumes(tmp_path, cache_dir, monkeypatch):
    compare = _load("compare_policies")
    out = tmp_path / "cmp"
    tiny = '{"source_size": 160, "batch_size": 8, "image_size": 32, "synthetic_eval_size": 40, "imagenet_photos": 4}'
    argv = ["--out", str(out), "--seeds", "2", "--epochs", "0.5", "--decisions", "2", "--policy-episodes", "1",
            "--target-eval-size", "60", "--env-kwargs", tiny, "--data-root", cache_dir]
    assert compare.main(argv) == 0

    with open(out / "results.jsonl") as fh:
        lines = [json.loads(line) for line in fh]
    assert len(lines) == len(compare.settings()) * 2 == 32
    by_key = {r["key"]: r for r in lines}
    for r in lines:
        assert [c["sgd_step"] for c in r["curve"]] == [0, 10]  # half an epoch of 20 SGD steps
        assert len(r["actions"]) == 2 and r["env_kwargs"]["reward_batch"] == compare.REWARD_BATCH
        for c in r["curve"]:
            for key in ("target_mean_class_acc", "imagenet_top1", "synthetic_acc", "teacher_agreement"):
                assert 0 <= c[key] <= 1
    # Each row's guidance reached the env, and PG is exactly 0 at reset for every setting.
    assert by_key["7. small backbone + L2-SP | seed 100"]["env_kwargs"]["guidance"] == "l2sp"
    assert by_key["1. large LR | seed 100"]["env_kwargs"]["lam"] == 0.0
    assert all(r["curve"][0]["target_kl"] < 1e-6 for r in lines)

    from asg_env.provenance import git_commit

    assert {r["commit"] for r in lines} == {git_commit()}  # each row names the code that made it
    hashes = {r["setting"]: r["settings_hash"] for r in lines}
    assert len(set(hashes.values())) == len(compare.settings())  # and its settings: one hash per setting
    assert all(r["settings_hash"] == hashes[r["setting"]] for r in lines)
    table = (out / "results.md").read_text()
    assert f"Made by commit {git_commit()} with settings hashes" in table
    assert table.count("| 9. ASG: REINFORCE policy + PG |") == 2  # Table 2 row 9 and Fig. 6
    assert "← best fixed" in table and "(oracle)" in table and "[±" in table
    # The table's headline is the mean over seeds of each run's last evaluation.
    row = next(line for line in table.splitlines() if line.startswith("| 1. large LR |"))
    finals = [by_key[f"1. large LR | seed {s}"]["curve"][-1]["target_mean_class_acc"] for s in (100, 101)]
    assert row.split("|")[2].strip().startswith(f"{100 * sum(finals) / 2:.1f} ±")
    for name in ("curves.png", "policies.png", "actions.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Resumable: a rerun skips every finished run and the trained policies.
    before = {p: p.stat().st_mtime for p in (out / "policies").iterdir()}

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run or a trained policy was redone")

    monkeypatch.setattr(compare, "fine_tune", must_not_run)
    monkeypatch.setattr(compare, "ReinforceTrainer", must_not_run)
    assert compare.main(argv) == 0
    assert sum(1 for _ in open(out / "results.jsonl")) == 32
    assert {p: p.stat().st_mtime for p in (out / "policies").iterdir()} == before


def _cell(size, epochs, washout, synthetic_delta=0.0, diverged=False, retention_loss=0.0, kl=0.0):
    return {"image_size": size, "lr_base": 1e-3, "epochs": epochs, "diverged": diverged, "washout": washout,
            "synthetic_at_peak": 0.9, "synthetic_final": 0.9 + synthetic_delta, "retention_loss": retention_loss,
            "target_kl": kl, "qualifies": not diverged and synthetic_delta >= 0}


def test_grid_rule_picks_the_largest_washout_that_qualifies_and_breaks_ties_by_cost():
    grid = _load("grid_syndigits")
    cells = [_cell(32, 4, 0.10, synthetic_delta=-0.05),  # real accuracy fell, but so did synthetic: no
             _cell(64, 4, 0.12, diverged=True),  # diverged: no
             _cell(64, 4, 0.06), _cell(64, 2, 0.055), _cell(32, 1, 0.01)]
    chosen, why = grid.choose(cells)
    assert (chosen["image_size"], chosen["epochs"]) == (64, 2) and "washout" in why  # within 1 point: cheaper


def test_grid_rule_falls_back_to_retention_loss_without_a_clear_washout():
    grid = _load("grid_syndigits")
    cells = [_cell(32, 4, 0.01, retention_loss=0.30), _cell(64, 4, 0.015, retention_loss=0.55, kl=3.0),
             _cell(64, 2, 0.0, retention_loss=0.20)]
    chosen, why = grid.choose(cells)
    assert (chosen["image_size"], chosen["epochs"]) == (64, 4) and "retention" in why


def test_bench_gpu_runs_at_a_tiny_size_on_cpu(capsys):
    bench = _load("bench_gpu")
    argv = ["--device", "cpu", "--backbone", "efficientnet_lite0", "--image-size", "32", "--batch-size", "4",
            "--steps", "2", "--warmup", "1", "--source-size", "8", "--compile", "aot_eager"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| fp32 |")]
    assert [r.split("|")[2].strip() for r in rows] == [
        "plain loop", "plain loop + PG (teacher run)", "trainer", "trainer + PG (teacher run)",
        "trainer + PG (teacher cached)", "env.step + PG (teacher cached)", "plain loop, compiled",
        "trainer + PG (teacher cached), compiled", "env.step + PG (teacher cached), compiled"]
    assert all(float(r.split("|")[3]) > 0 for r in rows)
    assert "env.step / trainer = " in out and "(goal ≥ 0.95)" in out
    assert "compiled (aot_eager): trainer / eager trainer = " in out


def test_fig8_action_table_averages_seeds_then_decisions():
    compare = _load("compare_segmentation")
    runs = [{"actions": [[0, 10], [2, 8], [4, 6], [6, 4]]}, {"actions": [[2, 10], [4, 8], [6, 6], [8, 4]]}]
    lines = compare.action_table(runs, ["conv", "head"], tail=1)
    # conv: per-decision means 1, 3, 5, 7 → whole 4.0, first half 2.0, last 7.0; head: 7.0, 9.0, 4.0.
    assert lines[2:] == ["| conv | 4.0 | 2.0 | 7.0 |", "| head | 7.0 | 9.0 | 4.0 |"]


def test_segmentation_summary_leaves_diverged_runs_out():
    compare = _load("compare_segmentation")
    start = {"target_miou": 0.07, "synthetic_miou": 0.07, "target_kl": 0.0, "imagenet_top1": 0.85}

    def run(miou, diverged=False):
        end = {**start, "target_miou": miou, "target_kl": 1.0}
        return {"diverged": diverged, "curve": [start] if diverged else [start, end]}

    row = compare.summarise([run(0.3), run(0.5), run(0.0, diverged=True)])
    assert row["diverged"] == 1 and row["target_miou"][0] == pytest.approx(0.4)
    assert row["best_target_miou_oracle"][0] == pytest.approx(0.4)
    gone = compare.summarise([run(0.0, diverged=True)] * 3)
    assert gone["diverged"] == 3 and np.isnan(gone["target_miou"][0]) and np.isnan(gone["target_kl"][0])


def test_compare_segmentation_writes_fig7_and_fig8_and_resumes(tmp_path, cache_dir, monkeypatch):
    compare = _load("compare_segmentation")
    out = tmp_path / "seg"
    tiny = ('{"image_size": 32, "batch_size": 8, "source_size": 32, "target_eval_size": 16, '
            '"synthetic_eval_size": 8, "imagenet_photos": 2}')
    argv = ["--out", str(out), "--seeds", "2", "--sgd-steps", "4", "--decisions", "2", "--evaluations", "1",
            "--policy-episodes", "1", "--lams", "0.1,1", "--env-kwargs", tiny, "--data-root", cache_dir]
    assert compare.main(argv) == 0
    lines = [json.loads(line) for line in open(out / "results.jsonl")]
    assert len(lines) == (len(compare.SETTINGS) + 1) * 2  # λ = 0.1 is already a Fig. 7 row
    for r in lines:
        assert [c["sgd_step"] for c in r["curve"]] == [0, 4] and len(r["actions"]) == 2
        assert all(0 <= c["target_miou"] <= 1 for c in r["curve"]) and r["curve"][0]["target_kl"] < 1e-6
    table = (out / "results.md").read_text()
    assert "| REINFORCE policy + PG |" in table and "[±" in table and "| background |" in table
    assert "| new_head |" in table and "Fig. 8 in numbers" in table
    assert "| small backbone + large decoder + PG, λ = 1 |" in table
    for bad in ("0,1", "x"):
        with pytest.raises(SystemExit):
            compare.main(argv[:-6] + ["--lams", bad])
    for name in ("miou.png", "actions.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setattr(compare, "fine_tune", lambda *a, **k: (_ for _ in ()).throw(AssertionError("redone")))
    monkeypatch.setattr(compare, "ReinforceTrainer", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    assert compare.main(argv) == 0


@pytest.mark.slow
def test_l2o_benchmark_accounts_every_budget_refuses_other_code_and_resumes(tmp_path, cache_dir, monkeypatch):
    import optuna
    from dataclasses import replace
    from test_cli import _tiny_instances

    from asg_env.envs.instances import FAMILIES
    from asg_env.training.trainer import Trainer
    from benchmarks import learning_gate

    bench = _load("l2o_benchmark")
    tiny = replace(FAMILIES["syndigits"], meta_training={"image_size": 32, "epochs": 1, "synthetic_eval_size": 16})
    monkeypatch.setitem(FAMILIES, "syndigits", tiny)
    monkeypatch.setitem(learning_gate.AGENTS, "es", {"pairs": 1, "sigma": 0.05, "lr": 0.03})
    out = tmp_path / "l2o"
    argv = ["--instances", _tiny_instances(tmp_path, cache_dir), "--out", str(out), "--episodes", "2",
            "--policy-seeds", "2", "--seeds", "3", "--tune-instances", "1", "--test-trials", "3",
            "--pilot-instances", "2", "--test-instances", "2", "--bootstrap-reps", "200", "--jobs", "1", "--override", "{}"]
    evaluations = []
    evaluate = Trainer.evaluate
    monkeypatch.setattr(Trainer, "evaluate", lambda self: evaluations.append(1) or evaluate(self))
    assert bench.main(argv) == 0

    runs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    methods = {r["method"] for r in runs}
    assert len(methods) == 2 + 3 + 1 + 5 and len(runs) == 11 * 2 * 3  # every method × test instance × seed, once
    assert len(evaluations) == len(runs)  # the real target is read by the evaluation runs alone
    for r in runs:
        assert {"commit", "settings_hash", "code_hash", "score_loss", "initial_loss", "diverged", "capped",
                "synthetic_acc", "method", "instance", "seed"} <= set(r)
        assert r["score_loss"] <= r["initial_loss"] and r["capped"] == (r["diverged"] or r["score_loss"] >= r["initial_loss"])
    learned = [r for r in runs if r["method"] == "ES (meta-trained)"]
    policies = {r["seed"]: r["identity"] for r in learned if r["instance"] == 0}
    assert policies[100] == policies[102] != policies[101]  # run seed k uses policy k mod 2

    design = json.loads((out / "design.json").read_text())
    assert design["sigma"] > 0 and design["instances"] >= 12 and len(design["runs"]) == 3 * 2 * 3
    summary = {s["agent"]: s for s in json.loads((out / "gate" / "summary.json").read_text())}
    budget = round(np.mean([s["sgd_steps"] / s["seeds"] for s in summary.values()]))
    storage = f"sqlite:///{out / 'optuna.db'}"
    studies = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    for kind in ("global", "llrd", "cosine"):
        name = next(n for n in studies if n.startswith(f"{kind}-train-"))
        trials = optuna.load_study(study_name=name, storage=storage).trials
        spent = [t.user_attrs["sgd_steps"] for t in trials]
        assert spent and (sum(spent) <= budget or len(spent) == 1)
        assert sum(spent) + spent[-1] > budget or (kind == "global" and len(trials) == 10)
        if kind == "global":  # every level once, lowest first
            assert [t.params["level"] for t in trials] == list(range(1, len(trials) + 1))
    for j in (0, 1):
        trials = optuna.load_study(study_name=next(n for n in studies if n.startswith(f"test{j}-")), storage=storage).trials
        assert len(trials) == 3 and trials[0].params["kind"] == "llrd" and trials[1].params["kind"] == "cosine"

    table = (out / "results.md").read_text()
    assert "**Minimum detectable effect**" in table.splitlines()[2] and runs[0]["commit"] in table
    assert all(f"| {m} | " in table for m in methods) and "| ES (meta-trained) | cosine tuned on train |" in table
    meta_training = sum(s["wall_s"] for s in summary.values()) / 60  # the stage an l2o rerun cannot time itself
    assert f"(summed over the 4 policies; `--jobs` ran them side by side) | {meta_training:.1f} min |" in table
    for name in ("scores.png", "profiles.png", "learning_curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    before = (out / "results.jsonl").read_text()
    evaluations.clear()
    assert bench.main([*argv, "--publish", "--results", str(tmp_path / "results")]) == 0  # a rerun finds everything done
    assert (out / "results.jsonl").read_text() == before and not evaluations
    published = tmp_path / "results" / "l2o"
    assert (published / "results.jsonl").read_text() == before
    assert (published / "results.md").read_text() == (out / "results.md").read_text()
    assert {p.name for p in published.iterdir()} >= {"design.json", "summary.json", "profiles.png", "scores.png"}

    monkeypatch.setattr(bench, "code_hash", lambda: "other-code")
    with pytest.raises(SystemExit, match="made by other code"):
        bench.main(argv)
    assert bench.main([*argv, "--drop-stale"]) == 0  # moved aside, then redone
    assert (out / "stale.jsonl").read_text() == before and len(evaluations) == len(runs)
    assert {json.loads(line)["code_hash"] for line in (out / "results.jsonl").read_text().splitlines()} == {"other-code"}
    with pytest.raises(SystemExit, match="other settings"):
        bench.main([*argv[:-2], "--override", '{"lam": 0.2}'])


def _csv(path):
    import csv

    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_uda_table4_adapts_every_starting_point_with_every_method_and_resumes(tmp_path, cache_dir):
    table4 = _load("uda_table4")
    out = tmp_path / "uda"
    tiny = json.dumps({"source_size": 160, "batch_size": 8, "image_size": 32, "synthetic_eval_size": 40,
                       "imagenet_photos": 4, "target_eval_size": 60, "epochs": None, "sgd_steps": 4, "episode_steps": 2})
    argv = ["--out", str(out), "--seeds", "2", "--rounds", "1", "--override", tiny, "--data-root", cache_dir]
    assert table4.main(argv) == 0
    runs = sorted(p.name for p in (out / "adapted").iterdir())
    assert len(runs) == 3 * 3 * 2 and len(list((out / "fine-tuned").iterdir())) == 3 * 2
    source = json.load(open(out / "fine-tuned" / "source-only-seed100" / "summary.json"))
    learned = json.load(open(out / "fine-tuned" / "asg--learned-seed101" / "summary.json"))
    assert source["env_kwargs"]["lam"] == 0 and learned["env_kwargs"]["lam"] == 0.1
    assert source["sgd_steps"] == learned["sgd_steps"] == 4  # the same configuration for every start
    one = json.load(open(out / "adapted" / "asg--best-fixed-crst-mrkld-lrent-seed100" / "summary.json"))
    assert one["method"] == "crst-mrkld-lrent" and one["final"]["round"] == 1
    table = (out / "results.md").read_text()
    for name in table4.INITS:
        assert f"| {name} |" in table
    assert "| starting point | fine-tuned (no adaptation) | cbst | crst-mrkld | crst-mrkld-lrent |" in table
    assert not list(out.rglob("model.safetensors"))  # a finished start's models are dropped
    stamps = {p.name: (p / "summary.json").stat().st_mtime_ns for p in (out / "adapted").iterdir()}
    assert table4.main(argv) == 0  # a rerun finds every run done
    assert {p.name: (p / "summary.json").stat().st_mtime_ns for p in (out / "adapted").iterdir()} == stamps
    lost = out / "adapted" / "source-only-crst-mrkld-seed101"
    import shutil

    shutil.rmtree(lost)  # a start missing one adaptation is fine-tuned again (the same seeded run) for it
    assert table4.main(argv) == 0
    assert json.load(open(lost / "summary.json"))["method"] == "crst-mrkld"
    assert (out / "results.md").read_text().splitlines()[2:] == table.splitlines()[2:]


@pytest.mark.slow
def test_learning_gate_meta_trains_evaluates_pairs_and_resumes(tmp_path, cache_dir, monkeypatch):
    from test_cli import _tiny_instances

    from benchmarks import learning_gate as gate

    monkeypatch.setitem(gate.AGENTS, "es", {"pairs": 1, "sigma": 0.05, "lr": 0.03})
    from dataclasses import replace

    from asg_env.envs.instances import FAMILIES

    tiny = replace(FAMILIES["syndigits"], meta_training={"image_size": 32, "epochs": 1, "synthetic_eval_size": 16})
    monkeypatch.setitem(FAMILIES, "syndigits", tiny)
    out = tmp_path / "gate"
    argv = ["--instances", _tiny_instances(tmp_path, cache_dir), "--out", str(out), "--episodes", "2",
            "--seeds", "2", "--run-seeds", "1", "--jobs", "2"]
    results = tmp_path / "results"
    assert gate.main([*argv, "--publish", "--results", str(results)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [s["agent"] for s in summary] == ["reinforce", "es"]
    for s in summary:
        assert s["seeds"] == 2 and s["episodes"] == 2 and s["cases"] == 2 * 3 * 1 and s["sgd_steps"] > 0
        assert s["ci_low"] <= s["ci_high"] and s["passed"] == (s["ci_high"] < 0 and (s["entropy_ratio"] or 0) <= 0.8)
    assert summary[1]["entropy_ratio"] is None and 0 < summary[0]["entropy_ratio"] <= 1
    rows = [json.loads(line) for line in (out / "evaluation.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 2 * 3  # trained (2 agents), random, init × policy seeds × instances
    assert all(r["score"] <= r["initial"] for r in rows)
    init = [r for r in rows if r["method"] == "init"]
    assert len({(r["instance"], r["score"]) for r in init}) > 1
    # the init policy is the seed's untrained network: REINFORCE and ES of one seed start from it
    a = torch.load(out / "init-seed0.pt", weights_only=True)["state_dict"]
    trained = torch.load(out / "reinforce-seed0" / "policy.pt", weights_only=True)["state_dict"]
    assert not torch.equal(a["lstm.weight_ih"], trained["lstm.weight_ih"])
    assert (out / "curves.png").stat().st_size > 0 and "| reinforce |" in (out / "results.md").read_text()
    assert {r["commit"] for r in rows} == {summary[0]["commit"]} and summary[0]["meta_training_commits"]
    for s in summary:
        assert len(s["seed_scores"]) == 2 and np.isclose(np.mean(s["seed_scores"]), s["loss_trained"])
        assert (results / "policies" / f"{s['agent']}-syndigits" / "policy.pt").exists() == s["passed"]  # never a failed one
    assert sorted(os.listdir(results / "learning_gate" / "syndigits")) == [
        "curves.png", "evaluation.jsonl", "results.md", "summary.json"]
    # a passing agent's best seed goes out with its card, and applies
    args = gate.parse_args([*argv, "--results", str(results)])
    runs = {a: [str(out / f"{a}-seed{p}") for p in range(2)] for a in gate.AGENTS}
    es = {**summary[1], "passed": True, "seed_scores": [2.0, 1.0]}
    dest = gate.publish_policy(args, runs, es)
    card = json.loads(open(os.path.join(dest, "card.json")).read())
    assert card["policy_seed"] == 1 and card["agent"] == "es" and card["episodes"] == 2 and card["sgd_steps"] > 0
    assert card["gate"]["ci_high"] == es["ci_high"] and card["meta_training_commits"]
    shipped = torch.load(os.path.join(dest, "policy.pt"), weights_only=True)["state_dict"]
    assert torch.equal(shipped["heads.weight"], torch.load(out / "es-seed1" / "policy.pt", weights_only=True)["state_dict"]["heads.weight"])

    # a rerun trains and evaluates nothing again
    monkeypatch.setattr(gate, "score_run", lambda *a: pytest.fail("an evaluation run was redone"))
    monkeypatch.setattr(gate, "meta_train_command", lambda *a: pytest.fail("a meta-training was redone"))
    assert gate.main(argv) == 0


def test_benchmarks_are_modules_of_a_package_without_path_edits():
    folder = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
    names = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f != "__init__.py")
    assert len(names) >= 10
    for name in names:
        with open(os.path.join(folder, f"{name}.py")) as fh:
            assert "sys.path" not in fh.read(), name
        assert _load(name).__name__ == f"benchmarks.{name}"


def test_robust_aggregates_rank_lower_scores_first_and_see_a_clear_improvement(tmp_path):
    bench = _load("l2o_benchmark")
    rng = np.random.default_rng(0)
    n_seeds, n_inst = 3, 12
    methods = ["A (meta-trained)", "llrd tuned on train", "noise"]
    shift = {"A (meta-trained)": 0.0, "llrd tuned on train": 0.3, "noise": 0.15}
    base = rng.uniform(0.5, 1.5, size=(n_inst, n_seeds))  # paired: the same instance is hard for both
    norm = {(m, j): base[j] + shift[m] + 0.01 * rng.normal(size=n_seeds) for m in methods for j in range(n_inst)}
    lines, found = bench.robust_aggregates(norm, methods, methods[:1], methods[1:2], n_inst, 500, str(tmp_path))
    iqm = {m: v[0] for m, v in found["iqm"].items()}
    assert iqm["A (meta-trained)"] < iqm["noise"] < iqm["llrd tuned on train"]  # lower is better
    assert all(low <= mid <= high for mid, low, high in found["iqm"].values())
    row = next(line for line in lines if line.startswith("| A (meta-trained) | llrd tuned on train"))
    p_improvement, wilcoxon_p = float(row.split(" | ")[2].split()[0]), float(row.split(" | ")[3].rstrip(" |"))
    assert p_improvement > 0.5 and wilcoxon_p < 1e-3  # A scores lower on every instance and seed
    for name in ("profiles.png", "scores.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_results_line_cut_by_a_kill_is_dropped_and_its_run_redone(tmp_path):
    bench = _load("l2o_benchmark")
    path = tmp_path / "results.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
    assert bench.read_rows(str(path)) == [{"a": 1}, {"a": 2}]
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'  # appends continue on a whole line
    assert bench.read_rows(str(tmp_path / "none.jsonl")) == []


def test_a_killed_stage_still_adds_its_time_and_a_later_invocation_adds_to_it(tmp_path):
    bench = _load("l2o_benchmark")
    with pytest.raises(SystemExit):  # what SIGTERM becomes in the command
        with bench.Costs(str(tmp_path)).stage("4 evaluation"):
            time.sleep(0.05)
            raise SystemExit(143)
    killed = json.loads((tmp_path / "stages.json").read_text())["4 evaluation"]
    assert killed >= 0.05
    costs = bench.Costs(str(tmp_path))
    with costs.stage("4 evaluation"):
        pass
    assert costs.seconds["4 evaluation"] > killed
    assert json.loads((tmp_path / "stages.json").read_text()) == costs.seconds


def test_power_design_needs_more_instances_for_a_wider_spread_and_never_fewer_than_twelve():
    bench = _load("l2o_benchmark")
    needed, design, mde = bench.required_instances(0.1)
    assert needed == design == 34 and mde <= bench.EFFECT < bench.mde_at(0.1, 33)
    assert bench.required_instances(0.2)[0] > 4 * 30  # quadrupled: twice the spread
    small = bench.required_instances(0.01)
    assert small[0] < 12 and small[1] == 12 and small[2] < 0.05
    scores = {("a", 0): [1.0, 1.2], ("b", 0): [2.0, 2.0], ("a", 1): [0.5, 0.5], ("b", 1): [0.4, 0.6]}
    norm = bench.normalise(scores, {0: [2.1, 2.1], 1: [1.5, 1.5]})
    assert np.allclose(norm[("a", 0)], [-0.1, 0.1]) and np.allclose(norm[("b", 0)].mean(), 0.9 / 1.0)
    assert np.allclose(norm[("a", 1)], [0, 0]) and np.allclose(norm[("b", 1)], [-0.1, 0.1])
    stuck = bench.normalise({("a", 0): [2.0, 2.0], ("b", 0): [2.0, 2.0]}, {0: [2.0, 2.0]})
    assert np.allclose(stuck[("a", 0)], 1) and np.allclose(stuck[("b", 0)], 1)  # no progress anywhere: 1, not 0
    with pytest.raises(SystemExit, match="spread"):
        bench.required_instances(float("nan"))