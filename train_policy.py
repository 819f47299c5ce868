"""Learn a layer-wise learning-rate policy on an ASG env (ASG §2.2, Algorithm 1).

With no --config, --env, --agent, --instances or --resume it runs the main command's setting
(configs/main.yaml on configs/instances/syndigits_meta.yaml): the agent and meta-training
settings that passed the learning gate (evolution strategies on the syndigits family's train
split at 32 px), about 15 minutes on 2 fast cores, ending with a held-out check of the policy
against random and its own initialisation (train.check runs each, on run seeds it never trained
on). Naming any of those five options starts from the plain defaults instead (REINFORCE on
SynDigits-v0, 20 episodes).

Examples:
  python train_policy.py                                  # the main command: ES, the learning gate's setting
  python train_policy.py --episodes 160 --seed 1          # the same, shorter, another seed
  python train_policy.py --agent reinforce                # SynDigits-v0, LSTM REINFORCE, 20 episodes
  python train_policy.py --agent recurrent-ppo --episodes 30
  python train_policy.py --env VisDA-v0 --data-root /data/visda17 --device cuda
  python train_policy.py --config configs/reinforce_syndigits.yaml --out runs/r1
  python train_policy.py --out runs/r1 --resume --episodes 40   # continue to 40 episodes
  python train_policy.py --num-envs 4 --device cuda               # 4 episodes at once (one GPU each, if there are 4)
  python train_policy.py --instances configs/instances/syndigits.yaml --split train   # a new instance each episode

The run folder gets: policy.pt (the frozen policy: weights, observation normaliser and
config, readable with torch.load(weights_only=True)), checkpoint.pt (to resume),
config.yaml (the resolved config, seed included), episodes.csv and steps.csv (plottable
logs) and tb/ (TensorBoard). --seed seeds the policy's initial weights, its sampled actions
and the episodes, whose env seeds are spawned from numpy.random.SeedSequence(seed), so runs
with different seeds never share an episode. --num-envs N runs N episodes at once (REINFORCE then
updates on the batch of episodes). --vector batched runs them as batched models (the native
vector env of the embedded tasks, asg_env/envs/vector.py): one in this process on one GPU, and
one per GPU or per CPU core, each in its own process; --vector processes runs each env in its own
process (gymnasium's AsyncVectorEnv for REINFORCE, SB3's SubprocVecEnv for the SB3 agents)
with the CPU threads shared out and one env per GPU. auto (the default) batches wherever it
can, and uses processes where batching is impossible (an instance list, bn_stats=train,
file-based tasks). It prints which, and why. policy.pt records the env's whole configuration;
apply_policy.py applies the policy in that same configuration. The real target set is never
used unless the env config turns evaluation on, and then only for logging.

The SB3 agents train behind VecNormalize (saved with the policy, frozen when it is applied;
--set agent.ppo.normalize=false for raw inputs). --set agent.reinforce.network=coordinate-wise
trains one LSTM shared by all coordinates, which then applies to any backbone
(configs/coordinatewise_syndigits.yaml).

--instances FILE --split train trains on a split of an instance file (asg_env/envs/instances.py):
the file's env and shared settings, and one of the split's instances per episode, drawn from
the episode's seed (so every agent, and every --num-envs, sees a seeded sequence). policy.pt
records the family, the split and the file's digest; episodes.csv records each episode's
instance (its index in the split) and SGD steps, the compute the policy was trained with.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import gymnasium as gym
import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from agents.check import check_table, held_out_scores
from agents.config import (
    apply_overrides,
    check_run_config,
    env_factories,
    load_config,
    make_env,
    merge,
    read_config_file,
    run_cli,
)
from agents.loading import env_metadata, read_file, save_policy
from agents.reinforce import ReinforceConfig, ReinforceTrainer
from agents.rollout import EVAL_KEYS, episode_seed
from asg_env import UserInputError
from asg_env.envs.instances import InstanceSet, load_instances
from asg_env.provenance import ROOT, git_commit

AGENTS = ("reinforce", "es", "recurrent-ppo", "ppo", "a2c")
MAIN_CONFIG = os.path.join(ROOT, "configs", "main.yaml")
MAIN_INSTANCES = os.path.join(ROOT, "configs", "instances", "syndigits_meta.yaml")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", help="registered env id (default: SynDigits-v0, the embedded offline task)")
    p.add_argument("--agent", choices=AGENTS, help="learner (default: reinforce)")
    p.add_argument("--episodes", type=int, help="training episodes (fine-tuning runs) in total")
    p.add_argument("--seed", type=int, help="seed of the agent (initial weights, sampled actions) and of its episodes")
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("--out", help="run folder (default: runs/<env>-<agent>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--data-root", help="dataset root (VisDA-17) or SynDigits cache folder")
    p.add_argument("--device", help="torch device for the fine-tuned CNN (default: cuda if available)")
    p.add_argument("--num-envs", type=int, help="episodes run at once (default 1)")
    p.add_argument("--vector", choices=("auto", "batched", "processes"),
                   help="how --num-envs runs them: as batched models (one on one GPU, one per GPU on several, one "
                        "per core on a CPU), or one process each; auto (the default) batches where it can")
    p.add_argument("--instances", metavar="FILE", help="instance file (configs/instances/): one of its instances per episode")
    p.add_argument("--split", default="train", help="the instance file's split to train on (default: train)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry, e.g. --set env.kwargs.lam=0.05 (repeatable)")
    args = p.parse_args(argv)
    if not (args.config or args.env or args.agent or args.instances or args.resume):
        args.config, args.instances = MAIN_CONFIG, MAIN_INSTANCES
    return args


def resolve_config(args: argparse.Namespace) -> tuple[dict, str]:
    if args.resume:
        if args.instances:
            raise UserInputError("--resume reads the instances from the run's config.yaml; drop --instances")
        if not args.out or not os.path.isfile(os.path.join(args.out, "config.yaml")):
            raise UserInputError("--resume needs --out pointing at an earlier run folder with config.yaml")
        config = load_config(os.path.join(args.out, "config.yaml"))
        if "n_envs" in config["train"]:  # a run folder written before train.n_envs was named num_envs
            config["train"]["num_envs"] = config["train"].pop("n_envs")
        for key in ("episodes", "num_envs", "vector"):
            if getattr(args, key) is not None:
                config["train"][key] = getattr(args, key)
        check_run_config(config, AGENTS)
        return config, args.out
    config = load_config(args.config)
    if args.instances:
        in_file = read_config_file(args.config).get("env") if args.config else None
        named = args.env or (in_file.get("id") if isinstance(in_file, dict) else None)
        config = with_instances(config, load_instances(args.instances, args.split), named)
    cli = {"env": {"id": args.env} if args.env else {}, "agent": {"name": args.agent} if args.agent else {},
           "train": {k: v for k, v in (("episodes", args.episodes), ("seed", args.seed), ("num_envs", args.num_envs),
                                       ("vector", args.vector)) if v is not None}}
    config = apply_overrides(merge(config, cli), args.set)
    check_run_config(config, AGENTS)
    agent = config["agent"]["name"]
    if agent == "es":  # its fitness is the run's synthetic score
        config["env"]["kwargs"] = {"synthetic_score": True, **config["env"]["kwargs"]}
    elif agent != "reinforce":  # recorded, so that --resume trains the way the run started
        config["agent"][agent] = {"normalize": True, **(config["agent"].get(agent) or {})}
    out = args.out or os.path.join("runs", f"{config['env']['id']}-{config['agent']['name']}-{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserInputError(f"--out {out} is a file, not a folder; choose another --out")
    if os.path.exists(os.path.join(out, "checkpoint.pt")):
        raise UserInputError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    return config, out


def with_instances(config: dict, instances: InstanceSet, env_id: str | None) -> dict:
    """The config on an instance split: the file's env and shared settings, and its instances."""
    if env_id and env_id != instances.env_id:
        raise UserInputError(f"{instances.path} holds instances of {instances.env_id}, not of {env_id}")
    env = {"id": instances.env_id, "kwargs": {**instances.base, "instances": instances.instances}}
    return merge(config, {"env": env, "instances": instances.describe()})


