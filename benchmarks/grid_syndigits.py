"""Choose SynDigits-v0's settings honestly: a grid of runs *without* any guidance, and a rule
written down before any guidance or policy result was looked at.

Grid (fixed before running):
  * image size: 32, 64 px
  * η_base: 3e-4, 1e-3, 3e-3 (official SGD, momentum 0.9, weight decay 5e-4, constant rate;
    2e-2, the earlier default, diverges under large LR)
  * run length: 1, 2, 4 epochs of a 2,000-image synthetic source (batch 32: 62 SGD steps an
    epoch); a constant-rate run of length L is the first L epochs of the 4-epoch run, so each
    length is read off the same curve
  * settings: large LR everywhere (all levels 10), small backbone + large classifier (backbone
    level 1, classifier 10), classifier only (backbone 0, classifier 10); λ = 0
  * seeds 0, 1, 2; evaluation every half epoch on 500 real MNIST digits, 500 held-out
    synthetic digits and the 20 ImageNet photos

Rule (fixed before running; it uses only these runs without guidance):
  1. For each cell (image size, η_base, run length L) take the large-LR runs, averaged over the
     seeds: A(t), real-target mean per-class accuracy, and S(t), synthetic held-out accuracy,
     at the evaluation points t ≤ L. Let t* be the point where A peaks.
  2. A cell qualifies when no large-LR seed diverged and synthetic accuracy did not fall after
     the real-target peak: S(L) ≥ S(t*) (fine-tuning goes on fitting the synthetic task while
     real accuracy washes out).
  3. The default is the qualifying cell with the largest washout W = A(t*) − A(L).
  4. If no cell has W ≥ 2 points, the default is instead the cell with the largest loss of
     ImageNet retention under large LR at L (teacher top-1 − θ_o top-1 on the 20 photos, then
     KL(teacher ‖ θ_o) on the real target).
  5. Cells within 1 point of the best are tied; the tie goes to the cheaper cell (smaller image,
     then shorter run).

Outputs in --out: results.jsonl (one line per run, with its whole curve; a rerun skips the runs
already there), and with --report, grid.md (every cell, every setting, the rule and the choice)
and grid.png (the mean curves).

    python -m benchmarks.grid_syndigits                  # about 40 minutes on 2 CPU cores
    python -m benchmarks.grid_syndigits --shard 0/2 &    # or split over processes
    python -m benchmarks.grid_syndigits --report             # the report of runs/grid
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

import asg_env  # noqa: F401  (registers the ids)
from agents.loading import load_policy
from agents.rollout import fine_tune
from asg_env.provenance import stamp, stamp_line

IMAGE_SIZES = (32, 64)
LR_BASES = (3e-4, 1e-3, 3e-3)
EPOCHS = (1, 2, 4)
SETTINGS = ("large-everywhere", "small-backbone-large-classifier", "classifier-only")
SEEDS = (0, 1, 2)
SOURCE_SIZE, BATCH_SIZE = 2000, 32
STEPS_PER_EPOCH = SOURCE_SIZE // BATCH_SIZE
EVAL_EVERY = STEPS_PER_EPOCH // 2
EVAL_SIZE = 500
MIN_WASHOUT, TIE = 0.02, 0.01


def run_key(size: int, lr: float, setting: str, seed: int) -> str:
    return f"size{size}-lr{lr:g}-{setting}-seed{seed}"


def all_runs() -> list[tuple]:
    return list(itertools.product(IMAGE_SIZES, LR_BASES, SETTINGS, SEEDS))


def run_grid(out: str, shard: tuple[int, int], data_root: str | None) -> None:
    path = os.path.join(out, "results.jsonl")
    done = set()
    if os.path.isfile(path):
        with open(path) as fh:
            done = {json.loads(line)["key"] for line in fh if line.strip()}
    todo = [r for i, r in enumerate(all_runs()) if i % shard[1] == shard[0] and run_key(*r) not in done]
    envs: dict[tuple, gym.Env] = {}
    for size, lr, setting, seed in tqdm(todo, desc=f"grid runs (shard {shard[0]}/{shard[1]})"):
        if (size, lr) not in envs:
            envs[(size, lr)] = gym.make(
                "SynDigits-v0", image_size=size, lr_base=lr, lam=0.0, guidance="none", source_size=SOURCE_SIZE,
                batch_size=BATCH_SIZE, episode_steps=None, sgd_steps=max(EPOCHS) * STEPS_PER_EPOCH,
                eval_every=EVAL_EVERY, target_eval_size=EVAL_SIZE, synthetic_eval_size=EVAL_SIZE,
                reward_batch="heldout", data_root=data_root)
        env = envs[(size, lr)]
        start = time.perf_counter()
        history = fine_tune(env.unwrapped.trainer, load_policy(setting, env), seed, control=env.unwrapped.control)
        curve = [{k: v for k, v in r.items() if not k.startswith("action/")} for r in history if "target_acc" in r]
        line = {"key": run_key(size, lr, setting, seed), "image_size": size, "lr_base": lr, "setting": setting,
                "seed": seed, "diverged": bool(history[-1].get("diverged")), "seconds": time.perf_counter() - start,
                "curve": curve}
        line.update(stamp({"env_kwargs": env.unwrapped.config, "setting": setting}))
        with open(path, "a") as fh:  # one line per finished run: an interrupted grid loses one run at most
            fh.write(json.dumps(line) + "\n")


def load_results(path: str) -> dict[str, dict]:
    with open(path) as fh:
        return {r["key"]: r for r in map(json.loads, filter(str.strip, fh))}


def mean_curve(runs: list[dict], key: str, length_steps: int) -> np.ndarray:
    """Mean over seeds at the evaluation points up to ``length_steps`` (NaN where a run stopped)."""
    points = [r["sgd_step"] for r in runs[0]["curve"] if r["sgd_step"] <= length_steps]
    rows = []
    for run in runs:
        by_step = {r["sgd_step"]: r.get(key, np.nan) for r in run["curve"]}
        rows.append([by_step.get(p, np.nan) for p in points])
    return np.asarray(rows, dtype=float).mean(0)


def analyse(results: dict[str, dict]) -> list[dict]:
    """One row per cell with the rule's quantities (large LR) and every setting's final values."""
    cells = []
    for size, lr, epochs in itertools.product(IMAGE_SIZES, LR_BASES, EPOCHS):
        L = epochs * STEPS_PER_EPOCH
        runs = {s: [results[run_key(size, lr, s, seed)] for seed in SEEDS if run_key(size, lr, s, seed) in results]
                for s in SETTINGS}
        if any(len(v) < len(SEEDS) for v in runs.values()):
            continue
        large = runs["large-everywhere"]
        A, S = mean_curve(large, "target_mean_class_acc", L), mean_curve(large, "synthetic_acc", L)
        diverged = any(r["diverged"] for r in large) or bool(np.isnan(A).any())
        peak = int(np.nanargmax(A)) if not np.isnan(A).all() else 0
        cell = {"image_size": size, "lr_base": lr, "epochs": epochs, "diverged": diverged,
                "peak": float(A[peak]), "peak_sgd_step": large[0]["curve"][peak]["sgd_step"],
                "final": float(A[-1]), "washout": float(A[peak] - A[-1]),
                "synthetic_at_peak": float(S[peak]), "synthetic_final": float(S[-1]),
                "retention_loss": float(mean_curve(large, "imagenet_teacher_top1", L)[-1] - mean_curve(large, "imagenet_top1", L)[-1]),
                "target_kl": float(mean_curve(large, "target_kl", L)[-1])}
        cell["qualifies"] = not diverged and cell["synthetic_final"] >= cell["synthetic_at_peak"]
        for s in SETTINGS:
            finals = [mean_curve([r], "target_mean_class_acc", L)[-1] for r in runs[s]]
            cell[f"{s}/final"], cell[f"{s}/final_std"] = float(np.mean(finals)), float(np.std(finals, ddof=1))
            cell[f"{s}/synthetic"] = float(mean_curve(runs[s], "synthetic_acc", L)[-1])
            cell[f"{s}/imagenet_top1"] = float(mean_curve(runs[s], "imagenet_top1", L)[-1])
            cell[f"{s}/target_kl"] = float(mean_curve(runs[s], "target_kl", L)[-1])
        cells.append(cell)
    return cells


def choose(cells: list[dict]) -> tuple[dict, str]:
    """Apply the rule in the module docstring; returns the chosen cell and which step decided."""
    qualifying = [c for c in cells if c["qualifies"]]
    cost = lambda c: (c["image_size"], c["epochs"])  # noqa: E731
    if qualifying and max(c["washout"] for c in qualifying) >= MIN_WASHOUT:
        best = max(c["washout"] for c in qualifying)
        tied = [c for c in qualifying if c["washout"] >= best - TIE]
        return min(tied, key=cost), "largest washout (rule 3)"
    pool = [c for c in cells if not c["diverged"]] or cells
    best = max((c["retention_loss"], c["target_kl"]) for c in pool)
    tied = [c for c in pool if c["retention_loss"] >= best[0] - TIE]
    return min(tied, key=lambda c: (-c["target_kl"], *cost(c))), "largest retention loss (rule 4)"


def report(results: dict[str, dict], out: str) -> dict:
    cells = analyse(results)
    chosen, why = choose(cells)
    doc = (__doc__ or "").split("Outputs in --out")[0].strip()
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = ["# SynDigits-v0 settings grid (no guidance)", "", stamp_line(results.values()), "", "```", doc, "```", "",
             f"**Chosen default:** image size {chosen['image_size']} px, η_base {chosen['lr_base']:g}, "
             f"{chosen['epochs']} epochs of {SOURCE_SIZE} images ({chosen['epochs'] * STEPS_PER_EPOCH} SGD steps), by the "
             f"{why}: large-LR real-target mean per-class accuracy peaks at {pct(chosen['peak'])} % (step "
             f"{chosen['peak_sgd_step']}) and ends at {pct(chosen['final'])} %, while synthetic accuracy goes "
             f"{pct(chosen['synthetic_at_peak'])} → {pct(chosen['synthetic_final'])} %.", "",
             "## Large LR everywhere: the rule's quantities (mean of 3 seeds)", "",
             "| size | η_base | epochs | peak A % (step) | final A % | washout W | S at peak % | final S % | qualifies | "
             "ImageNet top-1 lost (photos) | KL(teacher‖θ_o) on target |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        lines.append(f"| {c['image_size']} | {c['lr_base']:g} | {c['epochs']} | {pct(c['peak'])} ({c['peak_sgd_step']}) | "
                     f"{pct(c['final'])} | {pct(c['washout'])} | {pct(c['synthetic_at_peak'])} | {pct(c['synthetic_final'])} | "
                     f"{'yes' if c['qualifies'] else 'no (diverged)' if c['diverged'] else 'no'} | "
                     f"{pct(c['retention_loss'])} | {c['target_kl']:.3f} |")
    lines += ["", "## Every setting at the end of the run: real-target mean per-class accuracy % (mean ± std, 3 seeds), "
              "synthetic held-out accuracy %, θ_o ImageNet top-1 % on the 20 photos, KL(teacher‖θ_o) on the target", "",
              "| size | η_base | epochs | " + " | ".join(SETTINGS) + " |", "|---|---|---|" + "---|" * len(SETTINGS)]
    for c in cells:
        lines.append(f"| {c['image_size']} | {c['lr_base']:g} | {c['epochs']} | " + " | ".join(
            f"{pct(c[s + '/final'])} ± {pct(c[s + '/final_std'])}; syn {pct(c[s + '/synthetic'])}; "
            f"IN {pct(c[s + '/imagenet_top1'])}; KL {c[s + '/target_kl']:.2f}" for s in SETTINGS) + " |")
    lines += ["", "![mean curves](grid.png)", ""]
    with open(os.path.join(out, "grid.md"), "w") as fh:
        fh.write("\n".join(lines))
    plot(results, os.path.join(out, "grid.png"))
    with open(os.path.join(out, "choice.json"), "w") as fh:
        json.dump({"chosen": chosen, "why": why}, fh, indent=1)
    return chosen


def plot(results: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(IMAGE_SIZES), len(LR_BASES), figsize=(5 * len(LR_BASES), 3.8 * len(IMAGE_SIZES)),
                             squeeze=False, sharey=True)
    for (i, size), (j, lr) in itertools.product(enumerate(IMAGE_SIZES), enumerate(LR_BASES)):
        ax = axes[i, j]
        for k, setting in enumerate(SETTINGS):
            runs = [results[run_key(size, lr, setting, s)] for s in SEEDS if run_key(size, lr, setting, s) in results]
            if not runs:
                continue
            steps = [r["sgd_step"] for r in runs[0]["curve"]]
            L = steps[-1]
            ax.plot(steps, 100 * mean_curve(runs, "target_mean_class_acc", L), color=f"C{k}", label=f"{setting}: real")
            ax.plot(steps, 100 * mean_curve(runs, "synthetic_acc", L), color=f"C{k}", linestyle=":", label=f"{setting}: synthetic")
        ax.set(title=f"{size} px, η_base {lr:g}", xlabel="SGD step", ylabel="accuracy %")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/grid",
                   help="folder for results.jsonl, grid.md, grid.png (default: runs/grid; the published run is results/grid)")
    p.add_argument("--shard", default="0/1", help="run every n-th run starting at i (i/n), to split over processes")
    p.add_argument("--report", action="store_true", help="only write the report from results.jsonl")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--data-root", help="SynDigits cache folder")
    args = p.parse_args(argv)
    try:
        i, n = (int(v) for v in args.shard.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        print(f"error: --shard must be i/n with 0 ≤ i < n, not {args.shard!r}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    if not args.report:
        run_grid(args.out, (i, n), args.data_root)
    path = os.path.join(args.out, "results.jsonl")
    if not os.path.isfile(path):
        print(f"error: no results in {path}; run the grid first", file=sys.stderr)
        return 2
    results = load_results(path)
    missing = [run_key(*r) for r in all_runs() if run_key(*r) not in results]
    if missing:
        print(f"{len(results)} of {len(all_runs())} runs done; the report needs all of them (rerun to finish)")
        return 0
    chosen = report(results, args.out)
    print(f"chosen: {chosen['image_size']} px, η_base {chosen['lr_base']:g}, {chosen['epochs']} epochs; see {args.out}/grid.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
