"""Policy-training throughput with N envs at once, side by side in one run: episodes per
minute of LSTM REINFORCE on SynDigits-v0 (configs/reinforce_syndigits.yaml), for each N

* native: the N runs as one batched trainer in this process (``asg_env.envs.vector``; its
  ``batching`` is loop on a CPU, vmap on a GPU);
* split: the native env as ``train_policy.py`` lays it out (``native_vector_env``): one batched
  trainer per CPU core (or per GPU), each in its own process;
* async: N envs in N processes (gymnasium's AsyncVectorEnv), the cores shared out;

and one env alone as the reference (N = 1). A first batch warms every setting up (imports,
env construction, the teacher cache) and is not timed. The ratios are what holds across
machines; the episodes per minute are this machine's.

    python -m benchmarks.bench_parallel_episodes                    # N = 1, 2, 4, 8, 16
    python -m benchmarks.bench_parallel_episodes --n 2 4 --batches 1 --device cuda
    python -m benchmarks.bench_parallel_episodes --gpu              # the GPU table (below)

``--gpu`` measures the native env alone on one GPU, N = 2 … 64, for EfficientNet-Lite0 at 64 px
and ResNet-50 at 224 px (random weights: no ImageNet ResNet-50 ships offline; speed does not
depend on them), with short episodes (T = 4 over a quarter epoch) so that it all fits in a few
minutes. An N that does not fit in the GPU's memory is reported as such.
"""

from __future__ import annotations

import argparse
import os
import time

import gymnasium as gym
import torch

from agents.config import apply_overrides, env_factories, load_config, make_env
from agents.reinforce import ReinforceConfig, ReinforceTrainer
from agents.rollout import episode_seed
from asg_env.envs.vector import native_vector_env

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "reinforce_syndigits.yaml")


def make_envs(config: dict, kind: str, n: int, device: str):
    kwargs = {**config["env"].get("kwargs", {}), "device": device}
    if kind == "one":
        return make_env(config, device=device)
    if kind == "native":
        return gym.make_vec(config["env"]["id"], num_envs=n, vectorization_mode="vector_entry_point",
                            autoreset_mode=gym.vector.AutoresetMode.DISABLED, **kwargs)
    if kind == "split":
        return native_vector_env(config["env"]["id"], n, autoreset_mode=gym.vector.AutoresetMode.DISABLED, **kwargs)
    return gym.vector.AsyncVectorEnv(env_factories(config, n, device), context="spawn",
                                     autoreset_mode=gym.vector.AutoresetMode.DISABLED)


def episodes_per_minute(config: dict, kind: str, n: int, batches: int, device: str) -> float:
    torch.set_num_threads(os.cpu_count() or 1)
    envs = make_envs(config, kind, n, device)
    trainer = ReinforceTrainer(envs, ReinforceConfig(), seed=0)
    trainer.run_episodes([episode_seed(0, i) for i in range(n)])  # warm-up, untimed
    start = time.perf_counter()
    for b in range(batches):
        trainer.run_episodes([episode_seed(0, n * (b + 1) + i) for i in range(n)])
    envs.close()
    return 60 * n * batches / (time.perf_counter() - start)


GPU_MODELS = {"EfficientNet-Lite0, 64 px": [],
              "ResNet-50, 224 px": ["env.kwargs.backbone=resnet50", "env.kwargs.weights=null", "env.kwargs.image_size=224"]}
GPU_EPISODES = ["env.kwargs.episode_steps=4", "env.kwargs.epochs=0.25"]


def table(config: dict, ns: list[int], kinds: list[str], batches: int, device: str) -> None:
    print(f"{os.cpu_count()} cores, {device}, {config['env']['id']}, {config['env']['kwargs']}", flush=True)
    one = episodes_per_minute(config, "one", 1, batches, device)
    print(f"1 env: {one:.2f} episodes/min", flush=True)
    print("N    " + "".join(f"{k + ' ep/min':>16}{'× one env':>11}" for k in kinds), flush=True)
    for n in ns:
        cells = []
        for kind in kinds:
            try:
                rate = episodes_per_minute(config, kind, n, batches, device)
                cells.append(f"{rate:>16.2f}{rate / one:>10.2f}×")
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                cells.append(f"{'out of memory':>27}")
        print(f"{n:<5}" + "".join(cells), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[2, 4, 8, 16], help="numbers of envs at once")
    p.add_argument("--batches", type=int, default=1, help="timed batches of N episodes per setting")
    p.add_argument("--kinds", nargs="+", default=["native", "split", "async"], choices=["native", "split", "async"])
    p.add_argument("--device", default=None, help="cpu (default) or cuda (the default with --gpu)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="env override, e.g. env.kwargs.epochs=1")
    p.add_argument("--gpu", action="store_true", help="the GPU table: native only, N = 2 … 64, Lite0 and ResNet-50")
    args = p.parse_args()
    if any(n < 1 for n in args.n) or args.batches < 1:
        p.error("--n and --batches must be at least 1")
    config = apply_overrides(load_config(CONFIG), args.set)
    args.device = args.device or ("cuda" if args.gpu else "cpu")
    if not args.gpu:
        table(config, args.n, args.kinds, args.batches, args.device)
        return
    if not torch.cuda.is_available() and args.device.startswith("cuda"):
        p.error("--gpu needs a CUDA device (or --device cpu to try the table's code on a CPU)")
    ns = args.n if args.n != p.get_default("n") else [2, 4, 8, 16, 32, 64]
    for name, overrides in GPU_MODELS.items():
        print(f"\n{name}", flush=True)
        table(apply_overrides(config, GPU_EPISODES + overrides), ns, ["native"], args.batches, args.device)


if __name__ == "__main__":
    main()