class EpisodeLog:
    """episodes.csv, steps.csv and TensorBoard, appended to (so --resume keeps the history)."""

    def __init__(self, out: str, coordinate_names: list[str], episodes_done: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.names = coordinate_names
        for name in ("episodes.csv", "steps.csv"):  # rows a killed run logged after its last checkpoint
            _keep_episodes(os.path.join(out, name), episodes_done)
        self.writer = SummaryWriter(os.path.join(out, "tb"), purge_step=episodes_done)
        ep_fields = ["episode", "seed", "instance", "sgd_steps", "return", "length", "entropy_ratio", "score",
                     "final_loss", "final_loss_xe", "final_loss_guidance",
                     *EVAL_KEYS, *[f"mean_action/{n}" for n in coordinate_names], "seconds"]
        self.totals = {"episodes": 0, "decisions": 0, "sgd_steps": 0, "wall_s": 0.0}
        if os.path.isfile(os.path.join(out, "episodes.csv")):
            with open(os.path.join(out, "episodes.csv"), newline="") as fh:
                for row in csv.DictReader(fh):
                    self._count(int(row["length"]), int(row["sgd_steps"] or 0), float(row["seconds"]))
        self.episodes = self._open(os.path.join(out, "episodes.csv"), ep_fields)
        self.steps = self._open(os.path.join(out, "steps.csv"), ["episode", "step", *[f"action/{n}" for n in coordinate_names]])

    @staticmethod
    def _open(path: str, fields: list[str]):
        new = not os.path.exists(path)
        fh = open(path, "a", newline="")
        writer = csv.DictWriter(fh, fieldnames=fields, restval="", extrasaction="ignore")
        if new:
            writer.writeheader()
        return fh, writer

    def _count(self, decisions: int, sgd_steps: int, seconds: float) -> None:
        for key, value in (("episodes", 1), ("decisions", decisions), ("sgd_steps", sgd_steps), ("wall_s", seconds)):
            self.totals[key] += value

    def cost(self, updates: int) -> dict:
        """What the policy's training has cost so far (recorded in policy.pt as ``training``)."""
        return {**self.totals, "wall_s": round(self.totals["wall_s"], 1), "updates": int(updates)}

    def log(self, episode: int, seed: int, ep_return: float, actions: np.ndarray, info: dict, seconds: float,
            entropy_ratio: float | None = None) -> None:
        self._count(len(actions), int(info.get("sgd_step") or 0), round(seconds, 2))
        row = {"episode": episode, "seed": seed, "instance": info.get("instance", -1), "sgd_steps": info.get("sgd_step"),
               "return": ep_return, "length": len(actions), "entropy_ratio": entropy_ratio, "score": info.get("score"),
               "final_loss": info.get("loss"), "final_loss_xe": info.get("loss_xe"),
               "final_loss_guidance": info.get("loss_guidance"), "seconds": round(seconds, 2),
               **{k: info[k] for k in EVAL_KEYS if k in info},
               **{f"mean_action/{n}": float(m) for n, m in zip(self.names, actions.mean(0))}}
        self.episodes[1].writerow(row)
        for t, a in enumerate(actions):
            self.steps[1].writerow({"episode": episode, "step": t + 1, **{f"action/{n}": v for n, v in zip(self.names, np.asarray(a).tolist())}})
        for fh, _ in (self.episodes, self.steps):
            fh.flush()
        for key, value in row.items():
            if key not in ("episode", "seed", "instance") and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, episode)
        self.writer.add_scalar("episodes_per_min", 60 / max(seconds, 1e-9), episode)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
        for fh, _ in (self.episodes, self.steps):
            fh.close()


