"""The paper's tables on the embedded task: SynDigits-v0 → real MNIST, EfficientNet-Lite0.

SynDigits-v0's defaults (image size, η_base, source size) and the run length come from
``benchmarks/grid_syndigits.py``, whose rule used only runs without guidance on seeds 0-2.
Everything here runs on fresh seeds (100, 101, …) that played no part in that choice.
Synthetic images are trained on; the real digits are only evaluated on.

Every run uses one env configuration: T = 32 decisions, each held for an even share of the
run's SGD steps, the held-out synthetic reward batch, evaluation every half epoch (every epoch
with --quick). Learned
policies are trained in that configuration, with the real target switched off, on seeds
spawned from 1000.

Tables (``results.md``):
  * Table 2 / Fig. 1, 5: large LR and small-backbone LR, each without and with proxy guidance
    (PG, λ = 0.1); FC only (the paper's "Oracle on ImageNet", row 5); the comparison
    regularisers at the small-backbone LR, all at weight 0.1 (feature L2 as in ROAD, L2-SP,
    SI with Fisher importance; see asg_env/training/guidance.py); ASG = the REINFORCE policy + PG.
  * Table 1: λ ∈ {0.01, 0.05, 0.1, 0.5, 1} at the small-backbone LR.
  * Fig. 6: random vs the best fixed setting vs learned (REINFORCE, RecurrentPPO), all + PG.
    "Best fixed" is chosen among the named fixed settings + PG by the synthetic held-out
    cross-entropy at the end of the run, never by the target.
Headline columns are end-of-run values; "best … (oracle)" is the best point of each target
curve, picked with target labels. Each row: mean ± std over seeds and a 95 % Student-t CI.

Outputs in --out: results.jsonl (one line per run with its curve: a rerun skips finished runs
and trained policies), results.md, curves.png (Fig. 1/5: real target, synthetic held-out,
ImageNet retention), policies.png (Fig. 6), actions.png (Fig. 8) and policies/.

    python -m benchmarks.compare_policies --quick     # about 12 minutes on 2 CPU cores
    python -m benchmarks.compare_policies             # full, 5 seeds: about 50 minutes, resumable
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
from scipy import stats
from tqdm.auto import tqdm

import asg_env  # noqa: F401  (registers the ids)
from agents.loading import env_metadata, load_policy, save_policy
from agents.policies import baseline_env_kwargs
from agents.reinforce import ReinforceConfig, ReinforceTrainer
from agents.rollout import episode_seed, fine_tune
from asg_env.provenance import stamp, stamp_line

PRESETS = {
    "full": dict(seeds=5, epochs=2.0, policy_episodes=16, target_eval_size=500, evals_per_epoch=2),
    "quick": dict(seeds=3, epochs=1.0, policy_episodes=3, target_eval_size=300, evals_per_epoch=1),
}
DECISIONS = 32
FIRST_SEED = 100  # the grid that chose the defaults used seeds 0-2
POLICY_SEED_OFFSET = 1000  # policy-training seeds never overlap the evaluation seeds
REWARD_BATCH = "heldout"
PG = 0.1
LAMBDAS = (0.01, 0.05, 0.1, 0.5, 1.0)
LEARNED = ("reinforce", "recurrent-ppo")
FIXED = ("large-everywhere", "small-backbone-large-classifier", "classifier-only", "hand-tuned")


@dataclass
class Setting:
    name: str
    policy: str  # a baseline, or one of LEARNED
    lam: float = 0.0
    guidance: str = "none"
    groups: tuple[str, ...] = ()
    env: dict = field(default_factory=dict)

    def env_kwargs(self) -> dict:
        extra = {} if self.policy in LEARNED else baseline_env_kwargs(self.policy)
        return {"lam": self.lam, "guidance": self.guidance, **extra, **self.env}


def settings() -> list[Setting]:
    small = "small-backbone-large-classifier"
    out = [
        Setting("1. large LR", "large-everywhere", groups=("table2",)),
        Setting("2. large LR + PG", "large-everywhere", PG, "kl", ("table2", "fixed")),
        Setting("3. small backbone + large FC", small, groups=("table2",)),
        Setting("4. small backbone + large FC + PG", small, PG, "kl", ("table2", "fixed", "lambda")),
        Setting("5. FC only (oracle on ImageNet)", "classifier-only", groups=("table2", "fixed")),
        Setting("6. small backbone + feature L2 (ROAD)", small, PG, "feature_l2", ("table2",)),
        Setting("7. small backbone + L2-SP", small, PG, "l2sp", ("table2",)),
        Setting("8. small backbone + SI (Fisher Ω)", small, PG, "si", ("table2",)),
        Setting("9. ASG: REINFORCE policy + PG", "reinforce", PG, "kl", ("table2", "policy")),
        Setting("hand-tuned (official poly schedule) + PG", "hand-tuned", PG, "kl", ("fixed",)),
        Setting("random + PG", "random", PG, "kl", ("policy",)),
        Setting("RecurrentPPO policy + PG", "recurrent-ppo", PG, "kl", ("policy",)),
    ]
    out += [Setting(f"small backbone + large FC + PG, λ = {lam:g}", small, lam, "kl", ("lambda",))
            for lam in LAMBDAS if lam != PG]
    return out


def mean_ci(values) -> tuple[float, float, float]:
    """Mean, sample std and the half-width of the 95 % Student-t confidence interval."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), 0.0, float("nan")
    std = float(v.std(ddof=1))
    return float(v.mean()), std, float(stats.t.ppf(0.975, len(v) - 1) * std / np.sqrt(len(v)))


