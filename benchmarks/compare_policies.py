"""Random vs hand-tuned vs learned learning-rate policies on SynDigits-v0 (ASG §3.3).

Synthetic digits are trained on; the 5,000 real MNIST digits are only evaluated on. Every
setting runs on the same evaluation seeds with the same budget of SGD steps, and the learned
policies are trained first on disjoint seeds (spawned from 1000), with the real target
switched off. Every run, training and evaluation alike, uses the same env configuration and
so the same observation (held-out synthetic reward batch). A learned policy makes the T
decisions it was trained with, each held for steps / T SGD steps; the baselines decide at
every SGD step. "hand-tuned" is the official train.py schedule (backbone 0.1, classifier 1.0,
warm-up and poly decay).

Settings:
  * Figure 1/5, Table 2 rows 1-4: large LR everywhere, small backbone + large classifier
    (the hand-tuned setting), classifier only; each with and without proxy guidance (PG).
  * Figure 6: random, hand-tuned and learned policies (LSTM REINFORCE, RecurrentPPO), all
    with PG (λ = 0.1).
  * Table 1: λ ∈ {0.01, 0.05, 0.1, 0.5, 1} on the hand-tuned setting.

Outputs in --out: results.md and results.csv (final and best target accuracy, the best being an
"oracle" column picked with target labels; overall and
mean per-class, and teacher agreement, as mean ± std over seeds), curves.csv, curves.png
(target accuracy over training with a ±1 std band), actions.png (learned policies' actions
per coordinate over training, Figure 8), and the learned policies in policies/.

    python benchmarks/compare_policies.py --quick     # about 8 minutes on 2 CPU cores
    python benchmarks/compare_policies.py             # full: about 42 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import asg_env  # noqa: E402,F401  (registers the ids)
from agents.loading import env_metadata, load_policy, save_policy  # noqa: E402
from agents.reinforce import ReinforceConfig, ReinforceTrainer  # noqa: E402
from agents.policies import baseline_env_kwargs  # noqa: E402
from agents.rollout import episode_seed, fine_tune  # noqa: E402

PRESETS = {
    "full": dict(seeds=3, steps=300, eval_every=25, policy_episodes=30, policy_steps=100, target_eval_size=1000),
    "quick": dict(seeds=3, steps=60, eval_every=20, policy_episodes=8, policy_steps=60, target_eval_size=500),
}
LAMBDAS = (0.01, 0.05, 0.1, 0.5, 1.0)
POLICY_SEED_OFFSET = 1000  # policy-training seeds never overlap the evaluation seeds
REWARD_BATCH = "heldout"  # one observation for policy training and for every evaluation run


@dataclass
class Setting:
    name: str
    policy: str  # a baseline name, or "reinforce" / "recurrent-ppo" for the learned ones
    lam: float
    groups: tuple[str, ...]  # which comparisons (figures/tables) it belongs to


def settings() -> list[Setting]:
    out = []
    for label, policy in (("large LR", "large-everywhere"), ("small backbone + large FC", "hand-tuned"),
                          ("FC only", "classifier-only")):
        out.append(Setting(label, policy, 0.0, ("lr",)))
        extra = ("policy", "lambda") if policy == "hand-tuned" else ()
        out.append(Setting(f"{label} + PG", policy, 0.1, ("lr", *extra)))
    out += [Setting("random + PG", "random", 0.1, ("policy",)),
            Setting("REINFORCE (learned) + PG", "reinforce", 0.1, ("policy",)),
            Setting("RecurrentPPO (learned) + PG", "recurrent-ppo", 0.1, ("policy",))]
    out += [Setting(f"small backbone + large FC, λ={lam:g}", "hand-tuned", lam, ("lambda",))
            for lam in LAMBDAS if lam != 0.1]
    return out


def train_policies(make_env, args, out: str) -> dict[str, tuple[str, float]]:
    """Learn REINFORCE and RecurrentPPO policies on synthetic data only. Returns path and seconds."""
    from agents.sb3_agents import make_sb3, sb3_policy_state

    env = make_env(lam=0.1, episode_steps=args.policy_steps, evaluate_target=False)
    meta = env_metadata(env)
    learned = {}

    start = time.perf_counter()
    trainer = ReinforceTrainer(env, ReinforceConfig(), seed=args.seed)
    for ep in tqdm(range(args.policy_episodes), desc="training REINFORCE policy", leave=False):
        trainer.run_episode(seed=episode_seed(POLICY_SEED_OFFSET, ep))
    path = os.path.join(out, "policies", "reinforce.pt")
    save_policy(trainer.policy_state(meta), path)
    learned["reinforce"] = (path, time.perf_counter() - start)

    start = time.perf_counter()
    env.reset(seed=POLICY_SEED_OFFSET)
    model = make_sb3("recurrent-ppo", env, seed=POLICY_SEED_OFFSET, hyperparams={
        "n_steps": args.policy_steps, "batch_size": max(2, args.policy_steps // 2), "n_epochs": 4,
        "ent_coef": 0.01, "policy_kwargs": {"lstm_hidden_size": 20}})
    model.learn(total_timesteps=args.policy_episodes * args.policy_steps)
    path = os.path.join(out, "policies", "recurrent_ppo.pt")
    save_policy(sb3_policy_state("recurrent-ppo", model, meta), path)
    learned["recurrent-ppo"] = (path, time.perf_counter() - start)
    env.close()
    return learned


def mean_std(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarise(name: str, runs: list[list[dict]]) -> dict:
    """Final and best target accuracy (mean ± std over seeds) from each seed's eval rows."""
    row = {"setting": name, "seeds": len(runs)}
    evals = [[r for r in h if "target_acc" in r] for h in runs]
    for key, short in (("target_acc", "acc"), ("target_mean_class_acc", "mean_class_acc")):
        row[f"final_{short}"], row[f"final_{short}_std"] = mean_std([e[-1][key] for e in evals])
        row[f"best_{short}"], row[f"best_{short}_std"] = mean_std([max(r[key] for r in e if r["step"] > 0) for e in evals])
    row["teacher_agreement"], row["teacher_agreement_std"] = mean_std([e[-1]["teacher_agreement"] for e in evals])
    row["diverged"] = sum(bool(h[-1].get("diverged")) for h in runs)
    return row


