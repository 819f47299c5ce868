"""Do learned layer-wise learning-rate policies beat schedules tuned with the same compute, on
fine-tuning runs they were not trained on?

The family (``configs/instances/syndigits_long.yaml``, family ``syndigits-long`` of
``asg_env/envs/instances.py``) poses the problem: 32-pixel SynDigits runs of 384 or 512 SGD steps
on EfficientNet-Lite0/1 (train split) and Lite0/1/2 with η_base outside the training range (test
split). Compute is counted in SGD steps.

Stages, each kept in --out as it finishes; a rerun continues where the last one stopped:

0. **Pilot and design** (``design.json``). Three named settings on ``--pilot-instances`` train
   instances × 3 pilot seeds give the spread σ of the paired per-instance difference in the
   normalised score (below), over the pairs whose mean scores lie within :data:`CLOSE` of each
   other (a pair further apart needs no power to be told apart); the design is the fewest test
   instances (never below 12) at which a paired t-test detects a difference of :data:`EFFECT`
   with 80 % power (α = 0.05, two-sided), with 3 run seeds.
1. **Learned policies: the learning gate** (``benchmarks/learning_gate.py`` on the family,
   ``--policy-seeds`` policies per agent, ``--episodes`` each, at the family's meta-training
   size: 16-SGD-step episodes). Its verdict is the "gate" column. B, one policy's meta-training
   in SGD steps (the mean over agents and seeds), is every tuned schedule's budget.
2. **Schedules tuned on the train split with B** (Optuna, one study per schedule, its own
   sampler seed): one global learning rate (every coordinate at one level; a grid of the 10
   levels), ``llrd:HEAD,DECAY`` and ``cosine:PEAK,WARMUP,DECAY`` (TPE). A trial runs
   ``--tune-instances`` train instances on the validation run seed :data:`VALIDATION_SEED`
   (never a test seed); its value is the mean capped score over initial loss. Trials run while
   their SGD steps fit in B. Studies live in ``--storage`` (default: SQLite in --out), so an
   interrupted study resumes, and machines that share an RDB URL share the study.
3. **Tuned on the test instance, k trials**: ``--test-trials`` TPE trials of llrd or cosine on
   each test instance itself (validation seed), starting from the two train-tuned schedules. It
   spends compute on the test instance that no other method gets; the report says on which
   instances it is not at least as good as every named setting.
4. **Evaluation**: every method on every test instance with ``--seeds`` run seeds (learned
   method run k uses policy k mod P), ``--jobs`` runs at once. Rows go to results.jsonl.
5. **Report** (results.md, profiles.png, scores.png, learning_curves.png).

**Score.** The final cross-entropy on the instance's 500 held-out synthetic images; a run that
diverged, is non-finite or ends above its initial loss L0 scores L0 ("capped", counted in its
own column). Normalised per instance: (L − L_best) / (L0 − L_best), with L_best the best mean of
any method on that instance and L0 the instance's mean initial loss: 0 is the best seen, 1 no
progress. The real target is read only by the evaluation runs, at their end.

**Provenance.** Every row carries ``commit``, ``settings_hash`` (of what made the run) and
``code_hash`` (of the code the result depends on: ``asg_env/``, ``agents/``, ``train_policy.py`` and
these two benchmarks, hashed by content). A rerun refuses an --out whose benchmark settings
differ (``settings.json``), and refuses rows made by other code (another ``code_hash``) unless
``--drop-stale`` moves them to stale.jsonl to be rerun: rows of several commits mix only where
the code they depend on is byte-identical.

    python -m benchmarks.l2o_benchmark --quick    # every stage at 8-SGD-step runs, 2 test instances
    python -m benchmarks.l2o_benchmark            # full, resumable
    python -m benchmarks.l2o_benchmark --publish  # and copy what it made to results/l2o/
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

import asg_env  # noqa: F401  (registers the ids)
from agents.check import score_run
from agents.loading import load_policy
from agents.policies import baseline_env_kwargs
from asg_env.envs.instances import FAMILIES, load_instances
from asg_env.provenance import ROOT, git_commit, settings_hash
from benchmarks import learning_gate
from benchmarks.compare_policies import _plt, mean_ci

EFFECT = 0.05  # the difference in normalised score the design must detect
POWER, ALPHA, MIN_INSTANCES = 0.8, 0.05, 12
FIRST_SEED = 100  # test run seeds 100, 101, …
VALIDATION_SEED = 7  # every tuning trial's runs; never a test seed
PILOT_SEEDS = (200, 201, 202)
PILOT_METHODS = ("large-everywhere", "small-backbone-large-classifier", "hand-tuned")
CLOSE = 0.25  # pairs of pilot methods whose mean normalised scores differ by less set the spread σ
SAMPLER_SEEDS = {"global": 11, "llrd": 12, "cosine": 13, "test": 14}  # each study its own
PRESETS = {
    "full": dict(episodes=1000, policy_seeds=3, seeds=3, tune_instances=2, test_trials=12, pilot_instances=4,
                 test_instances=0, bootstrap_reps=10_000, override={}),
    # a smaller copy of every stage (8-SGD-step runs, two test instances), not a claim
    "quick": dict(episodes=3, policy_seeds=2, seeds=3, tune_instances=1, test_trials=2, pilot_instances=2,
                  test_instances=2, bootstrap_reps=2_000,
                  override={"source_size": 256, "epochs": 1, "synthetic_eval_size": 100, "target_eval_size": 200}),
}
NAMED = {"random": "random", "hand-tuned": "hand-tuned (official poly schedule)",
         "small-backbone-large-classifier": "small backbone + large FC", "large-everywhere": "large everywhere",
         "classifier-only": "classifier only"}
SCHEDULES = ("global", "llrd", "cosine")
BOUNDS = {"head": (0.1, 1.0), "decay": (0.3, 1.0), "peak": (0.1, 1.0), "warmup": (0.0, 0.5)}
PARAMS = {"llrd": ("head", "decay"), "cosine": ("peak", "warmup", "decay")}
CODE = ("asg_env", "agents", "train_policy.py", "benchmarks/l2o_benchmark.py", "benchmarks/learning_gate.py")
EVAL_KEYS = ("synthetic_acc", "target_acc", "target_mean_class_acc", "imagenet_top1")


def code_hash() -> str:
    """A hash of the content of the code the results depend on (:data:`CODE`, ``*.py`` files)."""
    h = hashlib.sha256()
    for entry in CODE:
        path = os.path.join(ROOT, entry)
        files = sorted(glob.glob(os.path.join(path, "**", "*.py"), recursive=True)) if os.path.isdir(path) else [path]
        for f in files:
            h.update(os.path.relpath(f, ROOT).encode())
            with open(f, "rb") as fh:
                h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()[:12]


# ------------------------------------------------------------------------------ one run
_ENVS: dict[str, gym.Env] = {}


def run(task: dict) -> dict:
    """One fine-tuning run of ``task["spec"]`` (a baseline or a policy file) in the env
    ``task["kwargs"]`` with run seed ``task["seed"]``: its capped score, its initial loss and,
    with ``task["evaluate"]``, the evaluation at its end (the real target among it)."""
    key = json.dumps([task["env_id"], task["kwargs"]], sort_keys=True)
    if key not in _ENVS:  # one env at a time per process; tasks come ordered by instance
        for env in _ENVS.values():
            env.close()
        _ENVS.clear()
        _ENVS[key] = gym.make(task["env_id"], **task["kwargs"])
    env = _ENVS[key]
    start = time.perf_counter()
    result = score_run(env, load_policy(task["spec"], env, deterministic=True, seed=task["seed"]), task["seed"])
    row = {"score_loss": result["score"], "initial_loss": result["initial"], "diverged": result["diverged"],
           "capped": result["diverged"] or result["score"] >= result["initial"], "sgd_steps": result["sgd_steps"]}
    if task.get("evaluate"):
        metrics = env.unwrapped.trainer.evaluate()
        row.update({k: float(metrics[k]) for k in EVAL_KEYS if k in metrics})
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def run_keyed(item: tuple[dict, object]) -> dict:
    """:func:`run` of a (task, key) pair, so that the key comes back beside the result."""
    return run(item[0])


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")


def in_parallel(fn, items: list, jobs: int, desc: str):
    """``(item, fn(item))`` as each finishes, ``jobs`` worker processes of one thread each (in
    this process when ``jobs`` is 1)."""
    if jobs == 1 or len(items) <= 1:
        for item in tqdm(items, desc=desc, leave=False):
            yield item, fn(item)
        return
    import multiprocessing

    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
    try:
        futures = {pool.submit(fn, item): item for item in items}
        for future in tqdm(as_completed(futures), total=len(items), desc=desc, leave=False):
            yield futures[future], future.result()
    finally:  # on an error or a kill, drop the queued runs instead of waiting for them
        pool.shutdown(wait=True, cancel_futures=True)


class Bench:
    """The family's splits (with the benchmark's overrides), and the task of any run."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.train = load_instances(args.instances, "train")
        self.test = load_instances(args.instances, "test")
        self.family = FAMILIES.get(self.train.family)
        if self.family is None:
            raise SystemExit(f"error: {args.instances}: family {self.train.family!r} is not registered")
        axes = {k: v for k, v in args.override.items() if k in self.family.axes}
        self.base = {**self.train.base, **{k: v for k, v in args.override.items() if k not in axes},
                     "evaluate_target": False, "synthetic_score": True}
        if args.data_root:
            self.base["data_root"] = args.data_root
        self.train_instances = [{**i, **axes} for i in self.train.instances]
        self.test_instances = [{**i, **axes} for i in self.test.instances]
        if args.test_instances:
            self.test_instances = self.test_instances[: args.test_instances]
        order = np.random.default_rng(0).permutation(len(self.train_instances))
        self.tuning_instances = [self.train_instances[i] for i in order[: args.tune_instances]]
        self.pilot_instances = [self.train_instances[i] for i in order[::-1][: args.pilot_instances]]

    def task(self, spec: str, instance: dict, seed: int, evaluate: bool = False) -> dict:
        extra = baseline_env_kwargs(spec) if not spec.endswith(".pt") else {}
        return {"env_id": self.train.env_id, "kwargs": {**self.base, **instance, **extra}, "spec": spec, "seed": seed,
                "evaluate": evaluate}

    def settings(self) -> dict:
        """What the benchmark's rows depend on, beside the code (settings.json)."""
        a = self.args
        return {"instances": {"train": self.train.digest, "test": self.test.digest}, "test_instances": a.test_instances,
                "override": a.override, "episodes": a.episodes, "policy_seeds": a.policy_seeds,
                "tune_instances": a.tune_instances, "test_trials": a.test_trials, "pilot_instances": a.pilot_instances,
                "gate_agents": learning_gate.AGENTS}


