import csv
import json
import os

import numpy as np
import pytest
import torch

import apply_policy
import train_policy
from agents.rollout import episode_seed

TINY = ["--set", "env.kwargs.episode_steps=3", "--set", "env.kwargs.batch_size=8",
        "--set", "env.kwargs.source_size=160", "--set", "env.kwargs.target_eval_size=60",
        "--set", "env.kwargs.image_size=32", "--set", "env.kwargs.synthetic_eval_size=40",
        "--set", "env.kwargs.imagenet_photos=4"]


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_train_then_resume_then_apply(tmp_path, cache_dir, capsys):
    out = str(tmp_path / "run")
    assert train_policy.main(["--agent", "reinforce", "--episodes", "1", "--out", out, "--data-root", cache_dir, "--seed", "5", *TINY]) == 0
    for name in ("policy.pt", "checkpoint.pt", "config.yaml", "episodes.csv", "steps.csv"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert os.listdir(os.path.join(out, "tb"))

    # Resuming extends the same run instead of starting over.
    assert train_policy.main(["--out", out, "--resume", "--episodes", "2", "--data-root", cache_dir]) == 0
    episodes = _rows(os.path.join(out, "episodes.csv"))
    assert [r["episode"] for r in episodes] == ["0", "1"]
    assert [int(r["seed"]) for r in episodes] == [episode_seed(5, 0), episode_seed(5, 1)]
    assert len(_rows(os.path.join(out, "steps.csv"))) == 6
    assert all(r["target_acc"] == "" for r in episodes)  # policy training never looks at the target
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["episodes_done"] == 2
    cost = torch.load(os.path.join(out, "policy.pt"), weights_only=True)["training"]
    assert cost["episodes"] == 2 and cost["decisions"] == 6 and cost["updates"] == 2  # one update per episode
    assert cost["sgd_steps"] == sum(int(r["sgd_steps"]) for r in episodes) > 0 and cost["device"] == "cpu"
    assert cost["wall_s"] == round(sum(float(r["seconds"]) for r in episodes), 1)  # the logged seconds, summed
    assert all(0 < float(r["entropy_ratio"]) <= 1 for r in episodes)
    assert "policy.pt" in capsys.readouterr().out

    # Applied as trained: the policy's recorded env (T = 3 decisions, held-out reward batch...).
    applied = str(tmp_path / "applied")
    args = ["--policy", os.path.join(out, "policy.pt"), "--eval-every", "2", "--out", applied, "--data-root", cache_dir]
    assert apply_policy.main(args) == 0
    assert "override" not in capsys.readouterr().out
    curve = _rows(os.path.join(applied, "curve.csv"))
    assert [int(r["step"]) for r in curve] == [0, 2, 3]
    assert all(0 <= float(r["target_mean_class_acc"]) <= 1 for r in curve)
    summary = json.load(open(os.path.join(applied, "summary.json")))
    assert summary["decisions"] == summary["decisions_made"] == 3 and summary["sgd_steps"] == 3
    trained = torch.load(os.path.join(out, "policy.pt"), weights_only=True)["env_kwargs"]
    for key in ("reward_batch", "lam", "lr_base", "batch_size", "image_size", "source_size", "episode_steps"):
        assert summary["env_kwargs"][key] == trained[key], key
    assert trained["reward_batch"] == "heldout" and summary["overrides"] == {}
    for name in ("curve.png", "model.safetensors", "steps.csv"):
        assert os.path.getsize(os.path.join(applied, name)) > 0

    # A longer run keeps the 3 decisions and holds each for longer; an explicit setting is an
    # override, and the tool says so.
    longer = str(tmp_path / "longer")
    args = ["--policy", os.path.join(out, "policy.pt"), "--steps", "7", "--out", longer, "--data-root", cache_dir,
            "--set", "env.kwargs.lam=0.05"]
    assert apply_policy.main(args) == 0
    assert "override: lam = 0.05 (the policy was trained with 0.1)" in capsys.readouterr().out
    summary = json.load(open(os.path.join(longer, "summary.json")))
    assert summary["decisions"] == 3 and summary["sgd_steps_done"] == 7
    assert [int(r["sgd_step"]) for r in _rows(os.path.join(longer, "steps.csv"))] == [0, 3, 5, 7]
    assert summary["overrides"] == {"lam": {"trained": 0.1, "applied": 0.05}}

    every = str(tmp_path / "every")
    args = ["--policy", os.path.join(out, "policy.pt"), "--steps", "5", "--decision-every-step", "--out", every,
            "--data-root", cache_dir]
    assert apply_policy.main(args) == 0
    assert json.load(open(os.path.join(every, "summary.json")))["decisions"] == 5


TINY_KWARGS = {"data_root": None, "batch_size": 8, "source_size": 160, "target_eval_size": 60, "image_size": 32,
               "synthetic_eval_size": 40, "imagenet_photos": 4, "reward_batch": "heldout", "evaluate_target": False}


def _untrained_policy(path: str, cache_dir: str, env_id: str = "SynDigits-v0", **kwargs) -> str:
    """An untrained LSTM policy file for ``env_id``, as train_policy.py would write it."""
    from agents.config import make_env
    from agents.loading import env_metadata, save_policy
    from agents.reinforce import ReinforceTrainer

    env = make_env({"env": {"id": env_id, "kwargs": {**TINY_KWARGS, "data_root": cache_dir, **kwargs}}})
    save_policy(ReinforceTrainer(env, seed=4).policy_state(env_metadata(env)), path)
    return path


def test_another_env_id_runs_that_envs_settings_not_the_policys(tmp_path, cache_dir, capsys):
    import gymnasium as gym

    policy = _untrained_policy(str(tmp_path / "policy.pt"), cache_dir, episode_steps=2, lam=0.1)
    gym.register("SynDigits48-v0", entry_point="asg_env.envs.env:ASGEnv",
                 kwargs={**gym.spec("SynDigits-v0").kwargs, "image_size": 48, "lam": 0.3})
    (tmp_path / "other.yaml").write_text("env: {id: SynDigits48-v0}\n")
    mine = ["--set", "env.kwargs.source_size=160", "--set", "env.kwargs.batch_size=8", "--set",
            "env.kwargs.synthetic_eval_size=40", "--set", "env.kwargs.imagenet_photos=4",
            "--set", "env.kwargs.episode_steps=2"]
    try:
        for how in (["--env", "SynDigits48-v0"], ["--config", str(tmp_path / "other.yaml")]):
            out = str(tmp_path / how[0].strip("-"))
            argv = ["--policy", policy, *how, "--steps", "2", "--out", out, "--data-root", cache_dir, *mine]
            assert apply_policy.main(argv) == 0
            assert "env: SynDigits48-v0, not the policy's SynDigits-v0" in capsys.readouterr().out
            summary = json.load(open(os.path.join(out, "summary.json")))
            used = summary["env_kwargs"]
            assert (used["image_size"], used["lam"]) == (48, 0.3)  # the new id's, not the policy's 32 px and 0.1
            assert used["reward_batch"] == "train" and used["source_size"] == 160  # the env's default; the user's
            assert used["episode_steps"] == 2 and summary["decisions"] == 2
            assert summary["env"] == "SynDigits48-v0" and summary["trained_env"] == "SynDigits-v0"
            assert summary["overrides"] == {}
    finally:
        gym.registry.pop("SynDigits48-v0")
    # A task whose coordinates the policy does not fit is refused by name.
    argv = ["--policy", policy, "--env", "SynDigitScenes-v0", "--out", str(tmp_path / "seg"), "--data-root", cache_dir,
            "--set", "env.kwargs.image_size=32", "--set", "env.kwargs.source_size=16", "--set", "env.kwargs.batch_size=8",
            "--set", "env.kwargs.target_eval_size=8", "--set", "env.kwargs.synthetic_eval_size=0"]
    assert apply_policy.main(argv) == 2
    assert "was trained for 9 coordinates of efficientnet_lite0 (conv_stem," in capsys.readouterr().err


@pytest.mark.parametrize("shape, decisions", [({"episode_steps": None, "sgd_steps": 3}, 8),
                                              ({"window": "growing", "episode_steps": 3}, 4),
                                              ({"episode_steps": 3}, 3)])
def test_the_run_length_text_says_what_happens_to_T(tmp_path, cache_dir, capsys, shape, decisions):
    """Fixed windows keep the policy's T; a decision per SGD step, or growing windows, make T
    follow the new length (8 SGD steps: growing windows of 1, 1, 2 and 4)."""
    policy = _untrained_policy(str(tmp_path / "policy.pt"), cache_dir, **shape)
    assert torch.load(policy, weights_only=True)["decisions"] == 3
    out = str(tmp_path / "applied")
    assert apply_policy.main(["--policy", policy, "--steps", "8", "--out", out, "--data-root", cache_dir]) == 0
    text = capsys.readouterr().out
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["decisions"] == summary["decisions_made"] == decisions and summary["sgd_steps_done"] == 8
    if decisions == 3:
        assert "3 decisions over 8 SGD steps" in text and "the policy's T, each decision held" in text
    else:
        assert "T follows the run length (the policy was trained with T = 3)" in text


def test_apply_baseline_by_epochs(tmp_path, cache_dir):
    out = str(tmp_path / "apply")
    # 160 training images / batch 8 = 20 steps per epoch.
    args = ["--policy", "classifier-only", "--epochs", "0.25", "--eval-every", "100", "--out", out,
            "--data-root", cache_dir, *TINY[2:]]
    assert apply_policy.main(args) == 0
    steps = _rows(os.path.join(out, "steps.csv"))
    assert len(steps) == 1 + 5
    assert all(r["action/conv_stem"] == "0" and r["action/new_head"] == "10" for r in steps[1:])


def test_hand_tuned_is_the_official_schedule(tmp_path, cache_dir):
    out = str(tmp_path / "hand")
    args = ["--policy", "hand-tuned", "--steps", "3", "--out", out, "--data-root", cache_dir, *TINY[2:]]
    assert apply_policy.main(args) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["env_kwargs"]["lr_schedule"] == "poly"
    steps = _rows(os.path.join(out, "steps.csv"))
    assert all(r["action/blocks.1"] == "1" and r["action/new_head"] == "10" for r in steps[1:])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--policy", "nope.pt"], "policy file not found"),
        (["--policy", "constant:1,2"], "this env has 9 coordinates"),
        (["--policy", "hand-tuned", "--config", "missing.yaml"], "config file not found"),
        (["--policy", "hand-tuned", "--env", "VisDA-v0"], "is missing train/image_list.txt"),
    ],
)
def test_apply_bad_input_is_one_line_and_exit_2(argv, message, capsys, monkeypatch, cache_dir, tmp_path):
    monkeypatch.delenv("ASG_DATA", raising=False)
    assert apply_policy.main([*argv, "--out", str(tmp_path / "o"), "--data-root", cache_dir, *TINY[2:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


ENV_BAD = [(["--set", "env.kwargs.batch_size=0"], "batch_size must be a whole number ≥ 1, not 0"),
           (["--set", "env.kwargs.lr_base=-1"], "lr_base must be a finite number ≥ 0, not -1"),
           (["--set", "env.kwargs.image_size=4"], "image_size must be at least 32 for efficientnet_lite0"),
           (["--set", "env.kwargs.target_eval_size=-5"], "target_eval_size must be a whole number ≥ 0, not -5"),
           (["--set", "env.kwargs.momentum=1.5"], "momentum must be a finite number in [0, 1), not 1.5")]
BAD_INPUT = [
    *[("train", argv, message) for argv, message in ENV_BAD],
    *[("apply", argv, message) for argv, message in ENV_BAD],
    ("train", ["--episodes", "0"], "train.episodes must be a whole number ≥ 1, not 0"),
    ("train", ["--num-envs", "-2"], "train.num_envs must be a whole number ≥ 1, not -2"),
    ("train", ["--seed", "-1"], "train.seed must be a whole number ≥ 0, not -1"),
    ("train", ["--config", "{config}"], "train.episodes must be a whole number ≥ 1, not 'abc'"),
    ("train", ["--set", "agent.reinforce.lr=0"], "agent.reinforce.lr must be a finite number > 0, not 0"),
    ("train", ["--set", "agent.reinforce.hiden_size=8"], "unknown setting agent.reinforce.hiden_size"),
    ("train", ["--agent", "recurrent-ppo", "--set", "agent.recurrent-ppo.n_steps=0"],
     "agent.recurrent-ppo.n_steps must be a whole number ≥ 1, not 0"),
    ("train", ["--agent", "ppo", "--set", "agent.ppo.n_step=4"], "unknown setting agent.ppo.n_step; PPO takes"),
    ("train", ["--set", "env.kwargs.lam=["], "--set env.kwargs.lam=[: cannot parse the value"),
    ("train", ["--out", "{killed}", "--resume"], "is corrupt or is not a checkpoint that ASG-Gym wrote"),
    ("train", ["--out", "{file}"], "is a file, not a folder; choose another --out"),
    ("train", ["--out", "/proc/asg-gym/run"], "cannot create the run folder --out /proc/asg-gym/run: No such file"),
    ("apply", ["--policy", "{corrupt}"], "is corrupt or is not a policy file that ASG-Gym wrote"),
    ("apply", ["--out", "{killed}", "--resume"], "is corrupt or is not a checkpoint that ASG-Gym wrote"),
]


@pytest.mark.parametrize("tool, argv, message", BAD_INPUT, ids=[f"{t}:{' '.join(a)}" for t, a, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2_before_anything_is_rendered(tool, argv, message, tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "out"
    cache.mkdir()
    (tmp_path / "bad.yaml").write_text("train: {episodes: abc}\n")
    (tmp_path / "corrupt.pt").write_bytes(os.urandom(256))
    killed = tmp_path / "killed"  # a run folder whose checkpoint is garbage
    killed.mkdir()
    (killed / "config.yaml").write_text("env: {id: SynDigits-v0}\n")
    (killed / "checkpoint.pt").write_bytes(os.urandom(256))
    (tmp_path / "a-file").write_text("not a folder\n")
    names = {"config": tmp_path / "bad.yaml", "corrupt": tmp_path / "corrupt.pt", "killed": killed,
             "file": tmp_path / "a-file"}
    argv = [a.format(**names) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(out)]
    if tool == "apply" and "--policy" not in argv and "--resume" not in argv:
        argv += ["--policy", "hand-tuned"]
    if tool == "train" and not {"--agent", "--config", "--resume"} & set(argv):
        argv += ["--agent", "reinforce"]  # the plain defaults, not the main command's setting
    module = train_policy if tool == "train" else apply_policy
    assert module.main([*argv, "--data-root", str(cache)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert "weights_only" not in err  # torch's advice to unpickle an untrusted file is never passed on
    assert not any(cache.iterdir()) and not out.exists()  # nothing rendered, no run folder


def test_too_small_a_source_or_a_negative_count_is_refused(tmp_path, cache_dir, capsys):
    argv = ["--policy", "hand-tuned", "--out", str(tmp_path / "o"), "--data-root", cache_dir, *TINY[2:]]
    assert apply_policy.main([*argv, "--set", "env.kwargs.source_size=4"]) == 2
    assert "smaller than one training batch" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        apply_policy.main([*argv, "--steps", "-3"])
    assert exit_.value.code == 2 and "must be positive" in capsys.readouterr().err


def test_policy_for_another_env_is_refused_by_the_cli(tmp_path, cache_dir, capsys):
    from toy_env import ToyLREnv

    from agents.loading import save_policy
    from agents.reinforce import ReinforceTrainer

    env = ToyLREnv()
    path = str(tmp_path / "toy.pt")
    save_policy(ReinforceTrainer(env).policy_state(
        {"obs_names": env.obs_names, "coordinate_names": env.coordinate_names, "backbone": "toy", "env_id": None}), path)
    assert apply_policy.main(["--policy", path, "--out", str(tmp_path / "o"), "--data-root", cache_dir, *TINY[2:]]) == 2
    assert "trained for 3 coordinates" in capsys.readouterr().err


def test_train_refuses_to_overwrite_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"x")
    assert train_policy.main(["--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_help_explains_both_tools(capsys):
    for module in (train_policy, apply_policy):
        with pytest.raises(SystemExit):
            module.main(["--help"])
    text = capsys.readouterr().out
    assert "--resume" in text and "--sample" in text and "hand-tuned" in text


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _subprocess_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def _state(path):
    from safetensors.torch import load_file

    return load_file(path)


@pytest.mark.parametrize("bn_stats", ["frozen", "train"])
def test_apply_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path, cache_dir, bn_stats):
    import signal
    import subprocess
    import sys
    import time

    base = [sys.executable, os.path.join(REPO, "apply_policy.py"), "--policy", "random", "--seed", "3",
            "--steps", "40", "--checkpoint-every", "4", "--eval-every", "20", "--data-root", cache_dir, *TINY[2:],
            "--set", f"env.kwargs.bn_stats={bn_stats}", "--set", "env.kwargs.reward_batch=heldout"]
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    subprocess.run([*base, "--out", whole], check=True, env=_subprocess_env(2), capture_output=True)

    proc = subprocess.Popen([*base, "--out", killed], env=_subprocess_env(2),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint, deadline = os.path.join(killed, "checkpoint.pt"), time.time() + 120
    while not os.path.exists(checkpoint) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done_before = len(_rows(os.path.join(killed, "steps.csv")))
    assert not os.path.exists(os.path.join(killed, "summary.json")) and 1 < done_before < 41

    resumed = subprocess.run([sys.executable, os.path.join(REPO, "apply_policy.py"), "--out", killed, "--resume",
                              "--data-root", cache_dir], env=_subprocess_env(2), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after decision" in resumed.stdout
    assert _rows(os.path.join(killed, "steps.csv")) == _rows(os.path.join(whole, "steps.csv"))
    assert _rows(os.path.join(killed, "curve.csv")) == _rows(os.path.join(whole, "curve.csv"))
    a, b = _state(os.path.join(whole, "model.safetensors")), _state(os.path.join(killed, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.load(open(os.path.join(killed, "summary.json")))
    assert summary["resumed"] and summary["sgd_steps_done"] == 40 and not os.path.exists(checkpoint)


def test_apply_refuses_to_overwrite_a_run_and_resume_needs_a_checkpoint(tmp_path, cache_dir, capsys):
    out = str(tmp_path / "run")
    argv = ["--policy", "hand-tuned", "--steps", "2", "--out", out, "--data-root", cache_dir, *TINY[2:]]
    assert apply_policy.main(argv) == 0
    assert apply_policy.main(argv) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert apply_policy.main(["--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "checkpoint.pt" in capsys.readouterr().err


def test_torchrun_two_ranks_on_gloo_match_one_process(tmp_path, cache_dir):
    """DDP over 2 CPU processes with the same global batch (8): every rank takes the same
    actions (the driver stops the run if they ever differ), and the losses follow the
    single-process run's. Both use one thread per process: the thread count alone changes
    the float rounding, which these 6 decisions amplify to about 1 % of the guidance term."""
    import subprocess
    import sys

    from agents.config import load_config, make_env
    from agents.loading import env_metadata, save_policy
    from agents.reinforce import ReinforceTrainer

    config = load_config(None)
    config["env"]["kwargs"].update({"data_root": cache_dir, "episode_steps": 6, "source_size": 160, "batch_size": 8,
                                    "image_size": 32, "target_eval_size": 60, "synthetic_eval_size": 40,
                                    "imagenet_photos": 4})
    env = make_env(config)
    policy = str(tmp_path / "policy.pt")  # an untrained LSTM: its argmax depends on every observation
    save_policy(ReinforceTrainer(env, seed=4).policy_state(env_metadata(env)), policy)

    args = ["--policy", policy, "--eval-every", "3", "--data-root", cache_dir]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    subprocess.run([sys.executable, os.path.join(REPO, "apply_policy.py"), *args, "--out", one],
                   check=True, env=_subprocess_env(1), capture_output=True)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.join(REPO, "apply_policy.py"), *args, "--out", two],
                         env=_subprocess_env(1), capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single, double = _rows(os.path.join(one, "steps.csv")), _rows(os.path.join(two, "steps.csv"))
    assert len(single) == len(double) == 7
    for a, b in zip(single, double):
        assert {k: v for k, v in a.items() if k.startswith("action/")} == {k: v for k, v in b.items() if k.startswith("action/")}
        for key in ("loss", "loss_xe", "loss_guidance"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4, abs=1e-6), key
        if a["target_acc"]:
            assert float(b["target_mean_class_acc"]) == pytest.approx(float(a["target_mean_class_acc"]), abs=0.02)
    summary = json.load(open(os.path.join(two, "summary.json")))
    assert summary["world_size"] == 2


@pytest.mark.parametrize("agent, vector", [("reinforce", "batched"), ("reinforce", "processes"),
                                           ("recurrent-ppo", "batched"), ("recurrent-ppo", "auto")])
def test_two_envs_run_episodes_at_once(tmp_path, cache_dir, agent, vector, capsys):
    out = str(tmp_path / agent)
    argv = ["--agent", agent, "--episodes", "4", "--num-envs", "2", "--vector", vector, "--out", out,
            "--data-root", cache_dir, "--seed", "2", *TINY]
    if agent == "recurrent-ppo":
        argv += ["--set", "agent.recurrent-ppo.n_steps=3", "--set", "agent.recurrent-ppo.batch_size=6"]
    assert train_policy.main(argv) == 0
    said = capsys.readouterr().out
    native = vector != "processes"  # auto batches wherever it can
    assert ("(the native vector env)" in said) == native and ("envs in 2 processes" in said) == (not native)
    episodes = _rows(os.path.join(out, "episodes.csv"))
    assert [r["episode"] for r in episodes] == ["0", "1", "2", "3"] and all(r["length"] == "3" for r in episodes)
    if agent == "reinforce":  # each batch of two ran two different episodes
        assert [int(r["seed"]) for r in episodes] == [episode_seed(2, i) for i in range(4)]
        assert len({r["final_loss"] for r in episodes}) == 4
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["episodes_done"] == 4


def test_batched_envs_refuse_what_cannot_be_batched_in_one_line(tmp_path, cache_dir, capsys):
    argv = ["--agent", "reinforce", "--episodes", "2", "--num-envs", "2", "--vector", "batched", "--out", str(tmp_path / "r"),
            "--data-root", cache_dir, *TINY, "--set", "env.kwargs.bn_stats=train"]
    assert train_policy.main(argv) == 2
    assert 'bn_stats="frozen"' in capsys.readouterr().err


def test_sb3_training_resumes_from_its_checkpoint(tmp_path, cache_dir):
    out = str(tmp_path / "rppo")
    ppo = ["--set", "agent.recurrent-ppo.n_steps=3", "--set", "agent.recurrent-ppo.batch_size=3"]
    assert train_policy.main(["--agent", "recurrent-ppo", "--episodes", "1", "--out", out, "--data-root", cache_dir,
                              *TINY, *ppo]) == 0
    first = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert first["episodes_done"] == 1 and first["num_timesteps"] == 3
    assert train_policy.main(["--out", out, "--resume", "--episodes", "3", "--data-root", cache_dir]) == 0
    last = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert last["episodes_done"] == 3 and last["num_timesteps"] == 9  # counted on from the checkpoint, not from 0
    assert [r["episode"] for r in _rows(os.path.join(out, "episodes.csv"))] == ["0", "1", "2"]
    moved = [not torch.equal(a, last["policy"]["state_dict"][k]) for k, a in first["policy"]["state_dict"].items()]
    assert any(moved)  # the resumed run went on learning from the saved weights


def _tiny_instances(tmp_path, cache_dir) -> str:
    """An instance file at the tiny size: three train instances and two test ones."""
    import yaml

    from asg_env.envs.instances import FILE_FORMAT

    base = {"episode_steps": 2, "batch_size": 8, "target_eval_size": 24, "synthetic_eval_size": 16,
            "imagenet_photos": 2, "image_size": 32, "reward_batch": "heldout", "data_root": cache_dir}
    train = [{"lr_base": 0.01, "source_size": 16, "epochs": 1, "render_seed": 1},
             {"lr_base": 0.02, "source_size": 16, "epochs": 2, "render_seed": 2},
             {"lr_base": 0.005, "backbone": "efficientnet_lite1", "source_size": 24, "epochs": 1, "render_seed": 3}]
    test = [{"lr_base": 0.04, "source_size": 16, "epochs": 1, "render_seed": 1001},
            {"lr_base": 0.01, "backbone": "efficientnet_lite2", "source_size": 16, "epochs": 1, "render_seed": 1002}]
    path = tmp_path / "tiny_instances.yaml"
    path.write_text(yaml.safe_dump({"format": FILE_FORMAT, "family": "syndigits", "seed": 0, "env": "SynDigits-v0",
                                    "base": base, "train": train, "test": test}))
    return str(path)


def test_train_on_an_instance_split_draws_a_seeded_instance_per_episode(tmp_path, cache_dir, capsys):
    import gymnasium as gym

    from asg_env.envs.instances import load_instances

    instances = _tiny_instances(tmp_path, cache_dir)
    out = str(tmp_path / "run")
    assert train_policy.main(["--instances", instances, "--episodes", "4", "--seed", "3", "--out", out]) == 0
    rows = _rows(os.path.join(out, "episodes.csv"))
    split = load_instances(instances, "train")
    env = gym.make("SynDigits-v0", **split.base, instances=split.instances)
    drawn = [env.reset(seed=episode_seed(3, i))[1]["instance"] for i in range(4)]
    assert [int(r["instance"]) for r in rows] == drawn
    steps = {0: 2, 1: 4, 2: 3}  # epochs × source_size // batch_size of each train instance
    assert [int(r["sgd_steps"]) for r in rows] == [steps[i] for i in drawn]
    policy = torch.load(os.path.join(out, "policy.pt"), weights_only=True)
    assert policy["instances"] == {"file": instances, "family": "syndigits", "split": "train", "count": 3,
                                   "digest": split.digest}
    assert "instances" not in policy["env_kwargs"]  # apply_policy runs the env's own configuration
    # the policy applies to a test instance's settings through --set
    capsys.readouterr()
    assert apply_policy.main(["--policy", os.path.join(out, "policy.pt"), "--out", str(tmp_path / "apply"),
                              "--set", "env.kwargs.backbone=efficientnet_lite2", "--set", "env.kwargs.lr_base=0.04",
                              "--set", "env.kwargs.source_size=16", "--set", "env.kwargs.epochs=1"]) == 0

    sb3 = str(tmp_path / "sb3")  # the SB3 agents draw instances too, and their episodes log them
    assert train_policy.main(["--instances", instances, "--agent", "recurrent-ppo", "--episodes", "3", "--out", sb3,
                              "--set", "agent.recurrent-ppo.n_steps=2", "--set", "agent.recurrent-ppo.batch_size=2"]) == 0
    logged = _rows(os.path.join(sb3, "episodes.csv"))
    assert len(logged) == 3 and all(int(r["sgd_steps"]) == steps[int(r["instance"])] for r in logged)

    assert train_policy.main(["--instances", instances, "--env", "SynDigitScenes-v0", "--out", str(tmp_path / "x")]) == 2
    assert "holds instances of SynDigits-v0, not of SynDigitScenes-v0" in capsys.readouterr().err
    assert train_policy.main(["--instances", instances, "--out", out, "--resume"]) == 2
    assert "drop --instances" in capsys.readouterr().err
    assert train_policy.main(["--instances", instances, "--split", "validation", "--out", str(tmp_path / "y")]) == 2
    assert "unknown split 'validation'" in capsys.readouterr().err


def test_coordinate_wise_policy_trained_on_lite0_drives_resnet50(tmp_path, cache_dir, capsys):
    out = str(tmp_path / "cw")
    per_coordinate = ["--set", "env.kwargs.observation=per_coordinate", "--set", "agent.reinforce.network=coordinate-wise"]
    assert train_policy.main(["--agent", "reinforce", "--episodes", "2", "--out", out, "--data-root", cache_dir, *TINY, *per_coordinate]) == 0
    policy = os.path.join(out, "policy.pt")
    state = torch.load(policy, weights_only=True)
    assert state["config"]["network"] == "coordinate-wise" and len(state["coordinate_names"]) == 9
    resnet = ["--set", "env.kwargs.backbone=resnet50", "--set", "env.kwargs.weights=null"]  # no ImageNet weights offline
    capsys.readouterr()
    assert apply_policy.main(["--policy", policy, "--out", str(tmp_path / "r50"), "--data-root", cache_dir, *resnet]) == 0
    said = capsys.readouterr().out
    assert "coordinate-wise policy trained on 9 coordinates of efficientnet_lite0, applied to the 7 of resnet50" in said
    steps = _rows(os.path.join(tmp_path, "r50", "steps.csv"))
    assert len(steps) == 4 and {k for k in steps[0] if k.startswith("action/")} == {
        f"action/{n}" for n in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "new_head")}
    paper = str(tmp_path / "paper")
    assert train_policy.main(["--agent", "reinforce", "--episodes", "1", "--out", paper, "--data-root", cache_dir, *TINY]) == 0
    assert apply_policy.main(["--policy", os.path.join(paper, "policy.pt"), "--out", str(tmp_path / "refused"),
                              "--data-root", cache_dir, *resnet]) == 2
    assert "trained for 9 coordinates of efficientnet_lite0" in capsys.readouterr().err


def test_sb3_agents_train_behind_vecnormalize_and_log_raw_returns(tmp_path, cache_dir):
    ppo = ["--agent", "ppo", "--set", "agent.ppo.n_steps=3", "--set", "agent.ppo.batch_size=3", "--data-root", cache_dir, *TINY]
    runs = {}
    for normalize in ("true", "false"):
        out = str(tmp_path / normalize)
        assert train_policy.main(["--episodes", "2", "--out", out, *ppo, "--set", f"agent.ppo.normalize={normalize}"]) == 0
        runs[normalize] = (torch.load(os.path.join(out, "policy.pt"), weights_only=True),
                           _rows(os.path.join(out, "episodes.csv")))
    state, episodes = runs["true"]
    assert state["vec_normalize"]["obs_rms"]["count"] >= 6 and "vec_normalize" not in runs["false"][0]
    for a, b in zip(episodes, runs["false"][1]):  # the env's loss decreases (~1e-2), not VecNormalize's rewards (~1)
        assert float(a["return"]) == pytest.approx(float(b["return"]), abs=0.05)
    out = str(tmp_path / "true")
    assert train_policy.main(["--out", out, "--resume", "--episodes", "3", "--data-root", cache_dir]) == 0
    resumed = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["policy"]["vec_normalize"]
    assert resumed["obs_rms"]["count"] > state["vec_normalize"]["obs_rms"]["count"]  # went on from the saved statistics


def test_es_trains_over_two_workers_resumes_and_applies(tmp_path, cache_dir, capsys):
    out = str(tmp_path / "es")
    es = ["--agent", "es", "--set", "agent.es.pairs=1", "--set", "agent.es.workers=2"]
    assert train_policy.main(["--episodes", "2", "--out", out, "--data-root", cache_dir, *TINY, *es]) == 0
    assert train_policy.main(["--out", out, "--resume", "--episodes", "4", "--data-root", cache_dir]) == 0
    episodes = _rows(os.path.join(out, "episodes.csv"))
    assert [r["episode"] for r in episodes] == ["0", "1", "2", "3"]
    assert episodes[0]["seed"] == episodes[1]["seed"] != episodes[2]["seed"]  # a pair shares its run
    for r in episodes:
        assert float(r["return"]) == -float(r["score"]) and r["target_acc"] == ""
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["generations"] == 2 and ckpt["policy"]["agent"] == "es"
    applied = str(tmp_path / "applied")
    assert apply_policy.main(["--policy", os.path.join(out, "policy.pt"), "--out", applied, "--data-root", cache_dir]) == 0
    assert json.load(open(os.path.join(applied, "summary.json")))["decisions_made"] == 3


def test_no_arguments_run_the_main_setting_and_any_choice_the_plain_defaults():
    args = train_policy.parse_args([])
    assert (args.config, args.instances) == (train_policy.MAIN_CONFIG, train_policy.MAIN_INSTANCES)
    assert train_policy.parse_args(["--episodes", "5"]).config == train_policy.MAIN_CONFIG
    for argv in (["--agent", "reinforce"], ["--env", "SynDigits-v0"], ["--config", "configs/reinforce_syndigits.yaml"]):
        args = train_policy.parse_args(argv)
        assert args.instances is None and args.config != train_policy.MAIN_CONFIG


def test_main_setting_is_the_learning_gates(tmp_path):
    from agents.config import load_config
    from asg_env.envs.instances import load_instances
    from benchmarks import learning_gate as gate

    written = load_instances(gate.meta_instances("configs/instances/syndigits.yaml", str(tmp_path)), "train")
    shipped = load_instances(train_policy.MAIN_INSTANCES, "train")
    assert shipped.instances == written.instances and shipped.base == written.base
    main = load_config(train_policy.MAIN_CONFIG)
    assert main["agent"]["name"] == "es" and main["train"]["check"] > 0
    assert {k: main["agent"]["es"][k] for k in gate.AGENTS["es"]} == gate.AGENTS["es"]


def test_main_command_trains_es_on_the_family_and_ends_with_the_held_out_check(tmp_path, cache_dir, capsys):
    out = str(tmp_path / "main")
    small = ["--set", "agent.es.pairs=1", "--set", "agent.es.workers=1", "--set", "train.check=2",
             "--set", "env.kwargs.synthetic_eval_size=40", "--set", "env.kwargs.imagenet_photos=4"]
    assert train_policy.main(["--episodes", "2", "--out", out, "--data-root", cache_dir, *small]) == 0
    said = capsys.readouterr().out
    policy = torch.load(os.path.join(out, "policy.pt"), weights_only=True)
    assert policy["agent"] == "es" and policy["instances"]["family"] == "syndigits"
    assert {int(r["instance"]) for r in _rows(os.path.join(out, "episodes.csv"))} <= set(range(12))
    check = open(os.path.join(out, "check.txt")).read().splitlines()
    assert check[0].startswith("held-out check: 2 runs per policy") and check[0] in said
    rows = {line.split()[0]: line.split() for line in check[2:5]}
    assert set(rows) == {"trained", "init", "random"} and all(0 < float(r[1]) < 10 for r in rows.values())


def test_check_table_says_when_the_policy_is_within_noise():
    from agents.check import check_table

    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.01, 8)
    clear = check_table({"trained": 2.0 + noise, "init": 2.2 + noise, "random": 2.3 + noise})
    assert clear[-1].startswith("the policy beats random and its own initialisation")
    close = check_table({"trained": 2.0 + noise, "init": 2.0 + rng.normal(0, 0.01, 8), "random": 2.3 + noise})
    assert close[-1].startswith("not yet distinguishable") and "--episodes" in close[-1]
    assert "init" in close[3] and "[" in close[3]


def test_the_pretrained_policy_applies_out_of_the_box(tmp_path, cache_dir, capsys):
    from agents.loading import PRETRAINED, pretrained_names, resolve_policy

    assert PRETRAINED in pretrained_names()
    card = json.load(open(os.path.join(os.path.dirname(resolve_policy("pretrained")), "card.json")))
    assert card["gate"]["passed"] and card["gate"]["ci_high"] < 0  # never a policy that failed the gate
    out = str(tmp_path / "pre")
    assert apply_policy.main(["--policy", "pretrained", "--out", out, "--data-root", cache_dir,
                              *TINY[2:]]) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["policy"] == resolve_policy("pretrained") and len(_rows(os.path.join(out, "steps.csv"))) == 1 + 8
    with pytest.raises(SystemExit):
        apply_policy.main(["--help"])
    assert PRETRAINED in capsys.readouterr().out


@pytest.mark.slow
def test_console_entry_points_work_after_a_plain_install(tmp_path):
    import subprocess
    import sys

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), REPO], check=True, capture_output=True)
    env = {**_subprocess_env(1), "PYTHONPATH": str(target)}  # the installed copy, not the checkout
    for script in ("asg-train", "asg-apply", "asg-adapt", "asg-instances"):
        proc = subprocess.run([str(target / "bin" / script), "--help"], cwd=tmp_path, env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {script}"), (script, proc.stderr)
