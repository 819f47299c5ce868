import gymnasium as gym
import numpy as np
import pytest
import torch
from toy_env import ToyLREnv

from agents.loading import env_metadata, load_policy, save_policy
from agents.policies import ConstantPolicy, RandomPolicy, hand_tuned_levels, make_baseline
from agents.reinforce import (
    CoordinateWisePolicy,
    LSTMPolicy,
    ReinforceConfig,
    ReinforcePolicy,
    ReinforceTrainer,
    policy_from_state,
)
from asg_env import N_LEVELS, UserInputError

META = {"obs_names": ToyLREnv().obs_names, "coordinate_names": ToyLREnv().coordinate_names,
        "backbone": "toy", "env_id": None}


def _best_level_probability(net: LSTMPolicy, env: ToyLREnv) -> float:
    obs, _ = env.reset(seed=0)
    with torch.no_grad():
        dist, _ = net(torch.as_tensor(obs), net.initial_state())
    return float(dist.probs[torch.arange(len(env.best)), torch.as_tensor(env.best)].mean())


def test_reinforce_raises_the_probability_of_the_best_levels():
    torch.manual_seed(0)
    env = ToyLREnv()
    trainer = ReinforceTrainer(env, ReinforceConfig(lr=0.01))
    before = _best_level_probability(trainer.net, env)
    returns = [trainer.run_episode(seed=i)["return"] for i in range(150)]
    after = _best_level_probability(trainer.net, env)
    assert before < 0.15  # about 1/11 at initialisation
    assert after > 0.4, (before, after)
    assert np.mean(returns[-20:]) > np.mean(returns[:20]) + 0.5


class DelayedRewardEnv(ToyLREnv):
    """The first decision alone decides the outcome, and it is paid out at the last one."""

    def step(self, action):
        if self.t == 0:
            self.first = np.asarray(action)
        obs, _, done, truncated, info = super().step(action)
        reward = -float(np.abs(self.first - self.best).mean()) / 10 if done else 0.0
        return obs, reward, done, truncated, info


@pytest.mark.parametrize("returns", ["discounted", "immediate"])
def test_discounted_returns_credit_the_decision_that_earned_a_delayed_reward(returns):
    env = DelayedRewardEnv(episode_steps=6)
    trainer = ReinforceTrainer(env, ReinforceConfig(lr=0.02, returns=returns), seed=0)
    before = _best_level_probability(trainer.net, env)
    for i in range(200):
        trainer.run_episode(seed=i)
    after = _best_level_probability(trainer.net, env)
    if returns == "discounted":
        assert after > 0.3 and after > 2 * before, (before, after)
    else:  # Eq. 7 as written: the first decision never sees the reward
        assert after < 0.15, (before, after)