def normalise(scores: dict, initial: dict) -> dict:
    """(L − L_best) / (L0 − L_best) per instance: ``scores[(method, instance)]`` the runs' scores,
    ``initial[instance]`` the instance's initial losses; L_best the best method's mean."""
    best = {}
    for (m, j), v in scores.items():
        best[j] = min(best.get(j, np.inf), float(np.mean(v)))
    scale = {j: float(np.mean(initial[j])) - best[j] for j in best}
    return {(m, j): (np.asarray(v) - best[j]) / scale[j] if scale[j] > 1e-9 else np.ones(len(v))
            for (m, j), v in scores.items()}  # where no method made progress, every run scores 1


def mde_at(sigma: float, n: int) -> float:
    """The minimum detectable effect of a paired t-test over ``n`` instances whose differences
    spread ``sigma`` (:data:`POWER`, two-sided :data:`ALPHA`)."""
    from scipy.stats import t

    return float((t.ppf(1 - ALPHA / 2, n - 1) + t.ppf(POWER, n - 1)) * sigma / math.sqrt(n))


def required_instances(sigma: float, effect: float = EFFECT) -> tuple[int, int, float]:
    """(the instances needed to detect ``effect``, the design: at least :data:`MIN_INSTANCES`,
    and the minimum detectable effect at the design)."""
    if not np.isfinite(sigma) or sigma < 0:
        raise SystemExit(f"error: the pilot's spread is {sigma}; rerun the pilot (remove design.json)")
    n = 2
    while mde_at(sigma, n) > effect and n < 10_000:
        n += 1
    design = max(n, MIN_INSTANCES)
    return n, design, mde_at(sigma, design)


