
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from toy_env import ToyLREnv

from agents.es import ESConfig, ESTrainer, Workers, centred_ranks
from agents.loading import load_policy, save_policy
from asg_env import UserInputError

META = {"obs_names": ToyLREnv().obs_names, "coordinate_names": ToyLREnv().coordinate_names,
        "backbone": "toy", "env_id": None}


class ScoredToyEnv(ToyLREnv):
    """The toy env with a synthetic score: the mean distance of the levels from the best ones."""

    synthetic_score = True

    def reset(self, *, seed=None, options=None):
        self.distance = 0.0
        return super().reset(seed=seed, options=options)

    def step(self, action):
        obs, reward, done, truncated, info = super().step(action)
        self.distance += float(np.abs(np.asarray(action) - self.best).mean()) + self.noise * self.np_random.normal()
        if done:
            info["score"] = self.distance / self.T
        return obs, reward, done, truncated, info


def test_centred_ranks_span_minus_to_plus_a_half():
    assert centred_ranks(torch.tensor([3.0, -1.0, 10.0])).tolist() == [0.0, -0.5, 0.5]


def test_es_lowers_the_score_of_its_greedy_policy():
    trainer = ESTrainer(ScoredToyEnv(episode_steps=4), ESConfig(pairs=6, sigma=0.1, lr=0.05), seed=0)
    first = np.mean([e["score"] for e in trainer.run_generation()])
    for _ in range(40):
        last = np.mean([e["score"] for e in trainer.run_generation()])
    assert trainer.episodes_done == 41 * 12
    assert last < 0.5 * first, (first, last)


def test_both_members_of_a_pair_share_the_env_seed_and_their_noise_is_opposite():
    trainer = ESTrainer(ScoredToyEnv(episode_steps=3), ESConfig(pairs=3), seed=1)
    episodes = trainer.run_generation()
    by_pair = {}
    for e in episodes:
        by_pair.setdefault(e["pair"], []).append(e)
    assert all(len(p) == 2 and p[0]["seed"] == p[1]["seed"] for p in by_pair.values())
    assert len({p[0]["seed"] for p in by_pair.values()}) == 3


def test_es_needs_the_synthetic_score():
    with pytest.raises(UserInputError, match="synthetic_score"):
        ESTrainer(ToyLREnv(), ESConfig())


def test_es_policy_loads_like_a_reinforce_one_and_resumes_exactly(tmp_path):
    a = ESTrainer(ScoredToyEnv(episode_steps=3), ESConfig(pairs=2, network="coordinate-wise"), seed=0)
    a.run_generation()
    save_policy(a.policy_state(META), str(tmp_path / "policy.pt"))
    save_policy(a.checkpoint(META), str(tmp_path / "checkpoint.pt"))
    a.run_generation()
    b = ESTrainer(ScoredToyEnv(episode_steps=3), ESConfig(pairs=2, network="coordinate-wise"), seed=0)
    b.load_checkpoint(torch.load(tmp_path / "checkpoint.pt", weights_only=True))
    b.run_generation()
    assert torch.equal(a.theta, b.theta) and b.episodes_done == 8
    env = ScoredToyEnv()
    policy = load_policy(str(tmp_path / "policy.pt"), env)
    obs, _ = env.reset(seed=0)
    assert env.action_space.contains(policy.act(obs))


def _es_rank(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    trainer = ESTrainer(ScoredToyEnv(episode_steps=3), ESConfig(pairs=3), seed=2, workers=Workers(rank, world, store))
    episodes = [len(trainer.run_generation()) for _ in range(2)]
    if rank == 0:
        torch.save({"theta": trainer.theta.detach(), "rms": trainer.net.obs_rms.state_dict(),
                    "episodes": torch.tensor(episodes)}, out)


def test_two_workers_take_the_update_one_worker_takes(tmp_path):
    one = ESTrainer(ScoredToyEnv(episode_steps=3), ESConfig(pairs=3), seed=2)
    for _ in range(2):
        one.run_generation()
    out = str(tmp_path / "two.pt")
    mp.spawn(_es_rank, args=(2, str(tmp_path / "store"), out), nprocs=2)
    two = torch.load(out, weights_only=True)
    assert not torch.equal(one.theta.detach(), ESTrainer(ScoredToyEnv(), ESConfig(pairs=3), seed=2).theta.detach())
    assert torch.allclose(one.theta.detach(), two["theta"], atol=1e-6)
    assert two["episodes"].tolist() == [6, 6]  # rank 0 holds every episode of a generation
    for k, v in one.net.obs_rms.state_dict().items():
        assert torch.allclose(v, two["rms"][k], atol=1e-5), k
