"""LSTM policy trained with REINFORCE: ASG's RL-L2O (Algorithm 1, Eq. 7), top to bottom.

Differences from the official release, all on purpose:

* The policy is actually trained: rewards are collected, Eq. 7 is minimised every U steps,
  and the result is saved.
* The LSTM's hidden state is carried from step to step within an episode (truncated
  back-propagation: gradients stop at each update) and reset at episode start.
* A frozen policy acts greedily (argmax per coordinate) unless sampling is asked for.

Choices the paper leaves open, and the defaults picked here:

* Optimiser: Adam, lr 3e-3. The paper's "learning rate 0.5" names no optimiser; with Adam it
  saturates the softmax within a few updates, and plain SGD at 0.5 depends entirely on the
  reward scale, which varies by task. Adam on normalised advantages does not.
* Credit: ``returns="discounted"`` (the default) credits decision t with the discounted
  return ``G_t = Σ_k γ^k r_{t+k}`` (γ = 0.99, the official code's), so a decision is judged by
  the loss it leads to, not only by the next window's (and ``reward="final"`` reaches every
  decision). The update then comes once per episode, over all its decisions; the LSTM's
  gradient is still cut every U steps. ``returns="immediate"`` is Eq. 7 as written: ``r_t``
  alone, an update every U steps.
* Scale across instances: each reward is divided by its episode's initial loss ``L_0`` (from
  the reset's ``info["loss"]``; ``reward_scale="none"`` keeps them raw). Instances of one family
  differ several-fold in how far their loss can fall, so raw returns partly measure which
  instance was drawn; relative to ``L_0`` a return is the fraction of the loss removed, which
  does not depend on the schedule, and needs no instance identity.
* Baseline: a per-step moving average of the (scaled) return, ``b_t ← 0.9 b_t + 0.1 G_t``. The
  loss drops much faster early in fine-tuning than late, so one global baseline would credit
  every early action; comparing with what usually happens at the same step t removes that.
* Advantages are divided by a running std of the return, so the update size does not depend
  on the task's loss scale. Entropy bonus 0.01 keeps early exploration.
* Observations are normalised with a running mean/std that is updated while training and
  saved (frozen) with the policy.

Beside the paper's network (``network="paper"``: one LSTM over the whole observation, one head
per coordinate) there is ``network="coordinate-wise"``: one small LSTM shared by all
coordinates, as in learned optimizers (Andrychowicz et al. 2016, google/learned_optimization).
Each coordinate's input is the global features, the coordinate's own ones (its last scale, and
its four statistics with ``observation="per_coordinate"``) and its depth c/(C−1), so one policy
runs on a backbone with any number of coordinates. REINFORCE trains either the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical

from asg_env import N_LEVELS, UserInputError
from asg_env.envs.control import BASE_OBS_NAMES
from asg_env.envs.vector import env_info
from asg_env.training.settings import number, one_of, setting, whole

POLICY_FORMAT = "asg-gym-policy/1"


@dataclass
class ReinforceConfig:
    hidden_size: int = setting(20, whole(1), "the LSTM's hidden size (paper: |h| = 20)")
    unroll: int = setting(5, whole(1), "decisions per update (paper: U = 5)")
    optimizer: str = setting("adam", one_of("adam", "sgd"), "the policy's optimizer")
    lr: float = setting(3e-3, number(0, above=True), "the policy's learning rate")
    entropy_coef: float = setting(0.01, number(0), "weight of the entropy bonus")
    baseline: str = setting("per-step", one_of("per-step", "none"), "a moving-average baseline per decision, or none")
    baseline_decay: float = setting(0.9, number(0, 1, below=True), "the baseline's moving-average decay")
    max_grad_norm: float = setting(1.0, number(0, above=True), "gradient clipping")
    network: str = setting("paper", one_of("paper", "coordinate-wise"), "one LSTM over all coordinates (the "
                           "paper's) or one shared by the coordinates (applies to any backbone)")
    returns: str = setting("discounted", one_of("discounted", "immediate"), "discounted (the official, γ) or "
                           "immediate (Eq. 7 as written)")
    gamma: float = setting(0.99, number(0, 1), "the discount of the returns (the official value)")
    reward_scale: str = setting("initial_loss", one_of("initial_loss", "none"), "r_t / L_0 of its episode, or none")


REINFORCE_SETTINGS = {f.name: f.metadata["check"] for f in fields(ReinforceConfig)}


class RunningMeanStd(nn.Module):
    """Running mean and variance (Chan et al. parallel update), stored as buffers."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("var", torch.ones(shape))
        self.register_buffer("count", torch.tensor(1e-4))

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, *self.mean.shape).float()
        self.update_moments(x.mean(0), x.var(0, unbiased=False), x.shape[0])

    def update_moments(self, mean: torch.Tensor, var: torch.Tensor, n: float) -> None:
        """Merge in a batch of ``n`` values with this mean and (population) variance."""
        delta, total = mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + var * n + delta**2 * self.count * n / total) / total
        self.count = total

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / torch.sqrt(self.var + 1e-8)).clamp(-10, 10)