# ---------------------------------------------------------------------------- stage 0
def pilot(bench: Bench, out: str) -> dict:
    """The design from a pilot on train instances (design.json; each pilot run is kept in
    pilot.jsonl as it finishes, so a rerun continues)."""
    path, runs_path = os.path.join(out, "design.json"), os.path.join(out, "pilot.jsonl")
    if os.path.isfile(path):
        return read_json(path)
    tasks = [(m, j, s) for j in range(len(bench.pilot_instances)) for m in PILOT_METHODS for s in PILOT_SEEDS]
    rows = {(r["method"], r["instance"], r["seed"]): r for r in read_rows(runs_path)}
    items = [(bench.task(m, bench.pilot_instances[j], s), (m, j, s)) for (m, j, s) in tasks if (m, j, s) not in rows]
    with open(runs_path, "a") as fh:
        for (_, (m, j, s)), result in in_parallel(run_keyed, items, bench.args.jobs, "pilot runs"):
            rows[(m, j, s)] = {"method": m, "instance": j, "seed": s, **result}
            fh.write(json.dumps(rows[(m, j, s)]) + "\n")
            fh.flush()
    scores = {(m, j): [rows[(m, j, s)]["score_loss"] for s in PILOT_SEEDS] for m in PILOT_METHODS
              for j in range(len(bench.pilot_instances))}
    initial = {j: [rows[(m, j, s)]["initial_loss"] for m in PILOT_METHODS for s in PILOT_SEEDS]
               for j in range(len(bench.pilot_instances))}
    norm = normalise(scores, initial)
    spreads, gaps = {}, {}
    for a in PILOT_METHODS:
        for b in PILOT_METHODS:
            if a < b:
                diff = [float(np.mean(norm[(a, j)] - norm[(b, j)])) for j in range(len(bench.pilot_instances))]
                spreads[f"{a} − {b}"], gaps[f"{a} − {b}"] = float(np.std(diff, ddof=1)), abs(float(np.mean(diff)))
    # the spread between methods close enough for a 0.05 difference to matter (a pair CLOSE apart
    # or more is told apart by any design); all pairs where none is that close
    close = [k for k in spreads if gaps[k] < CLOSE] or list(spreads)
    sigma = max(spreads[k] for k in close)
    needed, design, mde = required_instances(sigma)
    result = {"sigma": sigma, "spreads": spreads, "mean_differences": gaps, "close_pairs": close, "needed_instances": needed, "instances": design,
              "seeds": len(PILOT_SEEDS), "mde": mde, "effect": EFFECT, "power": POWER, "alpha": ALPHA,
              "pilot_instances": bench.pilot_instances, "pilot_seeds": list(PILOT_SEEDS),
              "runs": [rows[t] for t in tasks],
              "commit": git_commit(), "code_hash": code_hash()}
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    return result


# ---------------------------------------------------------------------------- stage 1
def gate(bench: Bench, out: str) -> tuple[dict[str, list[str]], dict[str, dict]]:
    """Meta-train and gate the agents' policies (benchmarks/learning_gate.py, resumable)."""
    a = bench.args
    gate_out = a.gate_out or os.path.join(out, "gate")
    argv = ["--instances", a.instances, "--out", gate_out, "--episodes", str(a.episodes), "--seeds",
            str(a.policy_seeds), "--jobs", str(a.jobs), "--run-seeds", "1" if a.quick else "2"]
    if a.data_root:
        argv += ["--data-root", a.data_root]
    if learning_gate.main(argv) != 0:
        raise SystemExit("error: the learning gate failed")
    summary = {s["agent"]: s for s in read_json(os.path.join(gate_out, "summary.json"))}
    paths = {agent: [os.path.join(gate_out, f"{agent}-seed{k}", "policy.pt") for k in range(a.policy_seeds)]
             for agent in summary}
    return paths, summary


