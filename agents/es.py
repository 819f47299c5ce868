"""Antithetic evolution strategies on the LSTM policy's weights: the method learned-optimizer
work uses for long horizons (OpenAI-ES, Salimans et al. 2017; google/learned_optimization's ES,
VeLO), as ``--agent es``.

One generation, from the current weights θ:

* ``pairs`` antithetic pairs. Pair k perturbs θ by ±σ·ε_k, with ε_k ~ N(0, I) drawn from a
  seed of (agent seed, generation, k) alone, so any worker can regenerate it.
* Both members of a pair run one greedy episode on the same env seed: the same instance and
  the same run (head, data order), so their difference measures the perturbation alone.
* Fitness = −(the episode's synthetic score): the final cross-entropy on the held-out
  synthetic images, capped at the run's initial one (the env's ``synthetic_score``).
* Fitness shaping by centred ranks in [−0.5, 0.5] over the 2·pairs members; the gradient
  estimate ``g = Σ_k (u_k⁺ − u_k⁻) ε_k / (2·pairs·σ)`` is ascended with Adam.
* The observation normaliser is frozen within a generation; after it, the observations every
  member saw are merged into it.

The network is REINFORCE's (``network="paper"`` or ``"coordinate-wise"``, :mod:`agents.reinforce`)
and the policy file has the same layout, so ``apply_policy.py`` and the benchmarks load it
unchanged; it acts greedily.

Workers (``agent.es.workers``; :class:`Workers`). Rank r runs the pairs k ≡ r (mod W). The
ranks exchange only fitness values and the normaliser's moments (a gloo ``allreduce``; the
episodes' log rows go to rank 0 as well), and each rank takes the same step, so W workers give
the update one worker gives. Their gloo group is built apart from torch.distributed's default
group, which the fine-tuning trainer would take for data parallelism. EvoTorch (PGPE, SNES, CMA-ES) is
not used: it spreads a population over Ray actors, which would add Ray (hundreds of MB) beside
torch.distributed, which the project already uses for torchrun and DDP, for an update that is
thirty lines here.
"""

from __future__ import annotations

import datetime
import pickle
from dataclasses import asdict, dataclass, fields

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from agents.reinforce import POLICY_FORMAT, ReinforceConfig, ReinforcePolicy, build_network
from asg_env import UserInputError
from asg_env.training.settings import number, one_of, setting, whole


@dataclass
class ESConfig:
    network: str = setting("paper", one_of("paper", "coordinate-wise"), "as REINFORCE's")
    hidden_size: int = setting(20, whole(1), "the LSTM's hidden size (paper: |h| = 20)")
    pairs: int = setting(8, whole(1), "antithetic pairs per generation: 2·pairs episodes")
    sigma: float = setting(0.05, number(0, above=True), "the perturbation scale")
    lr: float = setting(0.03, number(0, above=True), "Adam's learning rate on the shaped gradient estimate")
    workers: int = setting(1, whole(1), "processes (train_policy.py starts them, gloo); any number gives the same "
                           "updates")


ES_SETTINGS = {f.name: f.metadata["check"] for f in fields(ESConfig)}


def centred_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks scaled to [−0.5, 0.5] (ties broken by position), as in OpenAI-ES."""
    ranks = torch.empty_like(x)
    ranks[x.argsort(stable=True)] = torch.arange(len(x), dtype=x.dtype)
    return ranks / max(len(x) - 1, 1) - 0.5


class Workers:
    """The ES workers' own gloo group over a file store (every worker names the same file)."""

    def __init__(self, rank: int, world: int, store_file: str):
        self.rank, self.world = rank, world
        self.group = dist.ProcessGroupGloo(dist.FileStore(store_file, world), rank, world, datetime.timedelta(minutes=30))

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        self.group.allreduce([x]).wait()
        return x

    def gather(self, obj) -> list:
        """Every worker's ``obj``, in rank order (pickled: the workers are this run's own processes)."""
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        self.group.allgather([sizes], [torch.tensor([len(data)])]).wait()
        padded = torch.zeros(int(max(sizes)), dtype=torch.uint8)
        padded[: len(data)] = data
        out = [torch.zeros_like(padded) for _ in range(self.world)]
        self.group.allgather([out], [padded]).wait()
        return [pickle.loads(o[: int(n)].numpy().tobytes()) for o, n in zip(out, sizes)]


