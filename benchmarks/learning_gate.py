"""The learning gate: has a meta-trained policy learned anything?

A policy is called "learned" only if it passes this gate. The rule is fixed here, before any
result is seen; change it only in a commit that says so, and rerun.

THE RULE (per agent, over its ``--seeds`` policy seeds, each meta-trained for ``--episodes``):

(a) Stochastic policies (REINFORCE): the mean action entropy of the last
    :data:`ENTROPY_WINDOW` training episodes, as a fraction of the maximum (uniform levels),
    is at most :data:`MAX_ENTROPY_RATIO`. ES acts greedily: no entropy, (a) does not apply.
(b) On the train instances, with fresh run seeds (:data:`RUN_SEEDS`, never a training seed):
    each case (policy seed × instance × run seed) runs the trained policy, the random policy
    and the policy's own untrained initialisation (greedy), and scores each run by its final
    synthetic held-out cross-entropy, capped at the run's initial one (the env's
    ``synthetic_score``; the real target is never read). The baseline is whichever of random
    and initialisation has the lower mean score over all cases. The 95 % percentile bootstrap
    CI (:data:`BOOTSTRAP` resamples of the cases) of the mean paired difference
    (trained − baseline) must lie below 0: ``ci_high < 0``.
(c) A learning curve (training return for REINFORCE, score for ES, against episodes; a
    rolling mean over :data:`CURVE_WINDOW` episodes, mean and range over seeds): ``curves.png``.

An agent passes when (a) holds (or does not apply) and (b) holds.

Meta-training runs (``train_policy.py --instances``) use the family's train split at a cheaper
size than the benchmark's evaluation runs (the family's ``meta_training`` settings in
``asg_env/envs/instances.py``: for ``syndigits`` 32-pixel images and one epoch, for
``syndigits-long`` one epoch of 512 images; 8 or 16 SGD steps, T = 8 decisions, a 200-image
synthetic evaluation set), and the gate evaluates in that same configuration. Each stage is resumable: a rerun continues unfinished
meta-training from its checkpoints and skips finished evaluation runs.

    python -m benchmarks.learning_gate                      # REINFORCE and ES, 3 seeds, 1,000 episodes each
    python -m benchmarks.learning_gate --jobs 2             # two meta-trainings at once, one thread each
    python -m benchmarks.learning_gate --episodes 4 --seeds 1 --run-seeds 1 --out runs/gate-smoke   # a smoke run

Outputs in ``--out`` (default ``runs/learning_gate/<family>``): the meta-training run folders,
``instances.yaml`` (the split at the meta-training size), ``evaluation.jsonl`` (one line per
evaluation run, with its commit), ``summary.json``, ``results.md`` and ``curves.png``;
``--publish`` copies these four to ``results/learning_gate/<family>/`` and each passing agent's
best policy seed, with its card, to ``results/policies/<agent>-<family>/`` (what
``apply_policy.py --policy pretrained`` runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import gymnasium as gym
import numpy as np
import pandas as pd
import torch
import yaml

import asg_env  # noqa: F401  (registers the ids)
from agents.check import bootstrap_ci, initial_state, score_run
from agents.loading import load_policy, save_policy
from agents.policies import RandomPolicy
from asg_env.envs.instances import FAMILIES, load_instances, meta_training_instances
from asg_env.provenance import ROOT, git_commit

# ---------------------------------------------------------------- the rule (fixed before results)
MAX_ENTROPY_RATIO = 0.8
ENTROPY_WINDOW = 50
RUN_SEEDS = (1_000_003, 1_000_033, 1_000_037)  # evaluation runs; training seeds come from SeedSequence
BOOTSTRAP = 10_000
CURVE_WINDOW = 50
# ---------------------------------------------------------------- the meta-training configuration
AGENTS = {  # agent: its settings (policy learning rates: REINFORCE's default, ES's default; not swept)
    "reinforce": {},
    "es": {"pairs": 8, "sigma": 0.05, "lr": 0.03},
}


def meta_instances(instance_file: str, out: str) -> str:
    """The train split at the family's meta-training size, written to ``out/instances.yaml``."""
    data = meta_training_instances(instance_file)
    path = os.path.join(out, "instances.yaml")
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as fh:
        fh.write(f"# {data['family']} train split at the learning gate's meta-training size "
                 f"({FAMILIES[data['family']].meta_training})\n")
        yaml.safe_dump(data, fh, sort_keys=False)
    return path


