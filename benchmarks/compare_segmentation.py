"""The paper's segmentation figures on the embedded task: SynDigitScenes-v0 → real-MNIST
scenes, FCN-8s on EfficientNet-Lite0.

* Fig. 7 analogue: real-target mIoU over training for fixed learning rates without and with
  proxy guidance (large LR everywhere; small backbone + large decoder), random + PG, and the
  REINFORCE policy + PG. Fresh seeds (100, 101, …); mean ± std and a 95 % Student-t CI.
* Fig. 8 analogue: the learned policy's level per coordinate over training, as a heatmap.
* Table 1 analogue (``--lams``): small backbone + large decoder + PG at further values of λ,
  reported beside λ = 0.1, never used to choose it.

Every run uses one env configuration (T decisions over the run's SGD steps, the held-out
synthetic reward batch, λ = 0.1). The policy is trained in it on synthetic data only (target
evaluation off), on seeds spawned from 1000. Outputs in --out: results.jsonl (one line per
run, with its curve and actions; a rerun skips finished runs and a trained policy),
results.md (with Fig. 8 in numbers), miou.png (Fig. 7), actions.png (Fig. 8) and policies/.

    python -m benchmarks.compare_segmentation            # 3 seeds: about 31 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import time

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

import asg_env  # noqa: F401  (registers the ids)
from agents.loading import env_metadata, load_policy, save_policy
from agents.reinforce import ReinforceConfig, ReinforceTrainer
from agents.rollout import episode_seed, fine_tune
from asg_env.provenance import stamp, stamp_line
from benchmarks.compare_policies import _plt, mean_ci, plot_actions

FIRST_SEED, POLICY_SEED_OFFSET, PG = 100, 1000, 0.1
SMALL = "small-backbone-large-classifier"
SETTINGS = [  # (name, policy, λ)
    ("large LR, no guidance", "large-everywhere", 0.0),
    ("large LR + PG", "large-everywhere", PG),
    ("small backbone + large decoder, no guidance", SMALL, 0.0),
    ("small backbone + large decoder + PG", SMALL, PG),
    ("random + PG", "random", PG),
    ("REINFORCE policy + PG", "reinforce", PG),
]


def lambda_settings(lams: list[float]) -> list[tuple[str, str, float]]:
    """Table 1's rows: the fixed small-backbone setting with PG at each further λ."""
    return [(f"small backbone + large decoder + PG, λ = {lam:g}", SMALL, lam) for lam in lams if lam != PG]


def summarise(runs: list[dict]) -> dict:
    """Mean ± std [95 % CI] over the runs that did not diverge (a diverged run stops at its
    last finite evaluation, which is no result); all NaN when every run diverged."""
    finite = [r for r in runs if not r["diverged"]]
    finals = [r["curve"][-1] for r in finite]
    row = {"seeds": len(runs), "diverged": len(runs) - len(finite)}
    nan = (float("nan"),) * 3
    for key in ("target_miou", "synthetic_miou", "target_kl", "imagenet_top1"):
        row[key] = mean_ci([f.get(key, np.nan) for f in finals]) if finals else nan
    row["best_target_miou_oracle"] = (mean_ci([max(c["target_miou"] for c in r["curve"][1:]) for r in finite])
                                      if finite else nan)
    return row


def action_table(runs: list[dict], coordinates: list[str], tail: int = 10) -> list[str]:
    """Fig. 8 in numbers: the mean level (0-10) per coordinate over the run, its first half and
    its last ``tail`` decisions, averaged over seeds."""
    levels = np.array([r["actions"] for r in runs], dtype=float).mean(0)  # (T, coordinates)
    half = len(levels) // 2
    lines = ["| coordinate | whole run | first half | last " + str(tail) + " decisions |", "|---|---|---|---|"]
    for i, name in enumerate(coordinates):
        lines.append(f"| {name} | {levels[:, i].mean():.1f} | {levels[:half, i].mean():.1f} | {levels[-tail:, i].mean():.1f} |")
    return lines