def write_tables(rows: list[dict], groups: dict[str, list[str]], out: str, header: str) -> str:
    with open(os.path.join(out, "results.csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    by_name = {r["setting"]: r for r in rows}
    pct = lambda r, k: f"{100 * r[k]:.1f} ± {100 * r[k + '_std']:.1f}"  # noqa: E731
    lines = [header, ""]
    titles = {"lr": "Learning-rate settings with and without proxy guidance (Fig. 1/5, Table 2 rows 1-4)",
              "policy": "Policies, all with proxy guidance λ = 0.1 (Fig. 6)",
              "lambda": "λ sweep on the hand-tuned setting (Table 1)"}
    for group, names in groups.items():
        lines += [f"### {titles[group]}", "",
                  "| setting | final acc % | final mean-class acc % | best acc % (oracle) | best mean-class acc % (oracle) | teacher agreement % |",
                  "|---|---|---|---|---|---|"]
        for n in names:
            r = by_name[n]
            lines.append(f"| {n}{' (diverged ×%d)' % r['diverged'] if r['diverged'] else ''} | {pct(r, 'final_acc')} | "
                         f"{pct(r, 'final_mean_class_acc')} | {pct(r, 'best_acc')} | {pct(r, 'best_mean_class_acc')} | "
                         f"{pct(r, 'teacher_agreement')} |")
        lines.append("")
    text = "\n".join(lines)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(text)
    return text


def plot_curves(results: dict[str, list[list[dict]]], groups: dict[str, list[str]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.2), squeeze=False)
    for ax, (group, names) in zip(axes[0], groups.items()):
        colours: dict[str, str] = {}  # a setting and its "+ PG" twin share a colour
        for name in names:
            evals = [[r for r in h if "target_acc" in r] for h in results[name]]
            steps = [r["sgd_step"] for r in evals[0]]
            acc = np.array([[r["target_acc"] for r in e] for e in evals]) * 100
            mean, std = acc.mean(0), acc.std(0)
            base = name.removesuffix(" + PG") if group == "lr" else name
            colour = colours.setdefault(base, f"C{len(colours)}")
            dashed = group == "lr" and not name.endswith(" + PG")
            ax.plot(steps, mean, label=name, color=colour, linestyle="--" if dashed else "-")
            ax.fill_between(steps, mean - std, mean + std, color=colour, alpha=0.12)
        ax.set(xlabel="SGD step", ylabel="real-target (MNIST) accuracy %", title=group)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_actions(results: dict[str, list[list[dict]]], names: list[str], coordinates: list[str], path: str) -> None:
    """Figure 8: the level each learned policy picks per coordinate over training (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(names), 1, figsize=(9, 2.6 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        levels = np.array([[[r[f"action/{c}"] for c in coordinates] for r in h[1:]] for h in results[name]]).mean(0).T
        im = ax.imshow(levels, aspect="auto", cmap="viridis", vmin=0, vmax=10, interpolation="nearest")
        ax.set(yticks=range(len(coordinates)), yticklabels=coordinates, xlabel="decision", title=name)
        ax.tick_params(axis="y", labelsize=7)
        fig.colorbar(im, ax=ax, label="level (scale ×10)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs that still cover every setting")
    p.add_argument("--out", default=None, help="output folder (default: runs/compare-<mode>)")
    p.add_argument("--seeds", type=int, help="evaluation seeds per setting (at least 3 for the reported tables)")
    p.add_argument("--steps", type=int, help="SGD steps per fine-tuning run")
    p.add_argument("--eval-every", type=int, help="SGD steps between real-target evaluations")
    p.add_argument("--policy-episodes", type=int, help="episodes to train each learned policy")
    p.add_argument("--policy-steps", type=int, help="decisions (= SGD steps) per policy-training episode")
    p.add_argument("--target-eval-size", type=int, help="real target images evaluated")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--source-size", type=int, default=10_000, help="rendered synthetic training images")
    p.add_argument("--lr-base", type=float, default=0.02, help="η_base for every setting")
    p.add_argument("--seed", type=int, default=0, help="first evaluation seed; the policy agents' seed too")
    p.add_argument("--data-root", help="SynDigits cache folder")
    args = p.parse_args(argv)
    for key, value in PRESETS["quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    out = args.out or os.path.join("runs", f"compare-{mode}")
    os.makedirs(os.path.join(out, "policies"), exist_ok=True)
    start = time.perf_counter()

    def make_env(**kw) -> gym.Env:
        base = dict(batch_size=args.batch_size, source_size=args.source_size, target_eval_size=args.target_eval_size,
                    lr_base=args.lr_base, data_root=args.data_root, reward_batch=REWARD_BATCH)
        return gym.make("SynDigits-v0", **{**base, **kw})

    learned = train_policies(make_env, args, out)
    policy_seconds = sum(s for _, s in learned.values())

    all_settings = settings()
    results: dict[str, list[list[dict]]] = {}
    eval_seeds = [args.seed + i for i in range(args.seeds)]
    bar = tqdm(total=len(all_settings) * len(eval_seeds), desc="fine-tuning runs")
    envs: dict[tuple, gym.Env] = {}  # reused across seeds and settings with the same configuration
    for s in all_settings:
        if s.policy in learned:  # T decisions, as trained, over the run's SGD steps
            kw = dict(episode_steps=args.policy_steps, eval_every=max(1, round(args.eval_every * args.policy_steps / args.steps)))
        else:  # a decision at every SGD step
            kw = dict(episode_steps=None, eval_every=args.eval_every, **baseline_env_kwargs(s.policy))
        kw.update(lam=s.lam, sgd_steps=args.steps)
        key = tuple(sorted(kw.items()))
        if key not in envs:
            envs[key] = make_env(**kw)
        env = envs[key]
        spec = learned[s.policy][0] if s.policy in learned else s.policy
        results[s.name] = []
        for seed in eval_seeds:
            policy = load_policy(spec, env, deterministic=True, seed=seed)
            results[s.name].append(fine_tune(env, policy, seed))
            bar.update(1)
    bar.close()
    coordinates = env_metadata(env)["coordinate_names"]

    groups = {g: [s.name for s in all_settings if g in s.groups] for g in ("lr", "policy", "lambda")}
    rows = [summarise(s.name, results[s.name]) for s in all_settings]
    with open(os.path.join(out, "curves.csv"), "w", newline="") as fh:
        fields = ["setting", "seed", "step", "sgd_step", "target_acc", "target_mean_class_acc", "teacher_agreement"]
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for name, runs in results.items():
            for seed, history in zip(eval_seeds, runs):
                writer.writerows({"setting": name, "seed": seed, **r} for r in history if "target_acc" in r)
    plot_curves(results, groups, os.path.join(out, "curves.png"))
    plot_actions(results, ["REINFORCE (learned) + PG", "RecurrentPPO (learned) + PG"], coordinates,
                 os.path.join(out, "actions.png"))
    total = time.perf_counter() - start
    header = (f"SynDigits-v0 → real MNIST, EfficientNet-Lite0, {mode} mode: {args.steps} steps × batch "
              f"{args.batch_size}, η_base {args.lr_base}, seeds {eval_seeds}, {args.target_eval_size} target images. "
              f"Policy training ({args.policy_episodes} episodes × {args.policy_steps} steps each, seeds "
              f"spawned from {POLICY_SEED_OFFSET}): REINFORCE {learned['reinforce'][1] / 60:.1f} min, RecurrentPPO "
              f"{learned['recurrent-ppo'][1] / 60:.1f} min. Total wall time {total / 60:.1f} min.")
    print(write_tables(rows, groups, out, header))
    print(f"policy training took {policy_seconds / 60:.1f} min of {total / 60:.1f} min; results in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