# ---------------------------------------------------------------------------- stage 2
def storage(url: str):
    import optuna

    kwargs = {"engine_kwargs": {"connect_args": {"timeout": 120}}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():  # heartbeats are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180, **kwargs)


def _spec(kind: str, trial) -> str:
    """A schedule spec from the trial's suggestions (``agents.policies.schedule_levels``); the
    test-instance search also picks the schedule, and prefixes its parameters with it."""
    if kind == "global":  # one level everywhere: llrd without decay
        return f"llrd:{trial.suggest_int('level', 1, 10) / 10:.1f},1.0"
    prefix = ""
    if kind == "test":
        kind = trial.suggest_categorical("kind", ["llrd", "cosine"])
        prefix = f"{kind}_"
    values = [trial.suggest_float(prefix + name, *BOUNDS[name]) for name in PARAMS[kind]]
    return f"{kind}:" + ",".join(f"{v:.3f}" for v in values)


def study_steps(study) -> int:
    import optuna

    return sum(int(t.user_attrs.get("sgd_steps", 0)) for t in study.get_trials(deepcopy=False)
               if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING))


def tune(job: dict) -> dict:
    """One Optuna study (its name, kind, instances, budget in SGD steps or a trial count, the
    tasks' settings), continued from the storage; returns its best trial."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats, stale trials
    sampler = optuna.samplers.TPESampler(seed=job["sampler_seed"], n_startup_trials=4)
    study = optuna.create_study(study_name=job["name"], storage=storage(job["storage"]), sampler=sampler,
                                direction="minimize", load_if_exists=True)
    optuna.storages.fail_stale_trials(study)
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not study.trials:
        for params in job.get("enqueue", []):
            study.enqueue_trial(params)
    if job["kind"] == "global":  # each of the 10 levels once, lowest first; a trial killed midway is redone
        tried = {t.params.get("level") for t in finished}
        job = {**job, "levels": [level for level in range(1, 11) if level not in tried]}

    def per_trial() -> int:  # what a whole trial spends, as the finished ones did (a diverged one stops early)
        return max((int(t.user_attrs["sgd_steps"]) for t in study.trials
                    if t.state == optuna.trial.TrialState.COMPLETE), default=0)

    def objective(trial):
        spec = _spec(job["kind"], trial)
        trial.set_user_attr("spec", spec)
        trial.set_user_attr("sgd_steps", per_trial())  # charged up front: other machines see it running
        rows = [run({**task, "spec": spec, "kwargs": {**task["kwargs"], **baseline_env_kwargs(spec)}})
                for task in job["tasks"]]
        trial.set_user_attr("sgd_steps", sum(r["sgd_steps"] for r in rows))  # what the runs spent
        trial.set_user_attr("diverged", sum(r["capped"] for r in rows))
        return float(np.mean([r["score_loss"] / r["initial_loss"] for r in rows]))

    if "trials" in job:
        while len(finished := [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) < job["trials"]:
            study.optimize(objective, n_trials=1)
    else:
        while not finished or study_steps(study) + per_trial() <= job["budget"]:
            if job["kind"] == "global":
                if not job["levels"]:
                    break  # every level tried
                study.enqueue_trial({"level": job["levels"].pop(0)})
            study.optimize(objective, n_trials=1)
            finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value)
    return {"name": job["name"], "spec": best.user_attrs["spec"], "value": best.value, "params": best.params,
            "trials": len(complete), "sgd_steps": sum(int(t.user_attrs["sgd_steps"]) for t in complete)}


def tuned_schedules(bench: Bench, budget: int, digest: str) -> dict[str, dict]:
    """Stage 2: one study per schedule on the train split's tuning instances, within ``budget``."""
    tasks = [bench.task("", inst, VALIDATION_SEED) for inst in bench.tuning_instances]
    jobs = [{"name": f"{kind}-train-{digest}", "kind": kind, "tasks": tasks, "budget": budget,
             "storage": bench.args.storage, "sampler_seed": SAMPLER_SEEDS[kind]} for kind in SCHEDULES]
    return {job["kind"]: best for job, best in in_parallel(tune, jobs, bench.args.jobs, "tuning on train")}


def tuned_on_test(bench: Bench, tuned: dict[str, dict], digest: str) -> list[dict]:
    """Stage 3: ``--test-trials`` trials on each test instance, the train-tuned llrd and cosine first."""
    enqueue = [{"kind": k, **{f"{k}_{n}": float(v) for n, v in zip(PARAMS[k], tuned[k]["spec"].split(":")[1].split(","))}}
               for k in ("llrd", "cosine")]
    jobs = [{"name": f"test{j}-{digest}", "kind": "test", "tasks": [bench.task("", inst, VALIDATION_SEED)],
             "trials": bench.args.test_trials, "enqueue": enqueue,
             "storage": bench.args.storage, "sampler_seed": SAMPLER_SEEDS["test"] + j}
            for j, inst in enumerate(bench.test_instances)]
    found = {job["name"]: best for job, best in in_parallel(tune, jobs, bench.args.jobs, "tuning on test instances")}
    return [found[job["name"]] for job in jobs]


# ---------------------------------------------------------------------------- stage 4
def read_json(path: str):
    with open(path) as fh:
        return json.load(fh)


def read_rows(path: str) -> list[dict]:
    """A JSON-lines file's rows; a last line cut short by a kill is dropped (its run is redone)."""
    if not os.path.isfile(path):
        return []
    with open(path) as fh:
        lines = [line for line in fh if line.strip()]
    rows = [json.loads(line) for line in lines[:-1]]
    try:
        rows += [json.loads(line) for line in lines[-1:]]
    except json.JSONDecodeError:
        with open(path, "w") as fh:
            fh.writelines(lines[:-1])
    return rows


def file_digest(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:16]