class ESTrainer:
    """ES on one env (each worker holds its own). ``seed`` sets the initial weights (the same
    as REINFORCE's of that seed and network) and every perturbation and episode seed."""

    def __init__(self, env: gym.Env, config: ESConfig | None = None, seed: int = 0, workers: Workers | None = None):
        self.env, self.cfg, self.seed, self.workers = env, config or ESConfig(), int(seed), workers
        space = env.action_space
        if not isinstance(space, gym.spaces.MultiDiscrete) or len(set(space.nvec.tolist())) != 1:
            raise UserInputError("the ES agent picks one of N levels per coordinate; with action=continuous "
                                 "use an SB3 agent (ppo, a2c, recurrent-ppo)")
        if not getattr(env.unwrapped, "synthetic_score", False):
            raise UserInputError("the ES agent's fitness is the run's synthetic score: set env.kwargs.synthetic_score=true")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = build_network(self.network_config, env.observation_space.shape[0], len(space.nvec),
                                     int(space.nvec[0]))
        self.params = [p for p in self.net.parameters()]
        self.theta = nn.utils.parameters_to_vector(self.params).detach().clone().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.theta], lr=self.cfg.lr)
        self.generations = self.episodes_done = 0

    @property
    def network_config(self) -> ReinforceConfig:
        return ReinforceConfig(hidden_size=self.cfg.hidden_size, network=self.cfg.network)

    def _noise(self, k: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence(self.seed, spawn_key=(self.generations, k))
                                                .generate_state(1)[0]))
        return torch.randn(self.theta.numel(), generator=gen)

    def episode_seed(self, k: int) -> int:
        """The env seed of pair k of the current generation (both members share it)."""
        return int(np.random.SeedSequence(self.seed, spawn_key=(self.generations, k, 1)).generate_state(1)[0])

    def _episode(self, theta: torch.Tensor, seed: int) -> tuple[float, dict, list[np.ndarray], torch.Tensor]:
        """One greedy episode with weights ``theta``: its score, last info, actions and observations."""
        with torch.no_grad():  # not around the env: its fine-tuning needs gradients
            nn.utils.vector_to_parameters(theta, self.params)
        policy = ReinforcePolicy(self.net, deterministic=True)
        obs, _ = self.env.reset(seed=seed)
        seen, actions, done, info = [obs], [], False, {}
        while not done:
            action = policy.act(obs)
            obs, _, terminated, truncated, info = self.env.step(action)
            actions.append(action)
            seen.append(obs)
            done = terminated or truncated
        return float(info["score"]), info, actions, torch.as_tensor(np.array(seen), dtype=torch.float32)

    def run_generation(self) -> list[dict]:
        """One generation: every pair's two episodes (this rank's share), the exchange, one step.
        Returns the generation's episodes (score, actions, last info, pair, sign), all of them
        on rank 0 and its own on the others."""
        rank, world = (self.workers.rank, self.workers.world) if self.workers else (0, 1)
        P, sigma = self.cfg.pairs, self.cfg.sigma
        theta = self.theta.detach().clone()
        fitness = torch.zeros(2 * P, dtype=torch.float64)
        obs_sum = obs_sq = None
        count = torch.zeros((), dtype=torch.float64)
        episodes = []
        for k in range(rank, P, world):
            eps, seed = self._noise(k), self.episode_seed(k)
            for sign in (1, -1):
                score, info, actions, seen = self._episode(theta + sign * sigma * eps, seed)
                fitness[2 * k + (sign < 0)] = -score
                rows = self._normalizer_rows(seen).double()
                obs_sum = rows.sum(0) if obs_sum is None else obs_sum + rows.sum(0)
                obs_sq = (rows ** 2).sum(0) if obs_sq is None else obs_sq + (rows ** 2).sum(0)
                count += len(rows)
                episodes.append({"score": score, "return": -score, "info": info, "actions": np.array(actions),
                                 "length": len(actions), "pair": k, "sign": sign, "seed": seed})
        shape = self.net.obs_rms.mean.shape
        moments = torch.cat([fitness, obs_sum if obs_sum is not None else torch.zeros(shape, dtype=torch.float64),
                             obs_sq if obs_sq is not None else torch.zeros(shape, dtype=torch.float64), count[None]])
        if self.workers:
            self.workers.sum(moments)
            gathered = self.workers.gather(episodes)
            episodes = [e for part in gathered for e in part] if rank == 0 else episodes
        fitness, rest = moments[: 2 * P], moments[2 * P:]
        n = rest[-1]
        mean = rest[: shape[0]] / n
        var = (rest[shape[0]: 2 * shape[0]] / n - mean ** 2).clamp(min=0)
        self._step(fitness)
        self.net.obs_rms.update_moments(mean.float(), var.float(), float(n))
        self.generations += 1
        self.episodes_done += 2 * P
        return episodes

    def _normalizer_rows(self, obs: torch.Tensor) -> torch.Tensor:
        """What the normaliser tracks of these observations (rows per coordinate, coordinate-wise)."""
        rows = self.net.rows(obs) if hasattr(self.net, "rows") else obs
        return rows.reshape(-1, self.net.obs_rms.mean.shape[0])

    def _step(self, fitness: torch.Tensor) -> None:
        P, sigma = self.cfg.pairs, self.cfg.sigma
        u = centred_ranks(fitness)
        grad = torch.zeros_like(self.theta)
        for k in range(P):
            grad += (u[2 * k] - u[2 * k + 1]).float() * self._noise(k)
        grad /= 2 * P * sigma
        self.optimizer.zero_grad()
        self.theta.grad = -grad  # Adam descends: ascend the fitness
        self.optimizer.step()
        with torch.no_grad():
            nn.utils.vector_to_parameters(self.theta.detach(), self.params)

    # ------------------------------------------------------------------ saving and loading
    def policy_state(self, metadata: dict) -> dict:
        """The frozen policy in REINFORCE's layout (``agent: es``), loadable with weights_only=True."""
        with torch.no_grad():
            nn.utils.vector_to_parameters(self.theta.detach(), self.params)
        space = self.env.action_space
        return {
            "format": POLICY_FORMAT, "agent": "es", "es": asdict(self.cfg),
            "config": {"network": self.cfg.network, "hidden_size": self.cfg.hidden_size},  # REINFORCE's network
            "obs_dim": self.env.observation_space.shape[0], "n_coordinates": len(space.nvec),
            "n_levels": self.net.n_levels, "state_dict": self.net.state_dict(), **metadata,
        }

    def checkpoint(self, metadata: dict) -> dict:
        return {"policy": self.policy_state(metadata), "theta": self.theta.detach().clone(),
                "optimizer": self.optimizer.state_dict(), "generations": self.generations,
                "episodes_done": self.episodes_done}

    def load_checkpoint(self, ckpt: dict) -> None:
        self.net.load_state_dict(ckpt["policy"]["state_dict"])
        with torch.no_grad():
            self.theta.copy_(ckpt["theta"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.generations, self.episodes_done = int(ckpt["generations"]), int(ckpt["episodes_done"])

