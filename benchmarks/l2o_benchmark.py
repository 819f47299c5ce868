"""Do learned layer-wise learning-rate policies beat schedules tuned with the same compute, on
fine-tuning runs they were not trained on?

An instance file (``configs/instances/``, see ``asg_env/envs/instances.py``) gives a train split and a
test split of one family (by default SynDigits on EfficientNet-Lite0/1 for training and
Lite0/1/2, with η_base outside the training decade, for testing). Compute is counted in SGD
steps; a learned policy's budget B is the SGD steps of its training episodes.

Stages, each kept in --out as it finishes (a rerun continues where the last one stopped):

1. **Learned policies.** REINFORCE and RecurrentPPO, ``--policy-seeds`` of each, trained by
   ``train_policy.py --instances FILE --split train`` for ``--episodes`` episodes each.
2. **Schedules tuned on the train split with B.** ``llrd:HEAD,DECAY`` (constant layer-wise
   decay) and ``cosine:PEAK,WARMUP,DECAY`` (warm-up, cosine decay, layer-wise decay), searched
   by Optuna TPE. Each trial runs the ``--tune-instances`` tuning instances (a seeded subset of
   the train split); its value is the mean log final synthetic held-out loss, the objective the
   policies' rewards add up to. The trial count is the most whose SGD steps fit in B.
3. **Open-loop replay.** Each learned policy, run deterministically on the tuning instances;
   its mean level per decision and coordinate, rounded, replayed without looking at the
   observation. Its SGD steps are counted on top of the policy's.
4. **Tuned per test instance (upper reference).** ``--reference-trials`` trials of each of the
   two schedules on each test instance itself, on a tuning seed; the better one by held-out
   loss. It spends compute on the test instance that no other method gets.
5. **Evaluation.** Every method on every test instance with ``--seeds`` fresh run seeds
   (learned method k uses policy seed k): the synthetic held-out loss and accuracy, the real
   target's accuracy and ImageNet retention, and the normalised score (final held-out loss
   divided by the upper reference's mean on that instance; below 1 beats it).

The real target is only evaluated on, at the end of each evaluation run: no training,
tuning, replay or choice reads it.

``--variants`` adds learned policies trained with the env and agent options of
``asg_env/envs/control.py`` and ``agents/`` (:data:`VARIANTS`: other actions, observations, rewards,
VecNormalize, the coordinate-wise network), each trained and evaluated like the two agents
above and compared with the same baselines; each variant's own training steps are in the
compute table, and B stays the two agents'.

Outputs in --out: results.jsonl (one line per evaluation run), tuning.jsonl (every trial, with
its SGD steps), policies/ (the train_policy.py run folders, replays), results.md (with rliable's
interquartile means, probabilities of improvement and a paired Wilcoxon test), learning_curves.png,
scores.png and profiles.png (performance profiles).

    python -m benchmarks.l2o_benchmark --quick    # a smaller version of every stage: 13 min on 2 cores
    python -m benchmarks.l2o_benchmark            # full: about 3 h on 2 cores (estimated), resumable
    python -m benchmarks.l2o_benchmark --variants all   # and every option of issue 18 against them
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import sys
import time
import warnings

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

import asg_env  # noqa: F401  (registers the ids)
import train_policy
from agents.loading import load_policy
from agents.policies import OpenLoopPolicy, baseline_env_kwargs
from agents.rollout import fine_tune
from asg_env.envs.instances import FAMILIES, load_instances
from asg_env.provenance import stamp, stamp_line
from benchmarks.compare_policies import _plt, mean_ci

PRESETS = {
    # run-length overrides make --quick a smaller copy of every stage, not a claim
    "full": dict(episodes=20, policy_seeds=3, seeds=3, tune_instances=3, reference_trials=6, test_instances=0,
                 bootstrap_reps=10_000, override={}),
    "quick": dict(episodes=3, policy_seeds=3, seeds=3, tune_instances=1, reference_trials=1, test_instances=2,
                  bootstrap_reps=2_000,
                  override={"source_size": 96, "episode_steps": 3, "image_size": 48, "target_eval_size": 200,
                        "synthetic_eval_size": 100}),
}
LEARNED = {"reinforce": "REINFORCE", "recurrent-ppo": "RecurrentPPO"}
# name: (agent, env options, agent settings), each one change from the paper's REINFORCE or
# from the benchmark's RecurrentPPO (raw observations)
VARIANTS = {
    "reinforce+log_levels": ("reinforce", {"action": "log_levels"}, {}),
    "reinforce+relative": ("reinforce", {"action": "relative"}, {}),
    "reinforce+per_coordinate": ("reinforce", {"observation": "per_coordinate"}, {}),
    "reinforce+log_loss_decrease": ("reinforce", {"reward": "log_loss_decrease"}, {}),
    "reinforce+final": ("reinforce", {"reward": "final"}, {}),
    "coordinate-wise": ("reinforce", {"observation": "per_coordinate"}, {"network": "coordinate-wise"}),
    "recurrent-ppo+vecnormalize": ("recurrent-ppo", {}, {"normalize": True}),
    "recurrent-ppo+continuous": ("recurrent-ppo", {"action": "continuous"}, {}),  # SB3's Gaussian, std 1 at the start
}
SCHEDULES = ("llrd", "cosine")
NAMED = {"random": "random", "hand-tuned": "hand-tuned (official poly, warm-up 4 steps)",
         "small-backbone-large-classifier": "small backbone + large FC", "large-everywhere": "large everywhere",
         "classifier-only": "classifier only"}
NAMED_ENV = {"hand-tuned": {"warmup_steps": 4}}  # the official 100-step warm-up outlasts these runs
REFERENCE = "tuned per test instance (upper reference)"
FIRST_SEED = 100  # evaluation run seeds; policies train on seeds 0…, tuning runs on TUNING_SEED
TUNING_SEED = 7


class Bench:
    """The family's env, runs of any policy on any instance, and the budget bookkeeping."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.train = load_instances(args.instances, "train")
        self.test = load_instances(args.instances, "test")
        override = dict(args.override)
        self.base = {**self.train.base, **override, "evaluate_target": False}
        if args.data_root:
            self.base["data_root"] = args.data_root
        self.override = override
        self.train_instances = [{**i, **_axes(override)} for i in self.train.instances]
        self.test_instances = [{**i, **_axes(override)} for i in self.test.instances]
        if args.test_instances:
            self.test_instances = self.test_instances[: args.test_instances]
        order = np.random.default_rng(0).permutation(len(self.train_instances))
        self.tuning_instances = [self.train_instances[i] for i in order[: args.tune_instances]]
        self._env: tuple[str, gym.Env] | None = None

    def env(self, instance: dict, extra: dict | None = None) -> gym.Env:
        kwargs = {**self.base, **instance, **(extra or {})}
        key = json.dumps(kwargs, sort_keys=True)
        if self._env is None or self._env[0] != key:
            if self._env is not None:
                self._env[1].close()
            self._env = (key, gym.make(self.train.env_id, **kwargs))
        return self._env[1]

    def run(self, spec: str, instance: dict, seed: int, extra: dict | None = None, evaluate: bool = False,
            policy=None) -> dict:
        """One fine-tuning run; ``spec`` a baseline or policy file (or ``policy`` given)."""
        env = self.env(instance, extra)
        trainer = env.unwrapped.trainer
        policy = policy or load_policy(spec, env, deterministic=True, seed=seed)
        history = fine_tune(trainer, policy, seed, evaluate=False, control=env.unwrapped.control)
        last = history[-1]
        # a diverged run counts as its initial loss: no better than no training (and counted as diverged)
        out = {"loss": history[0]["loss"] if last.get("diverged") else last["loss"], "loss_xe": last["loss_xe"],
               "diverged": bool(last.get("diverged")), "sgd_steps": trainer.sgd_step,
               "actions": [[r[f"action/{c}"] for c in trainer.coordinate_names] for r in history[1:]]}
        if evaluate:
            out.update(trainer.evaluate())
        return out