def _keep_episodes(path: str, episodes: int) -> None:
    """Cut a log back to its first ``episodes`` episodes, which the checkpoint holds."""
    if not os.path.isfile(path):
        return
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    kept = [rows[0]] + [r for r in rows[1:] if int(r[0]) < episodes] if rows else []
    if len(kept) != len(rows):
        with open(path, "w", newline="") as fh:
            csv.writer(fh).writerows(kept)


def train_reinforce(env, config: dict, out: str, metadata: dict, log: EpisodeLog, resume: dict | None) -> list[float]:
    """Batches of ``num_envs`` episodes (the total is rounded up to whole batches)."""
    seed0 = config["train"]["seed"]
    trainer = ReinforceTrainer(env, ReinforceConfig(**(config["agent"].get("reinforce") or {})), seed=seed0)
    ckpt_path = os.path.join(out, "checkpoint.pt")
    if resume:
        trainer.load_checkpoint(resume)
    total, returns, n = config["train"]["episodes"], [], trainer.envs.num_envs
    with tqdm(total=total, initial=trainer.episodes_done, desc="policy episodes") as bar:
        while trainer.episodes_done < total:
            start, first = time.perf_counter(), trainer.episodes_done
            seeds = [episode_seed(seed0, first + i) for i in range(n)]
            results = trainer.run_episodes(seeds)
            seconds = (time.perf_counter() - start) / n
            for i, (seed, result) in enumerate(zip(seeds, results)):
                log.log(first + i, seed, result["return"], result["actions"], result["info"], seconds,
                        result["entropy_ratio"])
                returns.append(result["return"])
            metadata.setdefault("training", {}).update(log.cost(trainer.updates))
            save_policy(trainer.checkpoint(metadata), ckpt_path)  # every batch: an interruption loses at most one
            save_policy(trainer.policy_state(metadata), os.path.join(out, "policy.pt"))
            bar.update(n)
            bar.set_postfix(ret=f"{np.mean(returns[-n:]):+.3f}", entropy=f"{np.mean([r['entropy_ratio'] for r in results]):.2f}",
                            ep_per_min=f"{60 / max(seconds, 1e-9):.1f}")
    return returns