def evaluate(bench: Bench, methods: dict, out: str, drop_stale: bool) -> list[dict]:
    """Every method × test instance × seed, once; ``methods[name](j, k)`` is the spec of the
    method's run on test instance j with run seed index k."""
    path, code = os.path.join(out, "results.jsonl"), code_hash()
    seeds = [FIRST_SEED + k for k in range(bench.args.seeds)]
    cells = {}
    for j, inst in enumerate(bench.test_instances):
        for m, specs in methods.items():
            for k, seed in enumerate(seeds):
                spec = specs(j, k)
                task = bench.task(spec, inst, seed, evaluate=True)
                identity = file_digest(spec) if spec.endswith(".pt") else spec
                cells[(m, j, seed)] = (task, {"method": m, "instance": j, "seed": seed, "identity": identity,
                                              "settings_hash": settings_hash({"identity": identity,
                                                                              "kwargs": task["kwargs"], "seed": seed})})
    rows = read_rows(path)
    # a row is stale when other code made it, or its cell is now run another way (a retrained policy,
    # another tuned schedule); rows of cells the run no longer has are kept as they are
    stale = [r for r in rows if r.get("code_hash") != code or (
        (r["method"], r["instance"], r["seed"]) in cells
        and cells[(r["method"], r["instance"], r["seed"])][1]["settings_hash"] != r.get("settings_hash"))]
    if stale:
        if not drop_stale:
            commits = sorted({r.get("commit", "?") for r in stale})
            raise SystemExit(f"error: {len(stale)} row(s) of {path} were made by other code or with other settings "
                             f"(commits {', '.join(commits)}; code hash now {code}); rerun with --drop-stale to move "
                             f"them to stale.jsonl and redo them")
        with open(os.path.join(out, "stale.jsonl"), "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in stale)
        rows = [r for r in rows if r not in stale]
        with open(path, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    done = {(r["method"], r["instance"], r["seed"]): r for r in rows}
    items = [cell for key, cell in cells.items() if key not in done]
    commit = git_commit()
    with open(path, "a") as fh:
        for (_, key), result in in_parallel(run_keyed, items, bench.args.jobs, "evaluation runs"):
            row = {**key, **result, "commit": commit, "code_hash": code}
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            done[(key["method"], key["instance"], key["seed"])] = row
    return [done[(m, j, s)] for m in methods for j in range(len(bench.test_instances)) for s in seeds]


# ---------------------------------------------------------------------------- stage 5
def robust_aggregates(norm: dict, methods: list[str], learned: list[str], baselines: list[str], n_inst: int,
                      reps: int, plot_dir: str) -> tuple[list[str], dict]:
    """rliable's view of the normalised score (lower is better): each method's interquartile
    mean with a 95 % stratified-bootstrap CI, the probability that each learned method improves
    on each baseline (with its CI, and a paired Wilcoxon test over instance × seed), and
    performance profiles (profiles.png) and the IQMs (scores.png) in ``plot_dir``."""
    from rliable import library as rly
    from rliable import metrics
    from scipy.stats import wilcoxon

    warnings.filterwarnings("ignore", "random_state is deprecated", FutureWarning)  # rliable passes arch one
    # runs × tasks, negated so that rliable's "higher is better" holds
    scores = {m: -np.stack([norm[(m, j)] for j in range(n_inst)], axis=1) for m in methods}
    rng = lambda: np.random.RandomState(0)  # noqa: E731  (each estimate draws the same resamples)
    iqm, iqm_ci = rly.get_interval_estimates(scores, lambda x: np.array([metrics.aggregate_iqm(x)]), reps=reps,
                                             random_state=rng())
    found = {"iqm": {m: (-float(iqm[m][0]), -float(iqm_ci[m][1][0]), -float(iqm_ci[m][0][0])) for m in methods},
             "improvement": {}}
    lines = []
    if learned and baselines:
        pairs = {f"{a} | {b}": (scores[a], scores[b]) for a in learned for b in baselines}
        p, p_ci = rly.get_interval_estimates(pairs, metrics.probability_of_improvement, reps=reps, random_state=rng())
        lines += ["P(improvement): the probability that a run of the learned method scores lower than a run of the "
                  "baseline on the same instance, averaged over instances, with its 95 % stratified-bootstrap "
                  "CI; the Wilcoxon signed-rank test pairs the two on each instance and seed.", "",
                  "| learned | baseline | P(improvement) [95 % CI] | Wilcoxon p |", "|---|---|---|---|"]
        for key, (a, b) in pairs.items():
            diff = (a - b).flatten()
            test = float(wilcoxon(diff).pvalue) if np.any(diff != 0) else 1.0
            found["improvement"][key] = (float(p[key]), float(p_ci[key][0][0]), float(p_ci[key][1][0]), test)
            lines.append(f"| {key.split(' | ')[0]} | {key.split(' | ')[1]} | {float(p[key]):.2f} "
                         f"[{p_ci[key][0][0]:.2f}, {p_ci[key][1][0]:.2f}] | {test:.3g} |")
    plot_profiles(scores, reps, os.path.join(plot_dir, "profiles.png"))
    plot_iqm(found["iqm"], os.path.join(plot_dir, "scores.png"))
    return lines, found


def plot_profiles(scores: dict[str, np.ndarray], reps: int, path: str) -> None:
    """Performance profiles: the fraction of runs whose normalised score is at most τ."""
    from rliable import library as rly
    from rliable import plot_utils

    plt = _plt()
    every = -np.concatenate([s.flatten() for s in scores.values()])
    taus = np.linspace(every.min(), min(every.max(), 1.0), 41)
    profiles, cis = rly.create_performance_profile(scores, -taus, reps=reps)  # P(−score > −τ) = P(score < τ)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    plot_utils.plot_performance_profiles(profiles, taus, performance_profile_cis=cis, ax=ax,
                                         xlabel="normalised score τ (0 best seen, 1 no progress)",
                                         ylabel="fraction of runs with score < τ", legend=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_iqm(iqm: dict[str, tuple[float, float, float]], path: str) -> None:
    plt = _plt()
    methods = list(iqm)
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(methods) + 1.2))
    for i, m in enumerate(methods):
        mid, low, high = iqm[m]
        ax.errorbar(mid, i, xerr=[[mid - low], [high - mid]], fmt="o", capsize=3)
    ax.set(yticks=range(len(methods)), yticklabels=methods, xlabel="IQM of the normalised score (lower is better)",
           title="Test instances × seeds: IQM with 95 % stratified-bootstrap CI")
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def observed_mde(norm: dict, a: str, b: str, n_inst: int) -> float:
    """The effect this run detects between ``a`` and ``b`` with 80 % power (paired over instances)."""
    return mde_at(float(np.std([np.mean(norm[(a, j)] - norm[(b, j)]) for j in range(n_inst)], ddof=1)), n_inst)