def train_policies(make_env, args, out: str) -> dict[str, str]:
    """Learn REINFORCE and RecurrentPPO policies on synthetic data only (kept across reruns)."""
    from agents.sb3_agents import make_sb3, sb3_policy_state

    paths = {a: os.path.join(out, "policies", f"{a.replace('-', '_')}.pt") for a in LEARNED}
    if all(os.path.isfile(p) for p in paths.values()):
        return paths
    env = make_env(lam=PG, guidance="kl", evaluate_target=False)
    meta = env_metadata(env)
    if not os.path.isfile(paths["reinforce"]):
        trainer = ReinforceTrainer(env, ReinforceConfig(), seed=args.seed)
        for ep in tqdm(range(args.policy_episodes), desc="training REINFORCE", leave=False):
            trainer.run_episode(seed=episode_seed(POLICY_SEED_OFFSET, ep))
        save_policy(trainer.policy_state(meta), paths["reinforce"])
    if not os.path.isfile(paths["recurrent-ppo"]):
        env.reset(seed=POLICY_SEED_OFFSET)
        model = make_sb3("recurrent-ppo", env, seed=POLICY_SEED_OFFSET, hyperparams={
            "n_steps": args.decisions, "batch_size": max(2, args.decisions // 2), "n_epochs": 4, "ent_coef": 0.01,
            "policy_kwargs": {"lstm_hidden_size": 20}})
        model.learn(total_timesteps=args.policy_episodes * args.decisions, progress_bar=False)
        save_policy(sb3_policy_state("recurrent-ppo", model, meta), paths["recurrent-ppo"])
    env.close()
    return paths


def summarise(setting: Setting, runs: list[dict]) -> dict:
    row = {"setting": setting.name, "seeds": len(runs), "diverged": sum(r["diverged"] for r in runs)}
    finals = [r["curve"][-1] for r in runs]
    for key in ("target_mean_class_acc", "target_acc", "imagenet_top1", "target_kl", "teacher_agreement",
                "synthetic_acc"):
        row[key], row[f"{key}_std"], row[f"{key}_ci"] = mean_ci([f.get(key, np.nan) for f in finals])
    row["heldout_xe"], row["heldout_xe_std"], row["heldout_xe_ci"] = mean_ci([r["final_heldout_xe"] for r in runs])
    best = [max(c["target_mean_class_acc"] for c in r["curve"][1:]) for r in runs]
    row["best_mean_class_acc_oracle"], row["best_mean_class_acc_oracle_std"], _ = mean_ci(best)
    row["imagenet_teacher_top1"] = float(np.mean([f.get("imagenet_teacher_top1", np.nan) for f in finals]))
    return row


def write_tables(rows: dict[str, dict], groups: dict[str, list[str]], best_fixed: str, header: str, out: str) -> str:
    pct = lambda r, k: f"{100 * r[k]:.1f} ± {100 * r[k + '_std']:.1f} [±{100 * r[k + '_ci']:.1f}]"  # noqa: E731
    titles = {
        "table2": "Table 2 / Fig. 1, 5: learning rates, proxy guidance and the comparison regularisers",
        "lambda": "Table 1: λ of the proxy guidance at the small-backbone LR",
        "fixed": "Candidates for the best fixed setting (all + PG; picked by synthetic held-out cross-entropy)",
        "policy": "Fig. 6: random vs best fixed vs learned policies, all + PG (λ = 0.1)",
    }
    lines = [header, ""]
    for group, names in groups.items():
        lines += [f"### {titles[group]}", "",
                  "| setting | real-target mean-class acc % | ImageNet top-1 of θ_o % (20 photos) | KL(teacher ‖ θ_o) on target | "
                  "synthetic held-out acc % | synthetic held-out XE | best mean-class acc % (oracle) |",
                  "|---|---|---|---|---|---|---|"]
        for n in names:
            r = rows[n]
            label = n + (f" (diverged ×{r['diverged']})" if r["diverged"] else "") + (" ← best fixed" if n == best_fixed else "")
            lines.append(f"| {label} | {pct(r, 'target_mean_class_acc')} | {pct(r, 'imagenet_top1')} | "
                         f"{r['target_kl']:.3f} ± {r['target_kl_std']:.3f} | {pct(r, 'synthetic_acc')} | "
                         f"{r['heldout_xe']:.3f} ± {r['heldout_xe_std']:.3f} | "
                         f"{100 * r['best_mean_class_acc_oracle']:.1f} ± {100 * r['best_mean_class_acc_oracle_std']:.1f} |")
        lines.append("")
    lines.append("Mean ± std over seeds [95 % Student-t CI half-width]. The teacher's ImageNet top-1 on the 20 photos is "
                 f"{100 * next(iter(rows.values()))['imagenet_teacher_top1']:.0f} %.")
    text = "\n".join(lines)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(text + "\n")
    return text


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(ax, runs: list[dict], key: str, label: str, **style) -> None:
    steps = [c["sgd_step"] for c in runs[0]["curve"]]
    values = np.array([[c.get(key, np.nan) for c in r["curve"]] for r in runs if len(r["curve"]) == len(steps)])
    scale = 1 if key == "target_kl" else 100
    mean, std = values.mean(0) * scale, values.std(0) * scale
    line, = ax.plot(steps, mean, label=label, **style)
    ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.12)


