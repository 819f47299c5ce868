"""ASG Table 4 on an embedded task: does a better starting point still matter after domain adaptation?

Three starting points, each fine-tuned on synthetic images only (``apply_policy.py``, domain
generalisation), then adapted to the unlabelled real target with CBST, CRST-MRKLD and
CRST-MRKLD+LRENT (``adapt.py``, domain adaptation), on ``--seeds`` seeds:

* source only: large LR everywhere, no guidance (the paper's "source model");
* ASG, best fixed: large LR + proxy guidance, the best fixed setting by the synthetic held-out
  loss in the task's comparison (results/compare_policies, results/segmentation), never by the target;
* ASG, learned: the committed REINFORCE policy of that comparison + proxy guidance.

Every run uses the learned policy's recorded env configuration (the task's comparison
configuration), so the three differ only in their learning rates and guidance. Seed s
fine-tunes with seed s and adapts with seed s. The table gives the target's headline measure
(mean per-class accuracy, or mIoU) before and after each method, mean ± std over seeds and
the 95 % Student-t CI, and the time per self-training round. Once a start's three
adaptations are done its models are deleted (``--keep-models`` keeps them), so that --out holds
only the small summaries, logs and curves.

    python -m benchmarks.uda_table4 --task syndigits      # resumable: finished runs are kept in --out
    python -m benchmarks.uda_table4 --task digitscenes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import yaml

import adapt
import apply_policy
from agents.loading import read_policy_file
from asg_env.envs.settings import recorded_settings
from asg_env.provenance import stamp_line
from benchmarks.compare_policies import mean_ci

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = {
    "syndigits": {"policy": "results/compare_policies/policies/reinforce.pt", "config": "configs/uda_syndigits.yaml",
                  "headline": "target_mean_class_acc", "label": "real-target mean-class acc %"},
    "digitscenes": {"policy": "results/segmentation/policies/reinforce.pt", "config": "configs/uda_digitscenes.yaml",
                    "headline": "target_miou", "label": "real-target mIoU %"},
}
# name: (policy, λ override); λ None keeps the policy's (proxy guidance on)
INITS = {"source only (large LR, no guidance)": ("large-everywhere", 0.0),
         "ASG, best fixed (large LR + PG)": ("large-everywhere", None),
         "ASG, learned (REINFORCE + PG)": ("POLICY", None)}
NOT_ENV = ("evaluate_target", "eval_every", "device", "data_root", "instances")
FIRST_SEED = 100
METHODS = ("cbst", "crst-mrkld", "crst-mrkld-lrent")  # Table 4's


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=tuple(TASKS), default="syndigits")
    p.add_argument("--seeds", type=int, default=3, help="seeds per starting point and method (at least 3 for claims)")
    p.add_argument("--rounds", type=int, help="self-training rounds (default: the config's, 3)")
    p.add_argument("--out", help="output folder (default: runs/uda/<task>; the published runs are results/uda/<task>)")
    p.add_argument("--override", default="{}", help="JSON env settings on top of the policy's (for tests)")
    p.add_argument("--data-root", help="cache folder of the rendered images")
    p.add_argument("--keep-models", action="store_true",
                   help="keep every model.safetensors (by default a start's are deleted once its three adaptations are done)")
    args = p.parse_args(argv)
    if args.seeds < 1 or (args.rounds is not None and args.rounds < 1):
        p.error("--seeds and --rounds must be at least 1")
    try:
        args.override = json.loads(args.override)
    except json.JSONDecodeError as exc:
        p.error(f"--override is not JSON: {exc}")
    return args


def env_config(task: dict, override: dict, out: str) -> str:
    """The learned policy's env configuration as a config file for the baselines."""
    state = read_policy_file(os.path.join(ROOT, task["policy"]))
    kwargs = {k: v for k, v in recorded_settings(state["env_kwargs"]).items() if k not in NOT_ENV}
    path = os.path.join(out, "env.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump({"env": {"id": state["env_id"], "kwargs": {**kwargs, **override}}}, fh, sort_keys=False)
    return path


def fine_tune(name: str, seed: int, task: dict, config: str, args, out: str) -> str:
    """The start's run folder, with its model (fine-tuned again, the same seeded run, when a
    finished start's model was dropped before all its adaptations were done)."""
    run = os.path.join(out, "fine-tuned", f"{_slug(name)}-seed{seed}")
    if os.path.isfile(os.path.join(run, "model.safetensors")):
        return run
    if os.path.isfile(os.path.join(run, "summary.json")):
        shutil.rmtree(run)
    policy, lam = INITS[name]
    argv = ["--out", run, "--seed", str(seed), "--eval-every", "0", "--device", "cpu"]
    if os.path.isfile(os.path.join(run, "checkpoint.pt")):
        argv = ["--out", run, "--resume"]
    elif policy == "POLICY":
        argv += ["--policy", os.path.join(ROOT, task["policy"])]
        argv += [a for k, v in args.override.items() for a in ("--set", f"env.kwargs.{k}={json.dumps(v)}")]
    else:
        argv += ["--policy", policy, "--config", config]
        if lam is not None:
            argv += ["--set", f"env.kwargs.lam={lam}"]
    if args.data_root:
        argv += ["--data-root", args.data_root]
    if apply_policy.main(argv) != 0:
        raise SystemExit(f"fine-tuning {name} seed {seed} failed")
    return run


def adapt_run(model: str, method: str, seed: int, task: dict, args, out: str, name: str) -> dict:
    run = os.path.join(out, "adapted", f"{_slug(name)}-{method}-seed{seed}")
    if not os.path.isfile(os.path.join(run, "summary.json")):
        if os.path.isfile(os.path.join(run, "checkpoint.pt")):
            argv = ["--out", run, "--resume"]
        else:
            argv = ["--model", model, "--method", method, "--seed", str(seed), "--out", run, "--device", "cpu",
                    "--config", os.path.join(ROOT, task["config"])]
            if args.rounds:
                argv += ["--rounds", str(args.rounds)]
        if args.data_root:
            argv += ["--data-root", args.data_root]
        if adapt.main(argv) != 0:
            raise SystemExit(f"adapting {name} with {method} seed {seed} failed")
    with open(os.path.join(run, "summary.json")) as fh:
        return json.load(fh)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.split(" (")[0].lower()).strip("-")