def meta_train_command(agent: str, seed: int, episodes: int, instances: str, run: str, data_root: str | None) -> list[str]:
    resume = os.path.isfile(os.path.join(run, "checkpoint.pt"))
    cmd = [sys.executable, os.path.join(ROOT, "train_policy.py"), "--out", run, "--episodes", str(episodes)]
    if resume:
        cmd.append("--resume")
    else:
        cmd += ["--agent", agent, "--seed", str(seed), "--instances", instances, "--split", "train"]
        cmd += [arg for k, v in AGENTS[agent].items() for arg in ("--set", f"agent.{agent}.{k}={v}")]
    if data_root:
        cmd += ["--data-root", data_root]
    return cmd


def episodes_done(run: str) -> int:
    path = os.path.join(run, "checkpoint.pt")
    return int(torch.load(path, weights_only=True)["episodes_done"]) if os.path.isfile(path) else 0


def meta_train(args, instances: str) -> dict[str, list[str]]:
    """Every agent × seed to ``--episodes``, ``--jobs`` at a time (resumed where it stopped)."""
    runs = {a: [os.path.join(args.out, f"{a}-seed{s}") for s in range(args.seeds)] for a in args.agents}
    todo = [(a, s, runs[a][s]) for s in range(args.seeds) for a in args.agents if episodes_done(runs[a][s]) < args.episodes]
    threads = max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2) // args.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    running: list[tuple[subprocess.Popen, str]] = []
    while todo or running:
        while todo and len(running) < args.jobs:
            agent, seed, run = todo.pop(0)
            os.makedirs(run, exist_ok=True)
            log = open(os.path.join(run, "meta_train.log"), "a")
            cmd = meta_train_command(agent, seed, args.episodes, instances, run, args.data_root)
            print("meta-training:", " ".join(cmd[1:]), flush=True)
            running.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), run))
        time.sleep(5)
        for proc, run in list(running):
            if proc.poll() is not None:
                running.remove((proc, run))
                if proc.returncode != 0:
                    raise SystemExit(f"meta-training failed ({run}/meta_train.log)")
                print(f"done: {run} ({episodes_done(run)} episodes)", flush=True)
    return runs


def init_policy(run: str, path: str) -> str:
    """The policy's untrained initialisation (the network of its seed, a fresh normaliser)."""
    if not os.path.isfile(path):
        state = torch.load(os.path.join(run, "policy.pt"), weights_only=True)
        seed = int(yaml.safe_load(open(os.path.join(run, "config.yaml")))["train"]["seed"])
        save_policy(initial_state(state, seed), path)
    return path


def evaluate(args, runs: dict[str, list[str]], instance_file: str) -> pd.DataFrame:
    """Every case of the rule's (b), appended to evaluation.jsonl as it finishes."""
    split = load_instances(instance_file, "train")
    path = os.path.join(args.out, "evaluation.jsonl")
    done = {}
    if os.path.isfile(path):
        for line in open(path):
            row = json.loads(line)
            done[(row["method"], row["policy_seed"], row["instance"], row["run_seed"])] = row
    cases = [(p, j, r) for p in range(args.seeds) for j in range(len(split.instances)) for r in RUN_SEEDS[: args.run_seeds]]
    methods = [*args.agents, "random", "init"]
    todo = sorted(((m, *c) for c in cases for m in methods if (m, *c) not in done), key=lambda t: t[2])  # by instance
    from tqdm.auto import tqdm

    envs: dict[int, gym.Env] = {}
    commit = git_commit()
    with open(path, "a") as fh:
        for method, p, j, r in tqdm(todo, desc="evaluation runs"):
            if j not in envs:
                kwargs = {**split.base, **split.instances[j], "evaluate_target": False, "synthetic_score": True}
                if args.data_root:
                    kwargs["data_root"] = args.data_root
                envs = {j: gym.make(split.env_id, **kwargs)}  # one instance's env at a time
            env = envs[j]
            if method == "random":
                policy = RandomPolicy(len(env.unwrapped.coordinate_names), seed=p * 1000 + r)
            else:
                run = runs[args.agents[0]][p] if method == "init" else runs[method][p]
                file = init_policy(run, os.path.join(args.out, f"init-seed{p}.pt")) if method == "init" else \
                    os.path.join(run, "policy.pt")
                policy = load_policy(file, env, deterministic=True)
            row = {"method": method, "policy_seed": p, "instance": j, "run_seed": r, **score_run(env, policy, r),
                   "commit": commit}
            done[(method, p, j, r)] = row
            fh.write(json.dumps(row) + "\n")
            fh.flush()
    return pd.DataFrame([done[(m, *c)] for c in cases for m in methods])