def train_es(env, config: dict, out: str, metadata: dict, log: EpisodeLog, resume: dict | None) -> list[float]:
    """Generations of 2·pairs episodes (the total is rounded up to whole generations), over
    ``agent.es.workers`` processes (gloo) when there are several."""
    from agents.es import ESConfig

    cfg = ESConfig(**(config["agent"].get("es") or {}))
    if cfg.workers == 1:
        return _es_rank(env, config, out, metadata, log, resume)
    import torch.multiprocessing as mp

    log.close()  # rank 0 opens its own
    store = os.path.join(os.path.abspath(out), ".es_workers")
    if os.path.exists(store):
        os.remove(store)
    u = env.unwrapped
    where = {"device": str(u.trainer.device), "data_root": u.config.get("data_root")}
    mp.spawn(_es_worker, args=(cfg.workers, config, where, out, metadata, resume, store), nprocs=cfg.workers)
    return [float(r["return"]) for r in csv.DictReader(open(os.path.join(out, "episodes.csv")))]


def _es_worker(rank: int, world: int, config: dict, where: dict, out: str, metadata: dict, resume: dict | None,
               store: str) -> None:
    from agents.es import Workers

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world))
    env = make_env(config, **where)
    log = EpisodeLog(out, metadata["coordinate_names"], int(resume["episodes_done"]) if resume else 0) if rank == 0 else None
    try:
        _es_rank(env, config, out, metadata, log, resume, Workers(rank, world, store))
    finally:
        if log is not None:
            log.close()