def plot_curves(results: dict[str, list[dict]], names: list[str], path: str) -> None:
    """Fig. 1/5 with the retention the paper reports in Table 2, over training (mean ± std)."""
    plt = _plt()
    panels = (("target_mean_class_acc", "real target: mean per-class acc %"), ("synthetic_acc", "synthetic held-out acc %"),
              ("imagenet_top1", "ImageNet top-1 of θ_o % (20 photos)"), ("target_kl", "KL(teacher ‖ θ_o) on the real target"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2))
    for ax, (key, title) in zip(axes, panels):
        for i, name in enumerate(names):
            _band(ax, results[name], key, name, color=f"C{i}", linestyle="-" if "PG" in name or i >= 5 else "--")
        ax.set(xlabel="SGD step", title=title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_policies(results: dict[str, list[dict]], names: list[str], path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in names:
        _band(ax, results[name], "target_mean_class_acc", name)
    ax.set(xlabel="SGD step", ylabel="real-target mean per-class acc %", title="Fig. 6 analogue (all + PG)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_actions(results: dict[str, list[dict]], names: list[str], coordinates: list[str], path: str) -> None:
    """Fig. 8: the level each learned policy picks per coordinate over training (mean over seeds)."""
    plt = _plt()
    fig, axes = plt.subplots(len(names), 1, figsize=(9, 2.6 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        levels = np.array([r["actions"] for r in results[name]]).mean(0).T
        im = ax.imshow(levels, aspect="auto", cmap="viridis", vmin=0, vmax=10, interpolation="nearest")
        ax.set(yticks=range(len(coordinates)), yticklabels=coordinates, xlabel="decision", title=name)
        ax.tick_params(axis="y", labelsize=7)
        fig.colorbar(im, ax=ax, label="level (scale ×10)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one-epoch runs and briefly trained policies; every setting")
    p.add_argument("--out", help="output folder (default: runs/compare_policies, or runs/compare-quick with --quick; the published run is results/compare_policies)")
    p.add_argument("--seeds", type=int, help="evaluation seeds per setting (at least 3 for the reported tables)")
    p.add_argument("--epochs", type=float, help="run length in passes over the synthetic source")
    p.add_argument("--policy-episodes", type=int, help="episodes to train each learned policy")
    p.add_argument("--decisions", type=int, default=DECISIONS, help="T, decisions per run (every setting)")
    p.add_argument("--target-eval-size", type=int, help="real target images evaluated")
    p.add_argument("--evals-per-epoch", type=int, help="evaluations per pass over the source (plus one at the start)")
    p.add_argument("--seed", type=int, default=FIRST_SEED, help="first evaluation seed; the policy agents' seed too")
    p.add_argument("--env-kwargs", default="{}", help="JSON overrides of SynDigits-v0's defaults (e.g. for tests)")
    p.add_argument("--data-root", help="SynDigits cache folder")
    args = p.parse_args(argv)
    for key, value in PRESETS["quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.seeds, args.policy_episodes, args.decisions, args.evals_per_epoch) < 1 or args.epochs <= 0:
        p.error("--seeds, --policy-episodes, --decisions and --evals-per-epoch must be at least 1, and --epochs positive")
    try:
        args.env_kwargs = json.loads(args.env_kwargs)
    except json.JSONDecodeError as exc:
        p.error(f"--env-kwargs is not JSON: {exc}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    out = args.out or ("runs/compare-quick" if args.quick else os.path.join("runs", "compare_policies"))
    os.makedirs(os.path.join(out, "policies"), exist_ok=True)
    start = time.perf_counter()
    evaluations = max(1, round(args.evals_per_epoch * args.epochs))

    def make_env(**kw) -> gym.Env:
        base = dict(episode_steps=args.decisions, epochs=args.epochs, eval_every=max(1, args.decisions // evaluations),
                    target_eval_size=args.target_eval_size, reward_batch=REWARD_BATCH, data_root=args.data_root,
                    **args.env_kwargs)
        return gym.make("SynDigits-v0", **{**base, **kw})

    path = os.path.join(out, "results.jsonl")
    done: dict[str, dict] = {}
    if os.path.isfile(path):
        with open(path) as fh:
            done = {r["key"]: r for r in map(json.loads, filter(str.strip, fh))}
    policies = train_policies(make_env, args, out)

    all_settings = settings()
    settings_args = {k: v for k, v in vars(args).items() if k not in ("out", "data_root")}
    seeds = [args.seed + i for i in range(args.seeds)]
    cells = [(s, seed) for seed in seeds for s in all_settings]  # seed-major: an interrupted run is balanced
    envs: dict[str, gym.Env] = {}
    for s, seed in tqdm(cells, desc="fine-tuning runs (cells)"):
        key = f"{s.name} | seed {seed}"
        if key in done:
            continue
        kw = s.env_kwargs()
        env_key = json.dumps(kw, sort_keys=True)
        if env_key not in envs:
            envs[env_key] = make_env(**kw)
        env = envs[env_key]
        policy = load_policy(policies.get(s.policy, s.policy), env, deterministic=True, seed=seed)
        history = fine_tune(env.unwrapped.trainer, policy, seed, control=env.unwrapped.control)
        u = env.unwrapped
        line = {"key": key, "setting": s.name, "seed": seed, "diverged": bool(history[-1].get("diverged")),
                "final_heldout_xe": history[-1]["loss_xe"], "env_kwargs": {k: v for k, v in u.config.items()},
                "curve": [{k: v for k, v in r.items() if not k.startswith("action/")} for r in history if "target_acc" in r],
                "actions": [[r[f"action/{c}"] for c in u.coordinate_names] for r in history[1:]]}
        line.update(stamp({"args": settings_args, "env_kwargs": line["env_kwargs"], "setting": s.name}))
        with open(path, "a") as fh:
            fh.write(json.dumps(line) + "\n")
        done[key] = line
    any_env = next(iter(envs.values())) if envs else make_env()  # a rerun that skipped every run builds one
    coordinates = env_metadata(any_env)["coordinate_names"]

    results = {s.name: [done[f"{s.name} | seed {seed}"] for seed in seeds] for s in all_settings}
    rows = {s.name: summarise(s, results[s.name]) for s in all_settings}
    groups = {g: [s.name for s in all_settings if g in s.groups] for g in ("table2", "lambda", "fixed", "policy")}
    best_fixed = min(groups["fixed"], key=lambda n: rows[n]["heldout_xe"])
    groups["policy"] = ["random + PG", best_fixed, "9. ASG: REINFORCE policy + PG", "RecurrentPPO policy + PG"]
    groups["lambda"] = sorted(groups["lambda"], key=lambda n: next(s.lam for s in all_settings if s.name == n))
    plot_curves(results, groups["table2"][:8], os.path.join(out, "curves.png"))
    plot_policies(results, groups["policy"], os.path.join(out, "policies.png"))
    plot_actions(results, ["9. ASG: REINFORCE policy + PG", "RecurrentPPO policy + PG"], coordinates,
                 os.path.join(out, "actions.png"))
    u = any_env.unwrapped
    total = time.perf_counter() - start
    header = (f"SynDigits-v0 → real MNIST, EfficientNet-Lite0, {mode} mode: {u.trainer.total_sgd_steps} SGD steps "
              f"({args.epochs:g} epochs of {len(u.trainer.task.source)} images, batch {u.trainer.task.source.batch_size}, "
              f"{u.config['image_size']} px), η_base {u.trainer.lr_base:g}, T = {u.T} decisions, seeds {seeds}, "
              f"{args.target_eval_size} real target images. Policies trained for {args.policy_episodes} episodes on "
              f"seeds spawned from {POLICY_SEED_OFFSET}. Wall time of this invocation {total / 60:.1f} min. "
              f"{stamp_line([r for runs in results.values() for r in runs])}")
    print(write_tables(rows, groups, best_fixed, header, out))
    print(f"results in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