def _axes(override: dict) -> dict:
    """The overrides that are instance axes (they must win over the instance's own value)."""
    axes = set().union(*(f.axes for f in FAMILIES.values()))
    return {k: v for k, v in override.items() if k in axes}


# ---------------------------------------------------------------------------------- stage 1
def train_policies(bench: Bench, out: str, learners: dict[str, tuple[str, dict, dict]]) -> dict[str, list[str]]:
    """``train_policy.py`` runs of each learner (name: agent, env options, agent settings),
    continued when a rerun finds them unfinished."""
    args, paths = bench.args, {}
    T = bench.env(bench.train_instances[0]).unwrapped.T
    for name, (agent, env_options, agent_settings) in learners.items():
        paths[name] = []
        for k in range(args.policy_seeds):
            run = os.path.join(out, "policies", f"{name}-seed{k}")
            paths[name].append(os.path.join(run, "policy.pt"))
            if len(_episodes(run)) >= args.episodes:
                continue
            argv = ["--out", run, "--episodes", str(args.episodes), "--device", "cpu"]
            if os.path.isfile(os.path.join(run, "checkpoint.pt")):
                argv += ["--resume"]
            else:
                argv += ["--instances", args.instances, "--split", "train", "--agent", agent, "--seed", str(k),
                         "--num-envs", str(args.num_envs), *_sets(bench, agent, T, env_options, agent_settings)]
            if train_policy.main(argv) != 0:
                raise SystemExit(f"training {name} seed {k} failed")
    return paths


