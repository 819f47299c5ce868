"""Policy-training throughput with 1 and N envs, side by side: episodes per minute of LSTM
REINFORCE on SynDigits-v0 at the default config (configs/reinforce_syndigits.yaml), N envs in
N processes (AsyncVectorEnv) sharing the machine's cores. A first batch warms every process
up (imports, env construction, the teacher cache) and is not timed.

    python benchmarks/bench_parallel_episodes.py [--n-envs 2] [--batches 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import gymnasium as gym
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agents.config import env_factories, load_config, make_env  # noqa: E402
from agents.reinforce import ReinforceConfig, ReinforceTrainer  # noqa: E402
from agents.rollout import episode_seed  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "reinforce_syndigits.yaml")


def episodes_per_minute(config: dict, n: int, batches: int) -> float:
    if n == 1:
        torch.set_num_threads(os.cpu_count() or 1)
        envs = make_env(config, device="cpu")
    else:
        envs = gym.vector.AsyncVectorEnv(env_factories(config, n, "cpu"), context="spawn",
                                         autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    trainer = ReinforceTrainer(envs, ReinforceConfig(), seed=0)
    trainer.run_episodes([episode_seed(0, i) for i in range(n)])  # warm-up, untimed
    start = time.perf_counter()
    for b in range(batches):
        trainer.run_episodes([episode_seed(0, n * (b + 1) + i) for i in range(n)])
    envs.close()
    return 60 * n * batches / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-envs", type=int, default=2)
    p.add_argument("--batches", type=int, default=2, help="timed batches of episodes per setting")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="env override, e.g. env.kwargs.epochs=1")
    args = p.parse_args()
    from agents.config import apply_overrides

    config = apply_overrides(load_config(CONFIG), args.set)
    one = episodes_per_minute(config, 1, args.batches)
    many = episodes_per_minute(config, args.n_envs, args.batches)
    print(f"{os.cpu_count()} cores, {config['env']['id']}, {config['env']['kwargs']}")
    print(f"  1 env:  {one:.2f} episodes/min")
    print(f"  {args.n_envs} envs: {many:.2f} episodes/min  ({many / one:.2f}x)")


if __name__ == "__main__":
    main()