def test_rewards_are_scaled_by_each_episodes_initial_loss():
    class LossEnv(ToyLREnv):
        def reset(self, *, seed=None, options=None):
            obs, _ = super().reset(seed=seed)
            self.l0 = 1.0 + seed
            return obs, {"loss": self.l0}

        def step(self, action):
            obs, _, done, truncated, info = super().step(action)
            return obs, self.l0 * 0.1, done, truncated, info

    envs = gym.vector.SyncVectorEnv([lambda: LossEnv(episode_steps=3), lambda: LossEnv(episode_steps=3)],
                                    autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    trainer = ReinforceTrainer(envs, ReinforceConfig(returns="immediate", baseline="none"))
    seen = []
    trainer._advantages = lambda steps, rewards, mask: seen.append(rewards.clone()) or torch.zeros_like(rewards)
    results = trainer.run_episodes([0, 4])
    assert [r["return"] for r in results] == pytest.approx([0.3, 1.5])  # returns are reported unscaled
    assert torch.allclose(seen[0], torch.full((3, 2), 0.1))  # the agent learns from r_t / L_0


def test_each_env_of_a_vector_env_ends_its_episode_on_its_own():
    lengths = (2, 5)
    envs = gym.vector.SyncVectorEnv([lambda T=T: ToyLREnv(episode_steps=T) for T in lengths],
                                    autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    trainer = ReinforceTrainer(envs, ReinforceConfig(unroll=3))
    results = trainer.run_episodes([0, 1])
    assert [r["length"] for r in results] == list(lengths)
    assert all(0 < r["entropy_ratio"] <= 1 for r in results)


def test_hidden_state_carries_within_an_episode_and_resets_at_its_start():
    torch.manual_seed(0)
    policy = ReinforcePolicy(LSTMPolicy(obs_dim=8, n_coordinates=3), deterministic=True)
    obs = np.linspace(-1, 1, 8).astype(np.float32)

    def logits():
        with torch.no_grad():
            dist, _ = policy.net(torch.as_tensor(obs), policy.state)
        return dist.logits.clone()

    first = logits()
    policy.act(obs)
    second = logits()  # same observation, one step later: the state must have moved on
    assert not torch.allclose(first, second)
    policy.reset()
    assert torch.equal(logits(), first)


def test_greedy_policy_is_deterministic_and_sampling_is_not():
    torch.manual_seed(0)
    net = LSTMPolicy(obs_dim=8, n_coordinates=3)
    obs = np.zeros(8, np.float32)
    greedy = ReinforcePolicy(net, deterministic=True)
    runs = []
    for _ in range(3):
        greedy.reset()
        runs.append(np.concatenate([greedy.act(obs) for _ in range(4)]))
    assert all(np.array_equal(runs[0], r) for r in runs)
    sampled = ReinforcePolicy(net, deterministic=False)
    draws = {tuple(sampled.act(obs)) for _ in range(20)}
    assert len(draws) > 1


def test_save_load_round_trip_gives_the_same_actions(tmp_path):
    torch.manual_seed(0)
    env = ToyLREnv()
    trainer = ReinforceTrainer(env)
    trainer.run_episode(seed=0)  # moves the weights and the observation normaliser
    path = str(tmp_path / "policy.pt")
    save_policy(trainer.policy_state(META), path)
    assert torch.load(path, weights_only=True)["format"] == "asg-gym-policy/1"
    loaded = load_policy(path, env)
    original = policy_from_state(trainer.policy_state(META))
    assert torch.equal(loaded.net.obs_rms.mean, trainer.net.obs_rms.mean)
    obs, _ = env.reset(seed=3)
    for _ in range(5):
        a, b = original.act(obs), loaded.act(obs)
        assert np.array_equal(a, b)
        obs, *_ = env.step(a)


def test_checkpoint_resumes_the_same_training(tmp_path):
    torch.manual_seed(0)
    env = ToyLREnv()
    a = ReinforceTrainer(env)
    a.run_episode(seed=0)
    path = str(tmp_path / "ckpt.pt")
    save_policy(a.checkpoint(META), path)
    a.run_episode(seed=1)
    b = ReinforceTrainer(env)
    b.load_checkpoint(torch.load(path, weights_only=True))
    b.run_episode(seed=1)
    assert b.episodes_done == 2
    for pa, pb in zip(a.net.parameters(), b.net.parameters()):
        assert torch.allclose(pa, pb)


@pytest.mark.parametrize("content", [b"junk", None])
def test_bad_policy_files_are_refused(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save({"weights": torch.zeros(3)}, path)  # a checkpoint, but not a policy
    else:
        path.write_bytes(content)
    with pytest.raises(UserInputError, match="policy"):
        load_policy(str(path), ToyLREnv())
    with pytest.raises(UserInputError, match="not found"):
        load_policy(str(tmp_path / "missing.pt"), ToyLREnv())


def test_policy_for_another_model_is_refused(tmp_path):
    trainer = ReinforceTrainer(ToyLREnv(best=(1, 2, 3, 4)))
    path = str(tmp_path / "four.pt")
    save_policy(trainer.policy_state({**META, "coordinate_names": ["a", "b", "c", "d"]}), path)
    with pytest.raises(UserInputError, match="trained for 4 coordinates"):
        load_policy(path, ToyLREnv())


def test_policy_with_the_same_count_but_other_coordinates_is_refused(tmp_path):
    """Coordinates are compared by name: a 3-coordinate policy of another model is refused."""
    path = str(tmp_path / "other.pt")
    save_policy(ReinforceTrainer(ToyLREnv()).policy_state({**META, "coordinate_names": ["conv1", "layer1", "fc"]}), path)
    with pytest.raises(UserInputError, match="conv1, layer1, fc.*c0, c1, c2"):
        load_policy(path, ToyLREnv())


def test_seed_sets_the_policys_weights_and_samples_and_nothing_else():
    def run(seed):
        torch.manual_seed(123)  # the global RNG must not matter
        trainer = ReinforceTrainer(ToyLREnv(), seed=seed)
        weights = [p.detach().clone() for p in trainer.net.parameters()]
        return weights, trainer.run_episode(seed=0)["actions"]

    (w0, a0), (w0b, a0b), (w1, a1) = run(0), run(0), run(1)
    assert all(torch.equal(a, b) for a, b in zip(w0, w0b)) and np.array_equal(a0, a0b)
    assert not torch.equal(w0[0], w1[0]) and not np.array_equal(a0, a1)
    net = LSTMPolicy(obs_dim=8, n_coordinates=3)
    draws = [np.concatenate([ReinforcePolicy(net, deterministic=False, seed=s).act(np.zeros(8, np.float32))
                             for _ in range(5)]) for s in (7, 7, 8)]
    assert np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[0], draws[2])


def test_episode_seeds_of_different_runs_never_overlap():
    from agents.rollout import episode_seed

    runs = [{episode_seed(run, ep) for ep in range(200)} for run in range(5)]
    assert all(len(r) == 200 for r in runs)
    assert not set.intersection(*runs[:2]) and len(set.union(*runs)) == 1000


def test_baselines():
    assert hand_tuned_levels("hand-tuned", 4) == [1, 1, 1, 10]
    assert hand_tuned_levels("large-everywhere", 3) == [10, 10, 10]
    assert hand_tuned_levels("classifier-only", 3) == [0, 0, 10]
    assert isinstance(make_baseline("constant:1,2,3", 3), ConstantPolicy)
    assert list(make_baseline("constant:1,2,3", 3).act(None)) == [1, 2, 3]
    rand = make_baseline("random", 3, seed=0)
    assert isinstance(rand, RandomPolicy)
    draws = np.array([rand.act(None) for _ in range(200)])
    assert draws.min() == 0 and draws.max() == 10
    with pytest.raises(UserInputError, match="3 coordinates"):
        make_baseline("constant:1,2", 3)
    with pytest.raises(UserInputError, match="integers 0-10"):
        make_baseline("constant:1,2,11", 3)
    with pytest.raises(UserInputError, match="unknown setting"):
        make_baseline("warm-restarts", 3)


@pytest.mark.parametrize("agent", ["recurrent-ppo", "ppo"])
def test_sb3_agents_learn_on_the_toy_env_and_round_trip(agent, tmp_path):
    from agents.sb3_agents import make_sb3, sb3_policy_state

    env = ToyLREnv()
    model = make_sb3(agent, env, seed=0, hyperparams={"n_steps": 100, "batch_size": 50})
    model.learn(total_timesteps=300)
    assert model.num_timesteps >= 300
    path = str(tmp_path / "sb3.pt")
    save_policy(sb3_policy_state(agent, model, META), path)
    loaded, original = load_policy(path, env), load_policy(path, env)
    obs, _ = env.reset(seed=0)
    for _ in range(4):
        a = loaded.act(obs)
        assert np.array_equal(a, original.act(obs)) and env.action_space.contains(a)
        obs, *_ = env.step(a)


def test_sb3_envs_start_from_their_episode_seeds_and_the_samples_from_the_seed_alone(tmp_path):
    from stable_baselines3.common.vec_env import DummyVecEnv

    from agents.rollout import episode_seed
    from train_policy import EpisodeLog, train_sb3

    class Env(ToyLREnv):
        def __init__(self, reseeds_torch=False):
            super().__init__(episode_steps=4)
            self.reseeds_torch, self.seeds = reseeds_torch, []

        def reset(self, *, seed=None, options=None):
            self.seeds.append(seed)
            if self.reseeds_torch:  # as ASGEnv's trainer does (the vector envs do not)
                torch.manual_seed(123)
            return super().reset(seed=seed, options=options)

    def first_actions(env, name):
        out, n = str(tmp_path / name), getattr(env, "num_envs", 1)
        config = {"agent": {"name": "ppo", "ppo": {"n_steps": 4, "batch_size": 4, "normalize": False}},
                  "train": {"seed": 3, "episodes": n}}
        log = EpisodeLog(out, META["coordinate_names"])
        train_sb3(env, config, out, META, log, None)
        log.close()
        return [row for row in open(f"{out}/steps.csv") if row.startswith("0,")]

    single, reseeding, pair = Env(), Env(reseeds_torch=True), [Env(), Env()]
    assert first_actions(single, "single") == first_actions(reseeding, "reseeding")
    first_actions(DummyVecEnv([lambda: pair[0], lambda: pair[1]]), "pair")
    assert single.seeds[0] == pair[0].seeds[0] == episode_seed(3, 0) and pair[1].seeds[0] == episode_seed(3, 1)


def test_env_metadata_names_the_models_coordinates():
    meta = env_metadata(ToyLREnv())
    assert meta["coordinate_names"] == ["c0", "c1", "c2"] and meta["backbone"] == "toy"


def test_coordinate_wise_rows_hold_the_global_features_and_each_coordinates_own():
    net = CoordinateWisePolicy(n_global=5, n_own=3)  # its scale and two features per coordinate
    glob, scales = [1.0, 2.0, 0.5, 0.0, 0.1], [0.1, 0.2, 0.3]
    own = [[10.0, 11.0], [20.0, 21.0], [30.0, 31.0]]  # the env's layout: coordinate-major
    rows = net.rows(torch.tensor(glob + scales + sum(own, [])))
    expected = torch.tensor([glob + [s] + o for s, o in zip(scales, own)])
    assert torch.equal(rows, expected)
    with pytest.raises(ValueError, match="does not split"):
        net.rows(torch.zeros(5 + 3 * 3 + 1))


def test_coordinate_wise_policy_shares_one_network_and_fits_any_coordinate_count():
    torch.manual_seed(0)
    net = CoordinateWisePolicy(n_global=5, n_own=1)
    obs = torch.rand(5 + 4)
    dist, (h, _) = net(obs, None)
    assert dist.probs.shape == (4, N_LEVELS) and h.shape == (4, net.hidden_size)
    changed = obs.clone()
    changed[5 + 2] += 0.5  # coordinate 2's last scale: only coordinate 2's distribution moves
    moved = ~torch.isclose(net(changed, None)[0].logits, dist.logits).all(-1)
    assert moved.tolist() == [False, False, True, False]
    for C in (1, 7, 9):
        assert net(torch.rand(2, 5 + C), None)[0].probs.shape == (2, C, N_LEVELS)


def test_reinforce_trains_the_coordinate_wise_policy_and_it_runs_on_another_backbone(tmp_path):
    torch.manual_seed(0)
    env = ToyLREnv()
    trainer = ReinforceTrainer(env, ReinforceConfig(lr=0.01, network="coordinate-wise", returns="immediate"))
    before = _best_level_probability(trainer.net, env)
    returns = [trainer.run_episode(seed=i)["return"] for i in range(150)]
    after = _best_level_probability(trainer.net, env)
    assert before < 0.15 and after > 0.3, (before, after)
    assert np.mean(returns[-20:]) > np.mean(returns[:20]) + 0.5
    path = str(tmp_path / "cw.pt")
    save_policy(trainer.policy_state(META), path)
    five = ToyLREnv(best=(1, 2, 3, 4, 5))
    five.backbone_name, five.coordinate_names = "toy-5", [f"k{i}" for i in range(5)]
    five.obs_names = five.obs_names[:5] + [f"last_action/k{i}" for i in range(5)]
    policy = load_policy(path, five)  # five coordinates, none of them named as in training
    obs, _ = five.reset(seed=0)
    assert five.action_space.contains(policy.act(obs))
    paper = str(tmp_path / "paper.pt")
    save_policy(ReinforceTrainer(env).policy_state(META), paper)
    with pytest.raises(UserInputError, match="trained for 3 coordinates"):
        load_policy(paper, five)


def test_sb3_policy_applies_its_frozen_vecnormalize_statistics(tmp_path):
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    from agents.sb3_agents import make_sb3, normalize_obs, sb3_policy_state

    venv = VecNormalize(DummyVecEnv([ToyLREnv]))
    model = make_sb3("ppo", venv, seed=0, hyperparams={"n_steps": 20, "batch_size": 20})
    model.learn(total_timesteps=40)
    path = str(tmp_path / "ppo.pt")
    save_policy(sb3_policy_state("ppo", model, META), path)
    stats = torch.load(path, weights_only=True)["vec_normalize"]
    np.testing.assert_allclose(stats["obs_rms"]["mean"].numpy(), venv.obs_rms.mean)
    assert stats["obs_rms"]["count"] > 40
    policy, env = load_policy(path, ToyLREnv()), ToyLREnv()
    obs, _ = env.reset(seed=0)
    for _ in range(4):
        np.testing.assert_allclose(normalize_obs(obs, stats), venv.normalize_obs(obs), rtol=1e-5)
        a = policy.act(obs)
        assert np.array_equal(a, model.predict(venv.normalize_obs(obs), deterministic=True)[0])
        obs, *_ = env.step(a)
    venv.reset()
    venv.step(np.array([venv.action_space.sample()]))  # training would move the statistics…
    assert not np.allclose(venv.obs_rms.mean, stats["obs_rms"]["mean"].numpy())
    assert torch.equal(policy.normalizer["obs_rms"]["mean"], stats["obs_rms"]["mean"])  # …applying leaves them


def test_coordinate_wise_policy_and_training_resume_exactly(tmp_path):
    torch.manual_seed(0)
    env = ToyLREnv()
    config = ReinforceConfig(network="coordinate-wise")
    a = ReinforceTrainer(env, config)
    a.run_episode(seed=0)
    save_policy(a.checkpoint(META), str(tmp_path / "ckpt.pt"))
    a.run_episode(seed=1)
    b = ReinforceTrainer(env, config)
    b.load_checkpoint(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    b.run_episode(seed=1)
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.net.parameters(), b.net.parameters()))

    policy, obs = policy_from_state(a.policy_state(META)), env.reset(seed=2)[0]
    state = policy.state_dict()
    assert "h" not in state  # before its first step the state is the LSTM's zeros
    for _ in range(2):
        policy.act(obs)
    mid = policy.state_dict()  # (h, c) of shape (C, hidden)
    assert mid["h"].shape == (3, config.hidden_size)
    after = policy.act(obs)
    again = policy_from_state(a.policy_state(META))
    again.load_state_dict(mid)
    assert np.array_equal(again.act(obs), after)
    fresh = policy_from_state(a.policy_state(META))
    fresh.load_state_dict(state)
    assert fresh.state is None