def _sets(bench: Bench, agent: str, T: int, env_options: dict, agent_settings: dict) -> list[str]:
    sets = [f"env.kwargs.{k}={json.dumps(v)}" for k, v in {**bench.override, **env_options}.items()
            if k not in _axes(bench.override)]
    if bench.args.data_root:
        sets.append(f"env.kwargs.data_root={bench.args.data_root}")
    if _axes(bench.override):  # quick mode: the instances with the overrides on top
        sets.append(f"env.kwargs.instances={json.dumps(bench.train_instances)}")
    if agent == "recurrent-ppo":  # one rollout = one episode, one minibatch (a 1-sample minibatch has no advantage std)
        sets += [f"agent.recurrent-ppo.n_steps={T}", f"agent.recurrent-ppo.batch_size={T}",
                 "agent.recurrent-ppo.n_epochs=4", "agent.recurrent-ppo.ent_coef=0.01",
                 "agent.recurrent-ppo.policy_kwargs={lstm_hidden_size: 20}",
                 "agent.recurrent-ppo.normalize=false"]  # raw observations, as the committed results/l2o policies
    sets += [f"agent.{agent}.{k}={json.dumps(v)}" for k, v in agent_settings.items()]
    return [item for s in sets for item in ("--set", s)]


def _episodes(run: str) -> list[dict]:
    path = os.path.join(run, "episodes.csv")
    if not os.path.isfile(path):
        return []
    with open(path) as fh:
        return list(csv.DictReader(fh))


def policy_budget(paths: dict[str, list[str]]) -> int:
    """B: the mean SGD steps of one policy's training episodes (over agents and seeds)."""
    return int(round(np.mean([sum(int(r["sgd_steps"]) for r in _episodes(os.path.dirname(p)))
                              for ps in paths.values() for p in ps])))


def variant_names(text: str | None) -> list[str]:
    names = list(VARIANTS) if text == "all" else [n for n in (text or "").split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)} or all")
    return names