def training_log(run: str) -> pd.DataFrame:
    return pd.read_csv(os.path.join(run, "episodes.csv"))


def meta_training_commits(run: str) -> list[str]:
    """The commits a policy's meta-training ran on, as its policy.pt records them (none before the record)."""
    state = torch.load(os.path.join(run, "policy.pt"), weights_only=True)
    return list((state.get("training") or {}).get("commits", []))


def summarise(args, runs: dict[str, list[str]], table: pd.DataFrame) -> list[dict]:
    out = []
    keys = ["policy_seed", "instance", "run_seed"]
    base = {m: table[table.method == m].set_index(keys)["score"] for m in ("random", "init")}
    evaluated = sorted(set(table["commit"].dropna())) if "commit" in table else []
    for agent in args.agents:
        trained = table[table.method == agent].set_index(keys)["score"]
        better = min(base, key=lambda m: base[m].mean())
        diff = (trained - base[better].loc[trained.index]).to_numpy()
        low, high = bootstrap_ci(diff, BOOTSTRAP)
        logs = [training_log(r) for r in runs[agent]]
        entropy = None
        if agent != "es":
            entropy = float(np.mean([log["entropy_ratio"].tail(ENTROPY_WINDOW).mean() for log in logs]))
        passed = high < 0 and (entropy is None or entropy <= MAX_ENTROPY_RATIO)
        out.append({"agent": agent, "seeds": len(logs), "episodes": int(min(len(log) for log in logs)),
                    "sgd_steps": int(sum(log["sgd_steps"].sum() for log in logs)),
                    "wall_s": round(float(sum(log["seconds"].sum() for log in logs)), 1),
                    "entropy_ratio": entropy, "loss_trained": float(trained.mean()),
                    "loss_random": float(base["random"].mean()), "loss_init": float(base["init"].mean()),
                    "baseline": better, "ci_low": low, "ci_high": high, "cases": int(len(diff)),
                    "passed": bool(passed), "seed_scores": [float(v) for v in trained.groupby(level=0).mean()],
                    "commit": evaluated[0] if len(evaluated) == 1 else evaluated,
                    "meta_training_commits": sorted({c for r in runs[agent] for c in meta_training_commits(r)})})
    return out