def write_table(rows: dict[str, dict], header: str, iou: dict[str, list[float]], out: str,
                actions: list[str] = ()) -> str:
    pct = lambda m: "—" if np.isnan(m[0]) else f"{100 * m[0]:.1f} ± {100 * m[1]:.1f} [±{100 * m[2]:.1f}]"  # noqa: E731
    lines = [header, "", "| setting | real-target mIoU % | synthetic held-out mIoU % | KL(teacher ‖ θ_o) on target | "
             "ImageNet top-1 of θ_o % | best mIoU % (oracle) |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        label = name + (f" (diverged in {r['diverged']} of {r['seeds']} seeds)" if r["diverged"] else "")
        kl = "—" if np.isnan(r["target_kl"][0]) else f"{r['target_kl'][0]:.3f} ± {r['target_kl'][1]:.3f}"
        lines.append(f"| {label} | {pct(r['target_miou'])} | {pct(r['synthetic_miou'])} | {kl} | "
                     f"{pct(r['imagenet_top1'])} | {pct(r['best_target_miou_oracle'])} |")
    classes = list(next(iter(iou.values())))
    lines += ["", "Per-class IoU % at the end of the run (mean over seeds):", "",
              "| setting | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    for name, per_class in iou.items():
        lines.append(f"| {name} | " + " | ".join("—" if np.isnan(per_class[c]) else f"{100 * per_class[c]:.1f}" for c in classes) + " |")
    if actions:
        lines += ["", "Fig. 8 in numbers: the learned policy's mean level per coordinate (0-10, mean over seeds):", "",
                  *actions]
    lines += ["", "Mean ± std over the seeds that did not diverge [95 % Student-t CI half-width]; — where all "
              "diverged. The oracle column is each curve's best point, picked with target labels."]
    text = "\n".join(lines)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(text + "\n")
    return text


def plot_miou(results: dict[str, list[dict]], path: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "target_miou", "real target mIoU %"), (axes[1], "target_kl", "KL(teacher ‖ θ_o) on the target")):
        for i, (name, runs) in enumerate(results.items()):
            steps = [c["sgd_step"] for c in runs[0]["curve"]]
            values = np.array([[c[key] for c in r["curve"]] for r in runs]) * (100 if key == "target_miou" else 1)
            line, = ax.plot(steps, values.mean(0), label=name, color=f"C{i}", linestyle="-" if "PG" in name else "--")
            ax.fill_between(steps, values.mean(0) - values.std(0), values.mean(0) + values.std(0), color=line.get_color(), alpha=0.12)
        ax.set(xlabel="SGD step", title=title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Fig. 7 analogue: SynDigitScenes-v0 (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("runs", "compare_segmentation"),
                   help="output folder (default: runs/compare_segmentation; the published run is results/segmentation)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--sgd-steps", type=int, default=300, help="SGD steps per run")
    p.add_argument("--decisions", type=int, default=30, help="T, decisions per run")
    p.add_argument("--evaluations", type=int, default=6, help="target evaluations per run (plus one at the start)")
    p.add_argument("--policy-episodes", type=int, default=12)
    p.add_argument("--lams", default="0.01,1,10",
                   help="comma-separated further λ for the Table 1 rows (small backbone + large decoder + PG); '' for none")
    p.add_argument("--env-kwargs", default="{}", help="JSON overrides of SynDigitScenes-v0's defaults (e.g. for tests)")
    p.add_argument("--data-root", help="scene cache folder")
    args = p.parse_args(argv)
    if min(args.seeds, args.sgd_steps, args.decisions, args.evaluations, args.policy_episodes) < 1:
        p.error("every count must be at least 1")
    try:
        lams = [float(v) for v in args.lams.split(",") if v.strip()]
    except ValueError:
        p.error(f"--lams takes comma-separated numbers, not {args.lams!r}")
    if any(not lam > 0 for lam in lams):
        p.error("every λ in --lams must be positive")
    settings = SETTINGS + lambda_settings(lams)
    env_kwargs = json.loads(args.env_kwargs)
    os.makedirs(os.path.join(args.out, "policies"), exist_ok=True)
    start = time.perf_counter()

    def make_env(**kw) -> gym.Env:
        base = dict(episode_steps=args.decisions, sgd_steps=args.sgd_steps, reward_batch="heldout",
                    eval_every=max(1, args.decisions // args.evaluations), data_root=args.data_root, **env_kwargs)
        return gym.make("SynDigitScenes-v0", **{**base, **kw})

    policy_path = os.path.join(args.out, "policies", "reinforce.pt")
    if not os.path.isfile(policy_path):
        env = make_env(lam=PG, evaluate_target=False)
        trainer = ReinforceTrainer(env, ReinforceConfig(), seed=FIRST_SEED)
        for ep in tqdm(range(args.policy_episodes), desc="training REINFORCE", leave=False):
            trainer.run_episode(seed=episode_seed(POLICY_SEED_OFFSET, ep))
        save_policy(trainer.policy_state(env_metadata(env)), policy_path)

    path = os.path.join(args.out, "results.jsonl")
    done: dict[str, dict] = {}
    if os.path.isfile(path):
        with open(path) as fh:
            done = {r["key"]: r for r in map(json.loads, filter(str.strip, fh))}
    envs: dict[float, gym.Env] = {}
    seeds = [FIRST_SEED + i for i in range(args.seeds)]
    for seed in tqdm(seeds, desc="seeds"):
        for name, policy, lam in settings:
            key = f"{name} | seed {seed}"
            if key in done:
                continue
            env = envs.setdefault(lam, make_env(lam=lam))
            spec = policy_path if policy == "reinforce" else policy
            history = fine_tune(env.unwrapped.trainer, load_policy(spec, env, deterministic=True, seed=seed), seed,
                                control=env.unwrapped.control)
            line = {"key": key, "setting": name, "seed": seed, "diverged": bool(history[-1].get("diverged")),
                    "curve": [{k: v for k, v in r.items() if not k.startswith("action/")} for r in history if "target_kl" in r],
                    "actions": [[r[f"action/{c}"] for c in env.unwrapped.coordinate_names] for r in history[1:]]}
            line.update(stamp({"args": {k: v for k, v in vars(args).items() if k not in ("out", "data_root")},
                               "env_kwargs": env.unwrapped.config, "setting": name}))
            with open(path, "a") as fh:
                fh.write(json.dumps(line) + "\n")
            done[key] = line

    results = {name: [done[f"{name} | seed {s}"] for s in seeds] for name, _, _ in settings}
    rows = {name: summarise(runs) for name, runs in results.items()}
    any_env = next(iter(envs.values())) if envs else make_env()
    trainer = any_env.unwrapped.trainer
    iou = {name: {c: float(np.mean([r["curve"][-1][f"target_iou/{c}"] for r in runs if not r["diverged"]] or [np.nan]))
                  for c in trainer.task.class_names} for name, runs in results.items()}
    header = (f"SynDigitScenes-v0 → real-MNIST scenes, FCN-8s on EfficientNet-Lite0 "
              f"({trainer.config['image_size']} px, batch {trainer.task.source.batch_size}, η_base {trainer.lr_base:g}), "
              f"{trainer.total_sgd_steps} SGD steps, T = {trainer.T} decisions, seeds {seeds}, "
              f"REINFORCE trained for {args.policy_episodes} episodes. "
              f"{stamp_line([r for runs in results.values() for r in runs])}")
    coordinates = any_env.unwrapped.coordinate_names
    print(write_table(rows, header, iou, args.out, action_table(results["REINFORCE policy + PG"], coordinates)))
    plot_miou({name: results[name] for name, _, _ in SETTINGS}, os.path.join(args.out, "miou.png"))
    plot_actions(results, ["REINFORCE policy + PG"], coordinates, os.path.join(args.out, "actions.png"))
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min; {args.out}/results.md, miou.png, actions.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