# ---------------------------------------------------------------------------------- stage 2
class Trials:
    """tuning.jsonl: every trial of every study, so a rerun continues each study."""

    def __init__(self, path: str):
        self.path = path
        self.rows = _read_jsonl(path)

    def of(self, study: str) -> list[dict]:
        return [r for r in self.rows if r["study"] == study]

    def add(self, row: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.rows.append(row)


BOUNDS = {"head": (0.1, 1.0), "decay": (0.3, 1.0), "peak": (0.1, 1.0), "warmup": (0.0, 0.5)}
PARAMS = {"llrd": ("head", "decay"), "cosine": ("peak", "warmup", "decay")}


def _space(kind: str, trial) -> str:
    """A schedule spec from the trial's suggestions (agents.policies.schedule_levels)."""
    values = [trial.suggest_float(name, *BOUNDS[name]) for name in PARAMS[kind]]
    return f"{kind}:" + ",".join(f"{v:.3f}" for v in values)


def tune(bench: Bench, trials: Trials, study_name: str, kind: str, instances: list[dict], budget: int) -> dict:
    """Optuna TPE over one schedule's parameters on ``instances``, with as many trials as their
    SGD steps fit in ``budget`` (at least one). Returns the best trial."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    done = trials.of(study_name)
    sampler = optuna.samplers.TPESampler(seed=TUNING_SEED, n_startup_trials=3)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    for row in done:  # a rerun continues the study from its finished trials
        dists = {k: optuna.distributions.FloatDistribution(*BOUNDS[k]) for k in row["params"]}
        study.add_trial(optuna.trial.create_trial(params=row["params"], distributions=dists, value=row["value"]))
    # every trial is charged the SGD steps it plans (a diverged trial stops early and spends fewer)
    per_trial = sum(bench.env(inst).unwrapped.trainer.total_sgd_steps for inst in instances)
    with tqdm(total=budget, initial=min(len(done) * per_trial, budget), desc=f"tuning {study_name} (SGD steps)",
              leave=False) as bar:
        while not done or (len(done) + 1) * per_trial <= budget:
            trial = study.ask()
            spec = _space(kind, trial)
            runs = [bench.run(spec, inst, TUNING_SEED) for inst in instances]
            value = float(np.mean([math.log(r["loss"]) for r in runs]))
            study.tell(trial, value)
            row = {"study": study_name, "spec": spec, "params": trial.params, "value": value, "sgd_steps": per_trial,
                   "diverged": sum(r["diverged"] for r in runs)}
            trials.add(row)
            done.append(row)
            bar.update(per_trial)
    return min(done, key=lambda r: r["value"])


# ---------------------------------------------------------------------------------- stage 3
def replay_levels(bench: Bench, policy_path: str, out_path: str) -> dict:
    """The policy's mean level per decision on the tuning instances (rounded), kept in a file."""
    if os.path.isfile(out_path):
        with open(out_path) as fh:
            state = json.load(fh)
        if state.get("policy") == _identity(policy_path):
            return state
    runs = [bench.run(policy_path, inst, TUNING_SEED) for inst in bench.tuning_instances]
    finished = [r["actions"] for r in runs if not r["diverged"]]  # a diverged run stops short of T
    if not finished:  # every run diverged: each one's actions, the last repeated up to T
        T = max(len(r["actions"]) for r in runs)
        finished = [r["actions"] + r["actions"][-1:] * (T - len(r["actions"])) for r in runs]
    levels = np.rint(np.mean(finished, axis=0)).astype(int).tolist()
    state = {"levels": levels, "sgd_steps": sum(r["sgd_steps"] for r in runs), "policy": _identity(policy_path)}
    with open(out_path, "w") as fh:
        json.dump(state, fh)
    return state


# ---------------------------------------------------------------------------------- stage 5
def _identity(policy_path: str) -> str:
    """A policy file's identity: a rerun that trained it further must redo what used it."""
    with open(policy_path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:16]


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


METRICS = (("normalised", "held-out loss / reference"), ("loss", "synthetic held-out loss"),
           ("synthetic_xe", "synthetic eval XE"), ("synthetic_acc", "synthetic acc %"),
           ("synthetic_miou", "synthetic mIoU %"), ("target_acc", "real-target acc %"),
           ("target_mean_class_acc", "real-target mean-class acc %"), ("target_miou", "real-target mIoU %"),
           ("imagenet_top1", "ImageNet top-1 of θ_o %"))  # those a task reports (mIoU for segmentation)
PERCENT = {"synthetic_acc", "target_acc", "target_mean_class_acc", "imagenet_top1", "target_miou", "synthetic_miou"}


def cell(values, key: str) -> str:
    m, s, ci = mean_ci(values)
    scale = 100 if key in PERCENT else 1
    digits = 1 if key in PERCENT else 3
    return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f} [±{scale * ci:.{digits}f}]"