def _es_rank(env, config: dict, out: str, metadata: dict, log: EpisodeLog | None, resume: dict | None,
             workers=None) -> list[float]:
    from agents.es import ESConfig, ESTrainer

    trainer = ESTrainer(env, ESConfig(**(config["agent"].get("es") or {})), seed=config["train"]["seed"], workers=workers)
    rank = workers.rank if workers else 0
    if resume:
        trainer.load_checkpoint(resume)
    total, returns = config["train"]["episodes"], []
    with tqdm(total=total, initial=trainer.episodes_done, desc="policy episodes (es)", disable=rank != 0) as bar:
        while trainer.episodes_done < total:
            start, first = time.perf_counter(), trainer.episodes_done
            episodes = trainer.run_generation()
            seconds = (time.perf_counter() - start) / (2 * trainer.cfg.pairs)  # each episode's share of the wall time
            if rank != 0:
                continue
            for e in sorted(episodes, key=lambda e: (e["pair"], -e["sign"])):
                log.log(first + 2 * e["pair"] + (e["sign"] < 0), e["seed"], e["return"], e["actions"], e["info"], seconds)
                returns.append(e["return"])
            metadata.setdefault("training", {}).update(log.cost(trainer.generations))
            save_policy(trainer.checkpoint(metadata), os.path.join(out, "checkpoint.pt"))
            save_policy(trainer.policy_state(metadata), os.path.join(out, "policy.pt"))
            bar.update(trainer.episodes_done - first)
            bar.set_postfix(score=f"{-np.mean([e['return'] for e in episodes]):.3f}", ep_per_min=f"{60 / seconds:.1f}")
    return returns


def train_sb3(env, config: dict, out: str, metadata: dict, log: EpisodeLog, resume: dict | None) -> list[float]:
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.utils import set_random_seed
    from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecNormalize

    from agents.sb3_agents import load_normalizer_state, make_sb3, sb3_policy_state

    agent, seed = config["agent"]["name"], config["train"]["seed"]
    hyperparams = dict(config["agent"].get(agent) or {})
    venv = env if isinstance(env, VecEnv) else DummyVecEnv([lambda: env])  # no Monitor: LogEpisodes logs the episodes
    normalize = hyperparams.pop("normalize", None)
    if normalize is None:  # a run from before the option: as it was trained
        normalize = resume is None or "vec_normalize" in resume["policy"]
    if normalize:
        venv = VecNormalize(venv)
    model = make_sb3(agent, venv, seed, hyperparams)
    normalizer = model.get_vec_normalize_env()
    if normalizer is not None:
        normalizer.gamma = model.gamma  # the discount of the returns whose scale it tracks
    ckpt_path = os.path.join(out, "checkpoint.pt")
    done_episodes = 0
    if resume:
        model.policy.load_state_dict(resume["policy"]["state_dict"])
        model.policy.optimizer.load_state_dict(resume["optimizer"])
        model.num_timesteps, done_episodes = int(resume["num_timesteps"]), int(resume["episodes_done"])
        if normalizer is not None:
            if "vec_normalize" not in resume["policy"]:
                raise UserInputError(f"{ckpt_path} was trained without VecNormalize; set agent.{agent}.normalize: "
                                     f"false in {os.path.join(out, 'config.yaml')}")
            load_normalizer_state(normalizer, resume["policy"]["vec_normalize"])
    # env i starts with episode done_episodes + i, seeded as train_reinforce seeds it in every mode (SB3 has no
    # call for one seed per env: VecEnv.seed(s) gives env i s + i, another run's env 0 seed)
    model.get_env().unwrapped._seeds = [episode_seed(seed, done_episodes + i) for i in range(venv.num_envs)]
    T = env.get_attr("T")[0] if hasattr(env, "get_attr") else env.unwrapped.T  # SB3 VecEnv or one env
    total = config["train"]["episodes"]
    returns: list[float] = []

    class LogEpisodes(BaseCallback):
        def _on_training_start(self) -> None:
            # the sampled actions draw from torch's global RNG, which a single env's first reset has just
            # reseeded (Trainer.reset) and vector envs leave alone: the first samples start from the seed alone
            set_random_seed(episode_seed(seed, done_episodes))
            n = self.training_env.num_envs
            self.episode, self.start = done_episodes, [time.perf_counter()] * n
            self.actions, self.ret = [[] for _ in range(n)], [0.0] * n
            self.bar = tqdm(total=total, initial=done_episodes, desc=f"policy episodes ({agent})")

        def _on_step(self) -> bool:
            actions = np.asarray(self.locals["actions"]).reshape(len(self.ret), -1)
            space = self.model.action_space
            if isinstance(space, gym.spaces.Box):  # what the env received: SB3 clips Gaussian samples into the box
                actions = np.clip(actions, space.low, space.high)
            rewards = self.locals["rewards"] if normalizer is None else normalizer.get_original_reward()
            for i, done in enumerate(self.locals["dones"]):
                self.actions[i].append(actions[i])
                self.ret[i] += float(rewards[i])
                if not done:
                    continue
                info = self.locals["infos"][i]
                log.log(self.episode, seed, self.ret[i], np.array(self.actions[i]), info, time.perf_counter() - self.start[i])
                returns.append(self.ret[i])
                self.episode += 1
                self.bar.update(1)
                metadata.setdefault("training", {}).update(log.cost(self.model._n_updates))
                save_policy(sb3_policy_state(agent, self.model, metadata), os.path.join(out, "policy.pt"))
                save_policy({"policy": sb3_policy_state(agent, self.model, metadata),
                             "optimizer": self.model.policy.optimizer.state_dict(),
                             "num_timesteps": self.model.num_timesteps, "episodes_done": self.episode}, ckpt_path)
                self.actions[i], self.ret[i], self.start[i] = [], 0.0, time.perf_counter()
            return self.episode < total

        def _on_training_end(self) -> None:
            self.bar.close()

    remaining = max(total - done_episodes, 0) * T
    if remaining:
        model.learn(total_timesteps=remaining, callback=LogEpisodes(), reset_num_timesteps=resume is None)
    return returns