def plot_curves(runs: dict[str, list[str]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    for ax, (agent, paths) in zip(axes[0], runs.items()):
        key = "score" if agent == "es" else "return"
        curves = [training_log(p)[key].rolling(CURVE_WINDOW, min_periods=1).mean().to_numpy() for p in paths]
        n = min(len(c) for c in curves)
        stack = np.stack([c[:n] for c in curves])
        x = np.arange(1, n + 1)
        ax.plot(x, stack.mean(0), label=f"mean of {len(curves)} seeds")
        ax.fill_between(x, stack.min(0), stack.max(0), alpha=0.25, label="range over seeds")
        ax.set(title=f"{agent} (rolling mean of {CURVE_WINDOW} episodes)", xlabel="meta-training episode",
               ylabel="synthetic score (lower is better)" if key == "score" else "return (loss decrease)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(args, summary: list[dict], path: str) -> None:
    lines = [f"# Learning gate: {args.family}", "",
             f"Evaluated on commit `{summary[0]['commit']}`. Meta-training on the train split of `{args.instances}` at "
             f"{FAMILIES[args.family].meta_training}; evaluation on the same instances with run seeds "
             f"{list(RUN_SEEDS[: args.run_seeds])}. Rule: `benchmarks/learning_gate.py` (entropy ≤ "
             f"{MAX_ENTROPY_RATIO} of the maximum over the last {ENTROPY_WINDOW} episodes; the 95 % bootstrap CI of "
             f"trained − the better of random and init, paired over policy seeds × instances × run seeds, below 0).",
             "", "Scores: final synthetic held-out cross-entropy, capped at the run's initial one (lower is better).", "",
             "| agent | passed | seeds | episodes | SGD steps | wall | entropy / max | trained | random | init | "
             "trained − " + "baseline [95 % CI] |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        entropy = "—" if s["entropy_ratio"] is None else f"{s['entropy_ratio']:.3f}"
        lines.append(f"| {s['agent']} | {'**yes**' if s['passed'] else 'no'} | {s['seeds']} | {s['episodes']} | "
                     f"{s['sgd_steps']} | {s['wall_s'] / 60:.0f} min | {entropy} | {s['loss_trained']:.4f} | "
                     f"{s['loss_random']:.4f} | {s['loss_init']:.4f} | {s['baseline']}: "
                     f"[{s['ci_low']:+.4f}, {s['ci_high']:+.4f}] |")
    lines += ["", f"{summary[0]['cases']} paired cases per agent. Wall time is the meta-training's, summed over "
              "seeds, as logged per episode.", "", "| agent | trained score per policy seed | meta-training commits |",
              "|---|---|---|"]
    for s in summary:
        commits = ", ".join(f"`{c[:12]}`" for c in s["meta_training_commits"]) or "not recorded in policy.pt"
        lines.append(f"| {s['agent']} | {', '.join(f'{v:.4f}' for v in s['seed_scores'])} | {commits} |")
    lines += ["", "![learning curves](curves.png)", ""]
    with open(path, "w") as fh:
        fh.write("\n".join(lines))


def publish_policy(args, runs: dict[str, list[str]], s: dict) -> str:
    """A passing agent's best policy seed (lowest trained score on the gate's train-split runs)
    as ``results/policies/<agent>-<family>/``: policy.pt, card.json and a README."""
    seed = int(np.argmin(s["seed_scores"]))
    run = runs[s["agent"]][seed]
    dest = os.path.join(args.results, "policies", f"{s['agent']}-{args.family}")
    os.makedirs(dest, exist_ok=True)
    shutil.copy(os.path.join(run, "policy.pt"), dest)
    log = training_log(run)
    training = (torch.load(os.path.join(run, "policy.pt"), weights_only=True).get("training") or {})
    card = {"name": f"{s['agent']}-{args.family}", "agent": s["agent"], "family": args.family,
            "instances": args.instances, "split": "train", "meta_training": FAMILIES[args.family].meta_training,
            "policy_seed": seed, "agent_settings": AGENTS[s["agent"]], "episodes": int(len(log)),
            "sgd_steps": int(log["sgd_steps"].sum()), "wall_s": round(float(log["seconds"].sum()), 1),
            "device": training.get("device", "cpu"), "gate": {k: s[k] for k in (
                "passed", "loss_trained", "loss_random", "loss_init", "baseline", "ci_low", "ci_high", "cases")},
            "policy_score": s["seed_scores"][seed], "evaluated_on": s["commit"],
            "meta_training_commits": meta_training_commits(run)}
    with open(os.path.join(dest, "card.json"), "w") as fh:
        json.dump(card, fh, indent=1)
    with open(os.path.join(dest, "README.md"), "w") as fh:
        fh.write(f"""# {card['name']}

A learning-rate policy meta-trained by `{s['agent']}` on the train split of `{args.instances}` (family
`{args.family}`) at {card['meta_training']}, policy seed {seed} of {s['seeds']}: {card['episodes']} episodes,
{card['sgd_steps']} SGD steps, {card['wall_s'] / 60:.0f} min on {card['device']}.

It passed the learning gate (`benchmarks/learning_gate.py`, `results/learning_gate/{args.family}/`): the
agent's trained policies scored {s['loss_trained']:.4f} (final synthetic cross-entropy, lower is better)
against {s['loss_random']:.4f} for random and {s['loss_init']:.4f} for their untrained initialisation;
trained − {s['baseline']}: 95 % CI [{s['ci_low']:+.4f}, {s['ci_high']:+.4f}] over {s['cases']} paired runs.
This seed scored {card['policy_score']:.4f}, the best of the agent's seeds on those train-split runs
(the real target was not read). Evaluated on commit `{s['commit']}`; meta-trained on
{', '.join(f"`{c}`" for c in card['meta_training_commits']) or "a commit its policy.pt does not record (trained before the record)"}.

    python apply_policy.py --policy {card['name']}
""")
    return dest


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", default="configs/instances/syndigits.yaml", help="instance file (its train split)")
    p.add_argument("--agents", nargs="+", default=list(AGENTS), choices=list(AGENTS))
    p.add_argument("--seeds", type=int, default=3, help="policy seeds per agent (the rule wants at least 3)")
    p.add_argument("--episodes", type=int, default=1000, help="meta-training episodes per policy")
    p.add_argument("--run-seeds", type=int, default=2, help=f"evaluation run seeds per instance (≤ {len(RUN_SEEDS)})")
    p.add_argument("--jobs", type=int, default=1, help="meta-trainings at once (the cores are shared out)")
    p.add_argument("--out", help="run folder (default runs/learning_gate/<family>)")
    p.add_argument("--data-root", help="SynDigits cache folder")
    p.add_argument("--publish", action="store_true", help="copy summary.json, results.md, curves.png and "
                   "evaluation.jsonl to results/learning_gate/<family>/, and each passing agent's best policy, with "
                   "its card, to results/policies/<agent>-<family>/")
    p.add_argument("--results", default=os.path.join(ROOT, "results"), help="where --publish writes (default: results/)")
    p.add_argument("--train-only", action="store_true", help="stop after meta-training")
    args = p.parse_args(argv)
    for name in ("seeds", "episodes", "run_seeds", "jobs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.run_seeds > len(RUN_SEEDS):
        p.error(f"--run-seeds must be at most {len(RUN_SEEDS)}")
    if not os.path.isfile(args.instances):
        p.error(f"instance file not found: {args.instances}")
    args.family = load_instances(args.instances, "train").family
    if args.family not in FAMILIES:
        p.error(f"{args.instances}: family {args.family!r} is not registered (its meta-training size is the family's); "
                f"choose one of {', '.join(FAMILIES)}")
    args.out = args.out or os.path.join("runs", "learning_gate", args.family)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    instances = meta_instances(args.instances, args.out)
    runs = meta_train(args, instances)
    if args.train_only:
        return 0
    table = evaluate(args, runs, instances)
    summary = summarise(args, runs, table)
    with open(os.path.join(args.out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    write_report(args, summary, os.path.join(args.out, "results.md"))
    plot_curves(runs, os.path.join(args.out, "curves.png"))
    for s in summary:
        print(f"{s['agent']}: {'PASSED' if s['passed'] else 'failed'}  trained {s['loss_trained']:.4f}  "
              f"random {s['loss_random']:.4f}  init {s['loss_init']:.4f}  CI [{s['ci_low']:+.4f}, {s['ci_high']:+.4f}]"
              f"  entropy {s['entropy_ratio']}")
    if args.publish:
        dest = os.path.join(args.results, "learning_gate", args.family)
        os.makedirs(dest, exist_ok=True)
        for name in ("summary.json", "results.md", "curves.png", "evaluation.jsonl"):
            shutil.copy(os.path.join(args.out, name), dest)
        print(f"published to {dest}")
        for s in summary:
            if s["passed"]:
                print(f"{s['agent']}'s best policy published to {publish_policy(args, runs, s)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