def write_report(bench: Bench, runs: list[dict], methods: list[str], compute: dict[str, str], out: str,
                 header: str) -> str:
    seeds = sorted({r["seed"] for r in runs})
    n_inst = len(bench.test_instances)
    reference = {j: np.mean([r["loss"] for r in runs if r["method"] == REFERENCE and r["instance"] == j])
                 for j in range(n_inst)}
    for r in runs:
        r["normalised"] = r["loss"] / reference[r["instance"]]
    by = {(r["method"], r["instance"], r["seed"]): r for r in runs}
    family = FAMILIES.get(bench.test.family)
    metrics = [(k, t) for k, t in METRICS if any(k in r for r in runs)]
    lines = [header, "", stamp_line(runs), "", "### Compute per method (SGD steps)", "", "| method | SGD steps before the evaluation runs |",
             "|---|---|"] + [f"| {m} | {compute[m]} |" for m in methods]
    lines += ["", "### Averaged over the test instances", "",
              "Each seed's mean over the instances, then mean ± std over seeds [95 % Student-t CI half-width].", "",
              "| method | " + " | ".join(t for _, t in metrics) + " |", "|---|" + "---|" * len(metrics)]
    for m in methods:
        cols = [cell([np.mean([by[(m, j, s)].get(k, np.nan) for j in range(n_inst)]) for s in seeds], k)
                for k, _ in metrics]
        lines.append(f"| {m} | " + " | ".join(cols) + " |")
    for j, inst in enumerate(bench.test_instances):
        outside = family.outside_training(bench.test.instances[j]) if family else []
        lines += ["", f"### Test instance {j}: {json.dumps(inst)}"
                  + (f" (outside the training range: {', '.join(outside)})" if outside else " (inside the training ranges)"),
                  "", "| method | " + " | ".join(t for _, t in metrics) + " | diverged |", "|---|" + "---|" * (len(metrics) + 1)]
        for m in methods:
            rs = [by[(m, j, s)] for s in seeds]
            lines.append(f"| {m} | " + " | ".join(cell([r.get(k, np.nan) for r in rs], k) for k, _ in metrics)
                         + f" | {sum(r['diverged'] for r in rs)} |")
    lines += robust_aggregates(by, methods, n_inst, seeds, bench.args.bootstrap_reps, os.path.join(out, "profiles.png"))
    text = "\n".join(lines)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(text + "\n")
    return text


def robust_aggregates(by: dict, methods: list[str], n_inst: int, seeds: list[int], reps: int, plot_path: str) -> list[str]:
    """rliable's view of the normalised score (lower is better): each method's interquartile
    mean with a 95 % stratified-bootstrap CI, the probability that each learned method improves
    on each schedule tuned with the same compute, with its CI and a paired Wilcoxon test over
    instance × seed, and performance profiles (``plot_path``)."""
    from rliable import library as rly
    from rliable import metrics
    from scipy.stats import wilcoxon

    warnings.filterwarnings("ignore", "random_state is deprecated", FutureWarning)  # rliable passes arch one
    # runs × tasks, negated so that rliable's "higher is better" holds
    scores = {m: -np.array([[by[(m, j, s)]["normalised"] for j in range(n_inst)] for s in seeds]) for m in methods}
    rng = lambda: np.random.RandomState(0)  # noqa: E731  (each estimate draws the same resamples)
    iqm, iqm_ci = rly.get_interval_estimates(scores, lambda x: np.array([metrics.aggregate_iqm(x)]), reps=reps,
                                             random_state=rng())
    lines = ["", "### Robust aggregates (rliable)", "",
             f"Interquartile mean of the normalised score over instance × seed (lower is better), with its 95 % "
             f"stratified-bootstrap CI ({reps:,} resamples of the seeds within each instance).", "",
             "| method | IQM [95 % CI] |", "|---|---|"]
    lines += [f"| {m} | {-iqm[m][0]:.3f} [{-iqm_ci[m][1][0]:.3f}, {-iqm_ci[m][0][0]:.3f}] |" for m in methods]
    learned = [m for m in methods if m.endswith("(learned)")]
    tuned = [m for m in methods if " tuned on train " in m]
    if learned and tuned:
        pairs = {f"{a} | {b}": (scores[a], scores[b]) for a in learned for b in tuned}
        p, p_ci = rly.get_interval_estimates(pairs, metrics.probability_of_improvement, reps=reps, random_state=rng())
        lines += ["", "P(improvement): the probability that a run of the learned method scores lower than a run of "
                  "the tuned schedule on the same instance, averaged over instances, with its 95 % CI; the Wilcoxon "
                  "signed-rank test pairs the two on each instance and seed.", "",
                  "| learned | tuned schedule | P(improvement) [95 % CI] | Wilcoxon p |", "|---|---|---|---|"]
        for key, (a, b) in pairs.items():
            diff = (a - b).flatten()
            test = wilcoxon(diff).pvalue if np.any(diff != 0) else 1.0
            lines.append(f"| {key.split(' | ')[0]} | {key.split(' | ')[1]} | {float(p[key]):.2f} "
                         f"[{p_ci[key][0][0]:.2f}, {p_ci[key][1][0]:.2f}] | {test:.3g} |")
    plot_profiles(scores, reps, plot_path)
    return lines