def pct(values) -> str:
    v = [x for x in values if x is not None and np.isfinite(x)]
    return f"{100 * np.mean(v):.1f}" if v else "—"


def write_report(bench: Bench, rows: list[dict], kinds: dict[str, str], info: dict, out: str) -> tuple[str, dict]:
    """results.md: the design and its minimum detectable effect, the aggregate table, the
    improvement of each learned method over each tuned schedule, per-instance scores and checks."""
    methods, n_inst = list(kinds), len(bench.test_instances)
    seeds = sorted({r["seed"] for r in rows})
    by = {(r["method"], r["instance"], r["seed"]): r for r in rows}
    scores = {(m, j): [by[(m, j, s)]["score_loss"] for s in seeds] for m in methods for j in range(n_inst)}
    initial = {j: [by[(m, j, s)]["initial_loss"] for m in methods for s in seeds] for j in range(n_inst)}
    norm = normalise(scores, initial)
    learned = [m for m in methods if kinds[m] == "learned"]
    tuned = [m for m in methods if kinds[m] == "tuned"]
    baselines = [m for m in methods if kinds[m] != "learned"]
    agg_lines, found = robust_aggregates(norm, methods, learned, baselines, n_inst, bench.args.bootstrap_reps, out)
    best_tuned = min(tuned, key=lambda m: found["iqm"][m][0]) if tuned else None
    design = info["design"]
    observed = {m: observed_mde(norm, m, best_tuned, n_inst) for m in learned} if best_tuned and n_inst > 1 else {}
    commits = sorted({r["commit"] for r in rows})
    lines = [f"# L2O benchmark: {bench.train.family} ({bench.args.instances})", "",
             f"**Minimum detectable effect** (80 % power, two-sided α = 0.05, paired t-test over test instances): "
             f"the design from the pilot (σ = {design['sigma']:.3f} of per-instance differences in the normalised "
             f"score over {len(design['pilot_instances'])} train instances) is {design['instances']} test instances "
             f"× {len(seeds)} seeds, detecting {design['mde']:.3f} (target {EFFECT}; {design['needed_instances']} "
             f"instances would be needed for it); this run has {n_inst} test instances"
             + (", and detects " + ", ".join(f"{observed[m]:.3f} between {m} and {best_tuned}" for m in observed)
                if observed else "") + ".", "",
             f"Made by commit{'s' if len(commits) > 1 else ''} {', '.join(f'`{c}`' for c in commits)}; code hash "
             f"`{rows[0]['code_hash']}` (every row's, so the code the rows depend on is the same in each); "
             f"{len({r['settings_hash'] for r in rows})} settings hashes (each row of results.jsonl names its own). "
             f"Mode: {'quick (not a claim)' if bench.args.quick else 'full'}.", "",
             "**Score**: final cross-entropy on the instance's held-out synthetic images (L0 where a run diverged or "
             "ended above L0); normalised per instance as (L − L_best) / (L0 − L_best): 0 is the best method's mean, "
             "1 no progress. IQM over instance × seed with its 95 % stratified-bootstrap CI; mean: the instances' "
             "means, with a 95 % t CI over instances.", "",
             "| method | IQM [95 % CI] | mean [95 % CI] | capped runs | synthetic acc % | real-target mean-class "
             "acc % | ImageNet top-1 % | learning gate | SGD steps before evaluation |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        mid, low, high = found["iqm"][m]
        per_inst = [float(np.mean(norm[(m, j)])) for j in range(n_inst)]
        mean, _, ci = mean_ci(per_inst)
        runs = [by[(m, j, s)] for j in range(n_inst) for s in seeds]
        lines.append(f"| {m} | {mid:.3f} [{low:.3f}, {high:.3f}] | {mean:.3f} [±{ci:.3f}] | "
                     f"{sum(r['capped'] for r in runs)} / {len(runs)} | {pct(r.get('synthetic_acc') for r in runs)} | "
                     f"{pct(r.get('target_mean_class_acc') for r in runs)} | {pct(r.get('imagenet_top1') for r in runs)} | "
                     f"{info['gate'].get(m, '')} | {info['compute'][m]} |")
    lines += ["", *agg_lines, "", "![IQM](scores.png)", "", "![performance profiles](profiles.png)", ""]
    named = [m for m in methods if kinds[m] == "named" and m != NAMED["random"]]
    mean_of = {(m, j): float(np.mean(scores[(m, j)])) for m in methods for j in range(n_inst)}
    best_named = [min(named, key=lambda m: mean_of[(m, j)]) for j in range(n_inst)]
    lines += ["### Per test instance", "",
              "Normalised score, mean over seeds (**bold**: best method on the instance).", "",
              "| method | " + " | ".join(str(j) for j in range(n_inst)) + " |", "|---|" + "---|" * n_inst]
    for m in methods:
        cells = []
        for j in range(n_inst):
            v = float(np.mean(norm[(m, j)]))
            best = min(methods, key=lambda x: mean_of[(x, j)]) == m
            cells.append(f"**{v:.3f}**" if best else f"{v:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    search = next((m for m in methods if kinds[m] == "search"), None)
    acc_best = [max(float(np.mean([by[(m, j, s)].get("synthetic_acc", np.nan) for s in seeds])) for m in tuned + [search]
                    if m) for j in range(n_inst)]
    lines += ["", "| test instance | settings | outside the training range | best named setting | best tuned "
              "synthetic acc % | named settings that beat the test-instance search |", "|---|---|---|---|---|---|"]
    for j, inst in enumerate(bench.test_instances):
        beat = [m for m in named if search and mean_of[(m, j)] < mean_of[(search, j)]]
        outside = bench.family.outside_training(bench.test.instances[j])
        lines.append(f"| {j} | {json.dumps(inst)} | {', '.join(outside) or '—'} | {best_named[j]} | "
                     f"{100 * acc_best[j]:.1f} | {', '.join(beat) or 'none'} |")
    distinct = sorted(set(best_named))
    lines += ["", f"- Best named setting per instance: {len(distinct)} different ({', '.join(distinct)}): "
              + ("no single named setting is best everywhere." if len(distinct) > 1 else "one named setting is best "
                 "on every instance."),
              f"- The best tuned schedule reaches {100 * min(acc_best):.1f} % synthetic held-out accuracy on its worst "
              f"test instance ({'≥' if min(acc_best) >= 0.9 else 'below'} 90 %)."]
    if search:
        short = [j for j in range(n_inst) if any(mean_of[(m, j)] < mean_of[(search, j)] for m in named)]
        lines.append(f"- {search} is at least as good as every named setting on "
                     f"{n_inst - len(short)} of {n_inst} instances" + (f"; not on {short}." if short else "."))
    lines += ["", "### Stages", "", "| stage | wall time (this machine, summed over invocations) |", "|---|---|"]
    lines += [f"| {k} | {v / 60:.1f} min |" for k, v in info["costs"].items()]
    lines += [f"| meta-training alone, as its episodes logged (summed over the {info['policies']} policies; "
              f"`--jobs` ran them side by side) | {info['meta_training_s'] / 60:.1f} min |"]
    lines += ["", "Tuned schedules: " + "; ".join(f"{k}: `{v['spec']}` ({v['trials']} trial(s), {v['sgd_steps']:,} SGD "
                                                   f"steps)" for k, v in info["tuned"].items()),
              f"B = {info['budget']:,} SGD steps (one policy's meta-training, mean over agents and seeds).",
              "", "![learning curves](learning_curves.png)", ""]
    text = "\n".join(lines)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(text)
    return text, {"iqm": found["iqm"], "improvement": found["improvement"], "best_tuned": best_tuned,
                  "observed_mde": observed}


# ------------------------------------------------------------------------------------ main
class Costs:
    """Wall time per stage (stages.json), summed over invocations, one stopped by Ctrl-C or SIGTERM included."""

    def __init__(self, out: str):
        self.path = os.path.join(out, "stages.json")
        self.seconds = read_json(self.path) if os.path.isfile(self.path) else {}

    @contextlib.contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            with open(self.path, "w") as fh:
                json.dump(self.seconds, fh, indent=1)


PUBLISHED = ("results.jsonl", "results.md", "summary.json", "design.json", "pilot.jsonl", "stages.json", "settings.json",
             "scores.png", "profiles.png", "learning_curves.png")
STAGES = ("pilot", "gate", "tuning", "search", "evaluation")
LABELS = {"reinforce": "REINFORCE", "es": "ES", "recurrent-ppo": "RecurrentPPO"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller copy of every stage (8-SGD-step runs, 2 test instances)")
    p.add_argument("--instances", default="configs/instances/syndigits_long.yaml", help="instance file (train and test splits)")
    p.add_argument("--out", help="output folder (default runs/l2o, or runs/l2o-quick with --quick; published: results/l2o)")
    p.add_argument("--episodes", type=int, help="meta-training episodes per policy (1,000)")
    p.add_argument("--policy-seeds", type=int, help="policies per agent (3); run seed k uses policy k mod P")
    p.add_argument("--seeds", type=int, help="run seeds per method and test instance (3)")
    p.add_argument("--tune-instances", type=int, help="train instances each tuning trial runs (2)")
    p.add_argument("--test-trials", type=int, help="trials of the search on each test instance (12)")
    p.add_argument("--pilot-instances", type=int, help="train instances of the pilot (4)")
    p.add_argument("--test-instances", type=int, help="use only the first N test instances (0: all, and at least the "
                   "design's count; quick 2)")
    p.add_argument("--jobs", type=int, default=2, help="runs (and meta-trainings, and studies) at once, one thread each")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///OUT/optuna.db); share an RDB URL between "
                   "machines to share the studies")
    p.add_argument("--gate-out", help="the learning gate's folder (default OUT/gate)")
    p.add_argument("--override", help="JSON settings on top of every instance (for tests)")
    p.add_argument("--data-root", help="cache folder of the rendered images")
    p.add_argument("--bootstrap-reps", type=int, help="resamples of rliable's stratified bootstrap (10,000; quick 2,000)")
    p.add_argument("--until", choices=STAGES, help="stop after this stage (run a long benchmark in pieces)")
    p.add_argument("--publish", action="store_true", help="copy the run's results, design, report and plots to "
                   "RESULTS/l2o/ (the published run: results/l2o/)")
    p.add_argument("--results", default=os.path.join(ROOT, "results"), help="where --publish writes (default: results/)")
    p.add_argument("--drop-stale", action="store_true", help="move rows made by other code to stale.jsonl and redo them")
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
    counts = ("episodes", "policy_seeds", "seeds", "tune_instances", "test_trials", "pilot_instances", "jobs",
              "bootstrap_reps")
    for name in counts:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.test_instances < 0:
        p.error("--test-instances must be at least 0")
    if args.pilot_instances < 2:
        p.error("--pilot-instances must be at least 2 (the pilot measures a spread over instances)")
    if not os.path.isfile(args.instances):
        p.error(f"instance file not found: {args.instances}")
    args.out = args.out or ("runs/l2o-quick" if args.quick else os.path.join("runs", "l2o"))
    args.storage = args.storage or f"sqlite:///{os.path.abspath(os.path.join(args.out, 'optuna.db'))}"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out
    os.makedirs(out, exist_ok=True)
    bench = Bench(args)
    settings_path = os.path.join(out, "settings.json")
    if os.path.isfile(settings_path) and read_json(settings_path) != json.loads(json.dumps(bench.settings())):
        raise SystemExit(f"error: {out} holds a run made with other settings ({settings_path}); use another --out")
    with open(settings_path, "w") as fh:
        json.dump(bench.settings(), fh, indent=1)
    costs = Costs(out)

    with costs.stage("0 pilot"):
        design = pilot(bench, out)
    print(f"design: {design['instances']} test instances × {args.seeds} seeds detect {design['mde']:.3f} "
          f"(σ {design['sigma']:.3f}; {design['needed_instances']} needed for {EFFECT})")
    if not args.quick and not args.test_instances and len(bench.test_instances) < design["instances"]:
        raise SystemExit(f"error: the design needs {design['instances']} test instances; {args.instances} has "
                         f"{len(bench.test_instances)}: write more with python -m asg_env.envs.instances "
                         f"{bench.train.family} --train {len(bench.train_instances)} --test {design['instances']} "
                         f"--seed 0 --out {args.instances} (the train split stays the same)")
    if args.until == "pilot":
        return 0

    with costs.stage("1 meta-training and learning gate (this invocation's part)"):
        paths, summary = gate(bench, out)
    budget = round(np.mean([s["sgd_steps"] / s["seeds"] for s in summary.values()]))
    digest = settings_hash({**bench.settings(), "code": code_hash()})[:8]  # other settings or code: new studies
    if args.until == "gate":
        return 0

    try:  # the schema is made here, once: workers that made it at once would race
        storage(args.storage)
    except Exception as exc:  # noqa: BLE001  (any driver's error: one line)
        raise SystemExit(f"error: cannot open the Optuna storage {args.storage}: {str(exc).splitlines()[0]}") from None
    with costs.stage("2 tuning on the train split"):
        tuned = tuned_schedules(bench, budget, digest)
    if args.until == "tuning":
        return 0
    with costs.stage("3 tuning on each test instance"):
        found = tuned_on_test(bench, tuned, digest)
    if args.until == "search":
        return 0

    methods, kinds, gates, compute = {}, {}, {}, {}
    for agent, ps in paths.items():
        name = f"{LABELS.get(agent, agent)} (meta-trained)"
        methods[name] = lambda j, k, ps=ps: ps[k % len(ps)]
        kinds[name], gates[name] = "learned", "passed" if summary[agent]["passed"] else "failed"
        compute[name] = f"{summary[agent]['sgd_steps'] // summary[agent]['seeds']:,} (meta-training, per policy)"
    for kind in SCHEDULES:
        name = f"{kind} tuned on train"
        methods[name] = lambda j, k, spec=tuned[kind]["spec"]: spec
        kinds[name], compute[name] = "tuned", f"{tuned[kind]['sgd_steps']:,} ({tuned[kind]['trials']} trials)"
    search = f"tuned on the test instance ({args.test_trials} trials)"
    methods[search] = lambda j, k: found[j]["spec"]
    kinds[search] = "search"
    compute[search] = f"{int(np.mean([f['sgd_steps'] for f in found])):,} per instance, on it"
    for spec, name in NAMED.items():
        methods[name] = lambda j, k, spec=spec: spec
        kinds[name], compute[name] = "named", "0"

    with costs.stage("4 evaluation"):
        rows = evaluate(bench, methods, out, args.drop_stale)
    gate_out = args.gate_out or os.path.join(out, "gate")
    if os.path.isfile(os.path.join(gate_out, "curves.png")):
        shutil.copy(os.path.join(gate_out, "curves.png"), os.path.join(out, "learning_curves.png"))
    info = {"design": design, "gate": gates, "compute": compute, "costs": costs.seconds, "tuned": tuned,
            "budget": budget, "meta_training_s": sum(s["wall_s"] for s in summary.values()),
            "policies": sum(s["seeds"] for s in summary.values())}
    text, found_stats = write_report(bench, rows, kinds, info, out)
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump({**found_stats, "budget": budget, "tuned": tuned, "tuned_on_test": found, "design": {
            k: v for k, v in design.items() if k != "runs"}, "commits": sorted({r["commit"] for r in rows})}, fh, indent=1)
    print(text)
    print(f"results in {out}/")
    if args.publish:
        dest = os.path.join(args.results, "l2o")
        os.makedirs(dest, exist_ok=True)
        for name in PUBLISHED:
            if os.path.isfile(os.path.join(out, name)):
                shutil.copy(os.path.join(out, name), dest)
        print(f"published to {dest}/")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still adds its stage's time so far to stages.json
    sys.exit(main())