def vector_env(config: dict, agent: str, data_root: str | None, device: str):
    """``num_envs`` envs at once, as ``train.vector`` says: batched (the native vector env,
    :mod:`asg_env.envs.vector`: batched models, one per GPU or per CPU core, each in its own
    process, or one in this process) or each env in its own process. ``auto`` batches wherever
    the native env can take the configuration. Prints which, and why."""
    from asg_env.envs.vector import DeviceSplitVectorEnv, native_vector_env

    n, choice = config["train"]["num_envs"], config["train"].get("vector", "auto")
    env_id, kwargs = config["env"]["id"], dict(config["env"].get("kwargs", {}))
    kwargs.pop("device", None)
    if data_root is not None:
        kwargs["data_root"] = data_root
    why = None
    if choice == "processes":
        why = "train.vector: processes"
    elif gym.spec(env_id).vector_entry_point is None:
        why = f"{env_id} has no native vector env"
    if why is not None and choice == "batched":
        raise UserInputError(f"train.vector: batched is not possible here: {why}")
    if why is None:
        mode = gym.vector.AutoresetMode.DISABLED if agent == "reinforce" else gym.vector.AutoresetMode.SAME_STEP
        try:
            venv = native_vector_env(env_id, n, device=device, autoreset_mode=mode, **kwargs)
        except TypeError as exc:  # an unknown kwarg in a config file
            raise UserInputError(f"bad env option: {exc}") from exc
        except UserInputError as exc:
            if choice == "batched":
                raise
            why = str(exc)
    if why is None:
        if isinstance(venv, DeviceSplitVectorEnv):
            each = "one per GPU" if device.startswith("cuda") else f"{venv.threads} CPU thread(s) each"
            where = f"{len(venv.devices)} batched models ({each}), each in its own process"
        else:
            where = "one batched model in this process"
        print(f"{n} envs as {where} (the native vector env)")
        if agent == "reinforce":
            return venv
        from agents.sb3_vec import GymnasiumVecEnv

        return GymnasiumVecEnv(venv)
    print(f"{n} envs in {n} processes ({why})")
    builders = env_factories(config, n, device, data_root=data_root)
    if agent == "reinforce":
        return gym.vector.AsyncVectorEnv(builders, context="spawn", autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    from stable_baselines3.common.vec_env import SubprocVecEnv

    return SubprocVecEnv(builders, start_method="spawn")


def run(args: argparse.Namespace) -> int:
    config, out = resolve_config(args)
    created = not os.path.exists(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserInputError(f"cannot create the run folder --out {out}: {e.strerror}") from None
    resume = read_file(os.path.join(out, "checkpoint.pt"), "checkpoint") if args.resume else None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    agent = config["agent"]["name"]
    try:
        env = make_env(config, data_root=args.data_root, device=device)  # the policy's metadata; the learner's env when num_envs = 1
        envs = vector_env(config, agent, args.data_root, device) if config["train"]["num_envs"] > 1 else env
    except UserInputError:
        if created:  # a refused setting leaves no empty run folder behind
            os.rmdir(out)
        raise
    with open(os.path.join(out, "config.yaml"), "w") as fh:
        yaml.safe_dump(config, fh, sort_keys=False)
    metadata = env_metadata(env)
    if "instances" in config:
        metadata["instances"] = config["instances"]
    commits = (((resume or {}).get("policy") or {}).get("training") or {}).get("commits", [])
    metadata["training"] = {"device": device, "commits": list(dict.fromkeys([*commits, git_commit()]))}  # and its cost
    log = EpisodeLog(out, metadata["coordinate_names"], int(resume["episodes_done"]) if resume else 0)
    start = time.perf_counter()
    try:
        train = {"reinforce": train_reinforce, "es": train_es}.get(agent, train_sb3)
        returns = train(envs, config, out, metadata, log, resume)
    except KeyboardInterrupt:
        print(f"\ninterrupted; everything up to the last finished episode is saved. Continue with:\n"
              f"  python train_policy.py --out {out} --resume", file=sys.stderr)
        return 130
    finally:
        log.close()
        if envs is not env:
            envs.close()
    minutes = (time.perf_counter() - start) / 60
    print(f"trained {agent} on {config['env']['id']} for {len(returns)} episodes in {minutes:.1f} min")
    if returns:
        k = max(1, len(returns) // 4)
        print(f"mean return: first {k} episodes {np.mean(returns[:k]):+.4f}, last {k} {np.mean(returns[-k:]):+.4f}")
    if config["train"]["check"]:
        check(config, out, args.data_root, device)
    print(f"policy      {os.path.join(out, 'policy.pt')}")
    print(f"config      {os.path.join(out, 'config.yaml')}  (seed {config['train']['seed']})")
    print(f"logs        {os.path.join(out, 'episodes.csv')}, {os.path.join(out, 'steps.csv')}, TensorBoard: {os.path.join(out, 'tb')}")
    print(f"apply it    python apply_policy.py --policy {os.path.join(out, 'policy.pt')}")
    return 0


def check(config: dict, out: str, data_root: str | None, device: str) -> None:
    """The held-out check (agents/check.py), printed and written to out/check.txt."""
    state = read_file(os.path.join(out, "policy.pt"), "policy file")
    if state.get("agent") not in ("reinforce", "es"):
        print(f"held-out check: skipped (it compares REINFORCE and ES policies with their initialisation, "
              f"not {state.get('agent')})")
        return
    kwargs = config["env"]["kwargs"]
    instances = kwargs.get("instances") or []
    scoring = merge(config, {"env": {"kwargs": {"synthetic_score": True, "evaluate_target": False, "instances": None}}})
    env = make_env(scoring, data_root=data_root, device=device)
    try:
        lines = check_table(held_out_scores(env, state, int(config["train"]["seed"]), instances,
                                            int(config["train"]["check"])))
    finally:
        env.close()
    print("\n".join(lines))
    with open(os.path.join(out, "check.txt"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    return run_cli(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