class LSTMPolicy(nn.Module):
    """obs → normalise → LSTM cell → one categorical head per coordinate, of 11 levels (the
    paper's) or of as many as the env's discrete action space has."""

    def __init__(self, obs_dim: int, n_coordinates: int, hidden_size: int = 20, n_levels: int = N_LEVELS):
        super().__init__()
        self.obs_rms = RunningMeanStd((obs_dim,))
        self.lstm = nn.LSTMCell(obs_dim, hidden_size)
        self.heads = nn.Linear(hidden_size, n_coordinates * n_levels)
        self.n_coordinates, self.hidden_size, self.n_levels = n_coordinates, hidden_size, n_levels

    def initial_state(self, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = torch.zeros(batch, self.hidden_size)
        return zeros, zeros.clone()

    def update_normalizer(self, obs: torch.Tensor) -> None:
        self.obs_rms.update(obs)

    def forward(self, obs: torch.Tensor, state):
        """One step for one observation (obs_dim,) or a batch (N, obs_dim). Returns the
        per-coordinate action distributions, (C,) or (N, C), and the next hidden state."""
        x = self.obs_rms.normalize(obs).view(-1, obs.shape[-1])
        h, c = self.lstm(x, state)
        logits = self.heads(h).view(*obs.shape[:-1], self.n_coordinates, self.n_levels)
        return Categorical(logits=logits), (h, c)


class CoordinateWisePolicy(nn.Module):
    """One LSTM cell and one head shared by all coordinates: a coordinate's row is
    ``[global features, its own features, its depth c/(C−1)]``, and the C rows of each
    observation run as a batch, so C is read off the observation and may differ from the
    training backbone's. The LSTM state holds one (h, c) per coordinate."""

    def __init__(self, n_global: int, n_own: int, hidden_size: int = 20, n_levels: int = N_LEVELS):
        super().__init__()
        self.n_global, self.n_own = n_global, n_own
        self.obs_rms = RunningMeanStd((n_global + n_own,))
        self.lstm = nn.LSTMCell(n_global + n_own + 1, hidden_size)
        self.head = nn.Linear(hidden_size, n_levels)
        self.hidden_size, self.n_levels = hidden_size, n_levels

    def initial_state(self, batch: int = 1) -> None:
        return None  # zeros for however many coordinates the first observation has

    def rows(self, obs: torch.Tensor) -> torch.Tensor:
        """(…, D) observations → (…, C, n_global + n_own) rows. The observation holds the global
        features, then one scale per coordinate, then n_own − 1 features per coordinate."""
        C, extra = divmod(obs.shape[-1] - self.n_global, self.n_own)
        if extra or C < 1:
            raise ValueError(f"an observation of {obs.shape[-1]} values does not split into {self.n_global} global "
                             f"and {self.n_own} per coordinate")
        glob = obs[..., : self.n_global].unsqueeze(-2).expand(*obs.shape[:-1], C, self.n_global)
        scale = obs[..., self.n_global : self.n_global + C].unsqueeze(-1)
        own = obs[..., self.n_global + C :].reshape(*obs.shape[:-1], C, self.n_own - 1)
        return torch.cat([glob, scale, own], -1)

    def update_normalizer(self, obs: torch.Tensor) -> None:
        self.obs_rms.update(self.rows(obs))

    def forward(self, obs: torch.Tensor, state):
        """Like :class:`LSTMPolicy`: distributions (C,) or (N, C) and the next state."""
        rows = self.obs_rms.normalize(self.rows(obs))
        C = rows.shape[-2]
        depth = torch.linspace(0, 1, C) if C > 1 else torch.ones(1)
        x = torch.cat([rows, depth.expand(*rows.shape[:-1]).unsqueeze(-1)], -1).reshape(-1, rows.shape[-1] + 1)
        h, c = self.lstm(x, state)
        logits = self.head(h).view(*obs.shape[:-1], C, self.n_levels)
        return Categorical(logits=logits), (h, c)


def build_network(config: ReinforceConfig, obs_dim: int, n_coordinates: int, n_levels: int) -> nn.Module:
    if config.network == "paper":
        return LSTMPolicy(obs_dim, n_coordinates, config.hidden_size, n_levels)
    n_own = (obs_dim - len(BASE_OBS_NAMES)) // n_coordinates
    return CoordinateWisePolicy(len(BASE_OBS_NAMES), n_own, config.hidden_size, n_levels)


def sample(dist: Categorical, generator: torch.Generator) -> torch.Tensor:
    """One level per coordinate, drawn from the policy's own generator, so the draws depend
    only on the agent's seed and not on whatever else uses torch's global RNG."""
    probs = dist.probs
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(probs.shape[:-1])


class ReinforcePolicy:
    """A frozen LSTM policy behind the common ``reset()/act(obs)`` interface."""

    def __init__(self, net: LSTMPolicy, deterministic: bool = True, seed: int | None = None):
        self.net, self.deterministic = net.eval(), deterministic
        self.generator = torch.Generator().manual_seed(0 if seed is None else seed)
        self.reset()

    def reset(self) -> None:
        self.state = self.net.initial_state()

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        dist, self.state = self.net(torch.as_tensor(obs, dtype=torch.float32), self.state)
        action = dist.probs.argmax(-1) if self.deterministic else sample(dist, self.generator)
        return action.numpy()

    def state_dict(self) -> dict:
        lstm = {} if self.state is None else {"h": self.state[0], "c": self.state[1]}
        return {**lstm, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.state = (state["h"], state["c"]) if "h" in state else None
        self.generator.set_state(state["generator"])


class ReinforceTrainer:
    """Algorithm 1: run the env with the LSTM policy; every U steps minimise Eq. 7.

    ``env`` is one env or a gymnasium ``VectorEnv`` of N copies (``train_policy.py
    --num-envs``): then N episodes run at once, and each update averages Eq. 7 over the batch
    of episodes, with the per-step baseline tracking the batch's mean reward. With one env the
    numbers are those of the single-episode algorithm.
    """

    def __init__(self, env: gym.Env | gym.vector.VectorEnv, config: ReinforceConfig | None = None, seed: int = 0):
        if not isinstance(env, gym.vector.VectorEnv):
            env = gym.vector.SyncVectorEnv([lambda: env], autoreset_mode=gym.vector.AutoresetMode.DISABLED)
        self.envs, self.cfg = env, config or ReinforceConfig()
        obs_dim, space = env.single_observation_space.shape[0], env.single_action_space
        if not isinstance(space, gym.spaces.MultiDiscrete) or len(set(space.nvec.tolist())) != 1:
            raise UserInputError("the REINFORCE agent picks one of N levels per coordinate; with action=continuous "
                                 "use an SB3 agent (ppo, a2c, recurrent-ppo)")
        n_coordinates = len(space.nvec)
        with torch.random.fork_rng(devices=[]):  # the policy's initial weights, from its seed alone
            torch.manual_seed(seed)
            self.net = build_network(self.cfg, obs_dim, n_coordinates, int(space.nvec[0]))
        self.generator = torch.Generator().manual_seed(seed)  # the sampled actions
        opt = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[self.cfg.optimizer]
        self.optimizer = opt(self.net.parameters(), lr=self.cfg.lr)
        self.baseline = torch.zeros(0)  # b_t per step t, grown on demand
        self.reward_rms = RunningMeanStd(())
        self.episodes_done = self.updates = 0

    def _advantages(self, steps: list[int], rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Rewards and mask are (U, N): U steps of N episodes, some of which may have ended.
        With discounted returns the U steps are whole episodes (ended steps hold 0)."""
        if self.cfg.returns == "discounted":
            rewards = rewards.clone()
            for t in range(len(rewards) - 2, -1, -1):
                rewards[t] += self.cfg.gamma * rewards[t + 1]
        mean = (rewards * mask).sum(1) / mask.sum(1).clamp(min=1)
        if self.cfg.baseline == "per-step":
            if len(self.baseline) <= max(steps):
                self.baseline = torch.cat([self.baseline, torch.full((max(steps) + 1 - len(self.baseline),), float("nan"))])
            b = self.baseline[steps]
            seen = ~torch.isnan(b)
            adv = rewards - torch.where(seen, b, mean)[:, None]  # first visit: no baseline yet → 0
            d = self.cfg.baseline_decay
            self.baseline[steps] = torch.where(seen, d * b + (1 - d) * mean, mean)
        else:
            adv = rewards
        self.reward_rms.update(rewards[mask])
        return adv / torch.sqrt(self.reward_rms.var + 1e-8)

    def _update(self, steps, log_probs, entropies, rewards, masks) -> float:
        """Eq. 7 over the steps given: L_π = −1/U Σ A_t log p(a_t|s_t) − β H, averaged over the
        episodes still running."""
        mask = torch.stack(masks)
        adv = self._advantages(steps, torch.tensor(np.array(rewards), dtype=torch.float32), mask)
        loss = -(adv * torch.stack(log_probs))[mask].mean() - self.cfg.entropy_coef * torch.stack(entropies)[mask].mean()
        self.optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.updates += 1
        return loss.item()

    def _reward_scales(self, info: dict) -> np.ndarray:
        """Each episode's reward divisor: its initial loss L_0, or 1."""
        n = self.envs.num_envs
        if self.cfg.reward_scale == "none" or "loss" not in info:
            return np.ones(n)
        return np.maximum(np.abs(np.asarray(info["loss"], dtype=np.float64).reshape(n)), 1e-8)

    def run_episodes(self, seeds: list[int]) -> list[dict]:
        """One training episode per env, all at once; each ends on its own (an env whose episode
        is over gets the others' steps but nothing of it is used). Returns each one's return
        (unscaled), actions, last info and mean action entropy as a fraction of its maximum."""
        n = self.envs.num_envs
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} envs")
        self.net.train()
        obs, info = self.envs.reset(seed=[int(s) for s in seeds])
        scales = self._reward_scales(info)
        state = self.net.initial_state(n)  # h_0 = 0 (Algorithm 1, line 1)
        running = np.ones(n, dtype=bool)
        returns, actions, last_info = np.zeros(n), [[] for _ in range(n)], [{} for _ in range(n)]
        entropy = np.zeros(n)
        steps, log_probs, entropies, rewards, masks = [], [], [], [], []
        t = 0
        while running.any():
            obs_t = torch.as_tensor(obs, dtype=torch.float32)
            self.net.update_normalizer(obs_t[torch.from_numpy(running)])
            dist, state = self.net(obs_t, state)
            action = sample(dist, self.generator)
            obs, reward, terminated, truncated, info = self.envs.step(action.numpy())
            steps.append(t)
            log_probs.append(dist.log_prob(action).sum(-1))  # independent heads: log-probs add
            entropies.append(dist.entropy().sum(-1))
            rewards.append(np.where(running, reward / scales, 0.0))
            masks.append(torch.from_numpy(running.copy()))
            entropy += np.where(running, entropies[-1].detach().numpy(), 0.0)
            for i in np.flatnonzero(running):
                returns[i] += reward[i]
                actions[i].append(action[i].numpy())
                last_info[i] = env_info(info, i)
            done = terminated | truncated
            running &= ~done
            if done.any() and running.any():  # gymnasium steps only live envs: restart the ended ones, unused
                obs, _ = self.envs.reset(options={"reset_mask": done})
            t += 1
            if t % self.cfg.unroll == 0 or not running.any():  # (t+1) % U == 0 (line 10)
                state = (state[0].detach(), state[1].detach())  # carry h, stop the gradient
                if self.cfg.returns == "immediate" or not running.any():
                    self._update(steps, log_probs, entropies, rewards, masks)
                    steps, log_probs, entropies, rewards, masks = [], [], [], [], []
        self.episodes_done += n
        max_entropy = action.shape[-1] * np.log(self.net.n_levels)  # uniform levels
        return [{"return": float(returns[i]), "actions": np.array(actions[i]), "info": last_info[i],
                 "length": len(actions[i]), "entropy_ratio": entropy[i] / len(actions[i]) / max_entropy}
                for i in range(n)]

    def run_episode(self, seed: int) -> dict:
        """One training episode (the trainer must hold one env)."""
        return self.run_episodes([seed])[0]

    # ------------------------------------------------------------------ saving and loading
    def policy_state(self, metadata: dict) -> dict:
        """The frozen policy: weights, normaliser and config, loadable with weights_only=True."""
        return {
            "format": POLICY_FORMAT, "agent": "reinforce", "config": asdict(self.cfg),
            "obs_dim": self.envs.single_observation_space.shape[0], "n_coordinates": len(self.envs.single_action_space.nvec),
            "n_levels": self.net.n_levels,
            "state_dict": self.net.state_dict(), **metadata,
        }

    def checkpoint(self, metadata: dict) -> dict:
        """Everything needed to resume training exactly where it stopped."""
        return {
            "policy": self.policy_state(metadata), "optimizer": self.optimizer.state_dict(),
            "baseline": self.baseline, "reward_rms": self.reward_rms.state_dict(),
            "episodes_done": self.episodes_done, "updates": self.updates, "sampler_rng": self.generator.get_state(),
        }

    def load_checkpoint(self, ckpt: dict) -> None:
        self.net.load_state_dict(ckpt["policy"]["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.baseline = ckpt["baseline"]
        self.reward_rms.load_state_dict(ckpt["reward_rms"])
        self.episodes_done, self.updates = int(ckpt["episodes_done"]), int(ckpt.get("updates", 0))
        self.generator.set_state(ckpt["sampler_rng"])


def policy_from_state(state: dict, deterministic: bool = True, seed: int | None = None) -> ReinforcePolicy:
    known = {f.name for f in fields(ReinforceConfig)}
    unknown = sorted(set(state["config"]) - known)
    if unknown:
        raise UserInputError(f"the policy's REINFORCE config has {unknown[0]!r}, which this ASG-Gym does not know")
    config = ReinforceConfig(**state["config"])
    net = build_network(config, state["obs_dim"], state["n_coordinates"], state.get("n_levels", N_LEVELS))
    net.load_state_dict(state["state_dict"])
    return ReinforcePolicy(net, deterministic, seed)