def plot_profiles(scores: dict[str, np.ndarray], reps: int, path: str) -> None:
    """Performance profiles: the fraction of runs whose normalised score is at most τ."""
    from rliable import library as rly
    from rliable import plot_utils

    plt = _plt()
    every = -np.concatenate([s.flatten() for s in scores.values()])
    taus = np.linspace(every.min(), every.max(), 41)
    profiles, cis = rly.create_performance_profile(scores, -taus, reps=reps)  # P(−score > −τ) = P(score < τ)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot_utils.plot_performance_profiles(profiles, taus, performance_profile_cis=cis, ax=ax,
                                         xlabel="normalised score τ (lower is better)",
                                         ylabel="fraction of runs with score < τ", legend=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_learning_curves(paths: dict[str, list[str]], labels: dict[str, str], window: int, path: str) -> None:
    """Return against training episode: each seed's running mean over ``window`` episodes, then
    the mean and 95 % CI over seeds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for agent, ps in paths.items():
        curves = []
        for p in ps:
            r = np.array([float(e["return"]) for e in _episodes(os.path.dirname(p))])
            curves.append(np.convolve(r, np.ones(window) / window, mode="valid"))
        n = min(map(len, curves))
        c = np.array([x[:n] for x in curves])
        stats = np.array([mean_ci(c[:, i]) for i in range(n)])
        x = np.arange(n) + window
        line, = ax.plot(x, stats[:, 0], label=f"{labels[agent]} ({len(ps)} seeds)")
        ax.fill_between(x, stats[:, 0] - stats[:, 2], stats[:, 0] + stats[:, 2], color=line.get_color(), alpha=0.15)
    ax.set(xlabel="training episode", ylabel=f"return (running mean over {window})",
           title="Learning curves on the train split (95 % CI over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scores(runs: list[dict], methods: list[str], path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(methods) + 1.2))
    for i, m in enumerate(methods):
        per_seed = {}
        for r in runs:
            if r["method"] == m:
                per_seed.setdefault(r["seed"], []).append(r["normalised"])
        mean, _, ci = mean_ci([np.mean(v) for v in per_seed.values()])
        ax.errorbar(mean, i, xerr=ci if np.isfinite(ci) else 0, fmt="o", capsize=3)
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set(yticks=range(len(methods)), yticklabels=methods, xlabel="final held-out loss / upper reference (lower is better)",
           title="Test instances: normalised score (mean, 95 % CI over seeds)")
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller copy of every stage (shorter runs, fewer instances)")
    p.add_argument("--instances", default="configs/instances/syndigits.yaml", help="instance file with train and test splits")
    p.add_argument("--out", help="output folder (default: runs/l2o, or runs/l2o-quick with --quick; the published run is results/l2o)")
    p.add_argument("--episodes", type=int, help="training episodes of each learned policy")
    p.add_argument("--policy-seeds", type=int, help="policies trained per agent (their learning curves' CI)")
    p.add_argument("--seeds", type=int, help="evaluation seeds per method and test instance (at least 3 for claims)")
    p.add_argument("--tune-instances", type=int, help="train instances every tuning trial and replay runs")
    p.add_argument("--reference-trials", type=int, help="trials of each schedule per test instance (upper reference)")
    p.add_argument("--test-instances", type=int, help="use only the first N test instances (0: all)")
    p.add_argument("--num-envs", type=int, default=1, help="episodes at once while policies train (train_policy.py --num-envs)")
    p.add_argument("--override", help="JSON settings on top of every instance (for tests)")
    p.add_argument("--data-root", help="cache folder of the rendered images")
    p.add_argument("--variants", help=f"comma-separated learned variants to add, or all: {', '.join(VARIANTS)}")
    p.add_argument("--bootstrap-reps", type=int, help="resamples of rliable's stratified bootstrap CIs (10,000; quick 2,000)")
    p.add_argument("--train-only", action="store_true",
                   help="stop after stage 1, the learned policies; with --variants, train only the variants (so it can "
                        "run beside a run of the two agents)")
    args = p.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if isinstance(args.override, str):
        try:
            args.override = {**preset["override"], **json.loads(args.override)}
        except json.JSONDecodeError as exc:
            p.error(f"--override is not JSON: {exc}")
    if min(args.episodes, args.policy_seeds, args.seeds, args.tune_instances, args.reference_trials, args.num_envs,
           args.bootstrap_reps) < 1 \
            or args.test_instances < 0:
        p.error("--episodes, --policy-seeds, --seeds, --tune-instances, --reference-trials, --num-envs and "
                "--bootstrap-reps must be at "
                "least 1, and --test-instances at least 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or ("runs/l2o-quick" if args.quick else os.path.join("runs", "l2o"))
    os.makedirs(os.path.join(out, "policies"), exist_ok=True)
    start = time.perf_counter()
    bench = Bench(args)
    if args.seeds > args.policy_seeds:
        raise SystemExit("error: --seeds must not exceed --policy-seeds (learned method k is evaluated with policy seed k)")

    variants = variant_names(args.variants)
    if args.train_only and variants:  # the variants alone, so this can run beside a run that trains the agents
        train_policies(bench, out, {v: VARIANTS[v] for v in variants})
        print(f"policies in {out}/policies/")
        return 0
    paths = train_policies(bench, out, {agent: (agent, {}, {}) for agent in LEARNED})
    budget = policy_budget(paths)
    variant_paths = train_policies(bench, out, {v: VARIANTS[v] for v in variants})
    if args.train_only:
        print(f"policies in {out}/policies/")
        return 0
    trials = Trials(os.path.join(out, "tuning.jsonl"))
    specs, compute = {}, {}
    for agent, name in LEARNED.items():
        specs[f"{name} (learned)"] = ("policy", paths[agent])
        compute[f"{name} (learned)"] = f"{budget:,} (training, mean over {len(paths[agent])} seeds)"
    for v in variants:
        specs[f"{v} (learned)"] = ("variant", (variant_paths[v], VARIANTS[v][1]))
        compute[f"{v} (learned)"] = f"{policy_budget({v: variant_paths[v]}):,} (training, mean over {len(variant_paths[v])} seeds)"
    for agent, name in LEARNED.items():
        replays = [replay_levels(bench, p, os.path.join(out, "policies", f"replay-{agent}-seed{k}.json"))
                   for k, p in enumerate(paths[agent])]
        specs[f"{name} open-loop replay"] = ("replay", [r["levels"] for r in replays])
        compute[f"{name} open-loop replay"] = f"{budget:,} + {int(np.mean([r['sgd_steps'] for r in replays])):,} (replay runs)"
    for kind in SCHEDULES:
        best = tune(bench, trials, f"{kind}-train", kind, bench.tuning_instances, budget)
        name = f"{kind} tuned on train ({best['spec']})"
        specs[name] = ("baseline", best["spec"])
        compute[name] = f"{sum(r['sgd_steps'] for r in trials.of(f'{kind}-train')):,} ({len(trials.of(f'{kind}-train'))} trials)"
    reference = {}
    for j, inst in enumerate(bench.test_instances):
        best = [_reference(bench, trials, kind, j, inst) for kind in SCHEDULES]
        reference[j] = min(best, key=lambda r: r["value"])["spec"]
    steps = sum(r["sgd_steps"] for r in trials.rows if "-test" in r["study"])
    specs[REFERENCE] = ("reference", reference)
    compute[REFERENCE] = f"{steps:,} in all ({args.reference_trials} trials of each schedule on each test instance)"
    for spec, name in NAMED.items():
        specs[name] = ("baseline", spec)
        compute[name] = "0"

    path = os.path.join(out, "results.jsonl")
    runs = {(r["method"], r["instance"], r["seed"]): r for r in _read_jsonl(path)}
    seeds = [FIRST_SEED + k for k in range(args.seeds)]
    cells = [(k, j, m) for k in range(args.seeds) for j in range(len(bench.test_instances)) for m in specs]
    for k, j, m in tqdm(cells, desc="evaluation runs"):
        kind, value = specs[m]
        inst, extra, policy, spec = bench.test_instances[j], {}, None, None
        if kind == "policy":
            spec, identity = value[k], _identity(value[k])
        elif kind == "variant":
            spec, extra = value[0][k], value[1]
            identity = _identity(spec)
        elif kind == "replay":
            policy, identity = OpenLoopPolicy(value[k]), json.dumps(value[k])
        else:
            spec = value[j] if kind == "reference" else value
            extra = {**baseline_env_kwargs(spec), **NAMED_ENV.get(spec, {})}
            identity = json.dumps([spec, extra, inst])
        if runs.get((m, j, seeds[k]), {}).get("identity") == identity:
            continue  # a rerun redoes a run whose policy or schedule has changed since
        result = bench.run(spec, inst, seeds[k], extra, evaluate=True, policy=policy)
        row = {"method": m, "instance": j, "seed": seeds[k], "identity": identity,
               **{k_: v for k_, v in result.items() if k_ != "actions"},
               **stamp({"identity": identity, "instance": inst, "override": bench.override})}
        with open(path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        runs[(m, j, seeds[k])] = row

    methods = list(specs)
    rows = [runs[(m, j, s)] for m in methods for j in range(len(bench.test_instances)) for s in seeds]
    plot_learning_curves({**paths, **variant_paths}, {**LEARNED, **{v: v for v in variants}},
                         max(1, min(len(bench.train_instances), args.episodes // 2)),
                         os.path.join(out, "learning_curves.png"))
    header = (f"{bench.test.family} family ({args.instances}), {'quick' if args.quick else 'full'} mode: "
              f"{len(bench.train_instances)} train instances, {len(bench.test_instances)} test instances, "
              f"evaluation seeds {seeds}. Learned policies: {args.episodes} episodes × {args.policy_seeds} seeds per "
              f"agent, B = {budget:,} SGD steps each"
              + (f"; variants {', '.join(variants)}, as many episodes and seeds each" if variants else "")
              + f". Tuning instances: {args.tune_instances}. "
              f"Wall time of this invocation {(time.perf_counter() - start) / 60:.1f} min.")
    text = write_report(bench, rows, methods, compute, out, header)
    plot_scores(rows, methods, os.path.join(out, "scores.png"))
    print(text)
    print(f"results in {out}/")
    return 0


def _reference(bench: Bench, trials: Trials, kind: str, j: int, inst: dict) -> dict:
    """``--reference-trials`` trials of one schedule on test instance ``j`` (a trial budget)."""
    done = trials.of(f"{kind}-test{j}")
    if len(done) < bench.args.reference_trials:
        per_trial = bench.env(inst).unwrapped.trainer.total_sgd_steps
        tune(bench, trials, f"{kind}-test{j}", kind, [inst], per_trial * bench.args.reference_trials)
    return min(trials.of(f"{kind}-test{j}"), key=lambda r: r["value"])


if __name__ == "__main__":
    sys.exit(main())