def cell(values: list[float]) -> str:
    m, s, ci = mean_ci(values)
    return f"{100 * m:.1f} ± {100 * s:.1f} [±{100 * ci:.1f}]"


def main(argv=None) -> int:
    args = parse_args(argv)
    task = TASKS[args.task]
    out = args.out or os.path.join("runs", "uda", args.task)
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    config = env_config(task, args.override, out)
    seeds = [FIRST_SEED + k for k in range(args.seeds)]
    key = task["headline"]
    before: dict[str, list[float]] = {}
    after: dict[tuple[str, str], list[float]] = {}
    round_seconds: list[float] = []
    summaries: list[dict] = []
    for name in INITS:
        for seed in seeds:
            runs = [os.path.join(out, "adapted", f"{_slug(name)}-{m}-seed{seed}") for m in METHODS]
            model = os.path.join(out, "fine-tuned", f"{_slug(name)}-seed{seed}")
            if not all(os.path.isfile(os.path.join(r, "summary.json")) for r in runs):
                model = fine_tune(name, seed, task, config, args, out)
            with open(os.path.join(model, "summary.json")) as fh:
                summaries.append(json.load(fh))
            before.setdefault(name, []).append(summaries[-1]["final"][key])
            for method in METHODS:
                summary = adapt_run(model, method, seed, task, args, out, name)
                summaries.append(summary)
                after.setdefault((name, method), []).append(summary["final"][key])
                round_seconds.append(summary["seconds"] / summary["config"]["rounds"])
            if not args.keep_models:  # 19 MB each: the summaries, logs and curves stay
                for folder in (model, *runs):
                    path = os.path.join(folder, "model.safetensors")
                    if os.path.exists(path):
                        os.remove(path)
    lines = [f"{args.task}: {len(seeds)} seeds {seeds}, the configuration of {task['policy']} "
             f"({config}), self-training settings {task['config']}. {task['label']}, mean ± std over seeds "
             f"[95 % Student-t CI half-width]. One self-training round took {np.mean(round_seconds):.0f} s on average "
             f"(min {np.min(round_seconds):.0f}, max {np.max(round_seconds):.0f}) on this machine. "
             f"Wall time of this invocation {(time.perf_counter() - start) / 60:.1f} min.", "",
             stamp_line(summaries, "summary.json"), "",
             "| starting point | fine-tuned (no adaptation) | " + " | ".join(METHODS) + " |",
             "|---|---|" + "---|" * len(METHODS)]
    for name in INITS:
        lines.append(f"| {name} | {cell(before[name])} | " + " | ".join(cell(after[(name, m)]) for m in METHODS) + " |")
    text = "\n".join(lines)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(text + "\n")
    print(text)
    print(f"results in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
