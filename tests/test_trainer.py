import os

import gymnasium as gym
import pytest
import torch
from torch.utils.data import Dataset

from agents.policies import RandomPolicy
from agents.rollout import Checkpoints, fine_tune
from asg_env import UserInputError
from asg_env.tasks.registry import EpochOrder, LoaderSource
from asg_env.training.trainer import Trainer


def _env(kwargs, **kw):
    return gym.make("SynDigits-v0", evaluate_target=False, **{**kwargs, **kw}).unwrapped


def _env_trajectory(env, policy, seed):
    """The same run, driven through the Gymnasium API."""
    obs, info = env.reset(seed=seed)
    policy.reset()
    rows, done = [(info["loss"], info["loss_xe"], info["loss_guidance"])], False
    while not done:
        action = policy.act(obs)
        obs, reward, done, _, info = env.step(action)
        rows.append((info["loss"], info["loss_xe"], info["loss_guidance"], reward, *action))
    return rows


def _driver_rows(history, names):
    rows = [(history[0]["loss"], history[0]["loss_xe"], history[0]["loss_guidance"])]
    for r in history[1:]:
        rows.append((r["loss"], r["loss_xe"], r["loss_guidance"], r["reward"], *(r[f"action/{n}"] for n in names)))
    return rows


@pytest.mark.parametrize("reward_batch", ["train", "heldout"])
def test_driving_the_trainer_is_bit_identical_to_the_env(tiny_env_kwargs, reward_batch):
    kw = dict(sgd_steps_per_action=2, reward_batch=reward_batch, eval_every=2)
    env_run, direct_run = _env(tiny_env_kwargs, **kw), _env(tiny_env_kwargs, **kw)
    by_env = _env_trajectory(env_run, RandomPolicy(len(env_run.coordinate_names), seed=3), seed=11)
    history = fine_tune(direct_run.trainer, RandomPolicy(len(env_run.coordinate_names), seed=3), 11, evaluate=True)
    assert _driver_rows(history, env_run.coordinate_names) == by_env  # exact float equality, row by row
    assert "target_acc" in history[2] and "target_acc" in history[4]  # evaluation changed nothing
    for (k, a), b in zip(env_run.trainer.student.state_dict().items(), direct_run.trainer.student.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("bn_stats, reward_batch", [("frozen", "train"), ("train", "heldout")])
def test_a_run_resumed_from_a_checkpoint_ends_as_the_uninterrupted_run(tiny_env_kwargs, bn_stats, reward_batch):
    """Checkpoints between decisions, across an epoch boundary (20 SGD steps per epoch here).
    With BatchNorm in train mode the running statistics (buffers) must count every batch once."""
    kw = dict(episode_steps=12, sgd_steps_per_action=2, bn_stats=bn_stats, reward_batch=reward_batch)
    saved = []
    full = _env(tiny_env_kwargs, **kw)
    names = full.coordinate_names
    history = fine_tune(full.trainer, RandomPolicy(len(names), seed=1), 5, evaluate=False,
                        checkpoints=Checkpoints(saved.append, every=4))
    assert [s["trainer"]["t"] for s in saved] == [4, 8]
    assert full.trainer.sgd_step == 24
    for state in saved:
        again = _env(tiny_env_kwargs, **kw)
        resumed = fine_tune(again.trainer, RandomPolicy(len(names), seed=999), 5, evaluate=False, resume=state)
        assert _driver_rows(resumed, names) == _driver_rows(history, names)
        for (k, a), b in zip(full.trainer.student.state_dict().items(), again.trainer.student.state_dict().values()):
            assert torch.equal(a, b), k
    student = {k: v for k, v in saved[0]["trainer"]["student"].items() if not k.startswith("new_head.")}
    other = {**saved[0], "trainer": {**saved[0]["trainer"], "student": student}}  # e.g. written by another version
    with pytest.raises(UserInputError, match="the checkpoint's weights do not fit this model"):
        fine_tune(_env(tiny_env_kwargs, **kw).trainer, RandomPolicy(len(names), seed=1), 5, evaluate=False, resume=other)


def _resume_under_ddp(rank: int, world: int, port: int, kwargs: dict, out: str) -> None:
    """One rank of a 2-process gloo group: a whole run, and the same run resumed from rank 0's
    checkpoint at t = 3 (as ``apply_policy.py --resume`` under torchrun reads rank 0's file)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        saved = []
        full = _env(kwargs)
        names = full.coordinate_names
        history = fine_tune(full.trainer, RandomPolicy(len(names), seed=1), 5, evaluate=False,
                            checkpoints=Checkpoints(saved.append, every=3))
        state = [saved[0]]
        dist.broadcast_object_list(state, src=0)
        again = _env(kwargs)
        resumed = fine_tune(again.trainer, RandomPolicy(len(names), seed=999), 5, evaluate=False, resume=state[0])
        torch.save({"rows": (_driver_rows(history, names), _driver_rows(resumed, names)),
                    "students": (full.trainer.student.state_dict(), again.trainer.student.state_dict())},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_a_resumed_run_under_ddp_with_batchnorm_in_train_mode_ends_as_the_uninterrupted_run(tiny_env_kwargs, tmp_path):
    """DDP broadcasts rank 0's BatchNorm buffers at every forward pass in train mode; a resume
    from rank 0's checkpoint must still count each batch once on every rank."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kwargs = {**tiny_env_kwargs, "episode_steps": 6, "sgd_steps_per_action": 2, "bn_stats": "train",
              "reward_batch": "heldout"}
    mp.spawn(_resume_under_ddp, args=(2, port, kwargs, str(tmp_path)), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        whole, resumed = result["rows"]
        assert resumed == whole, rank
        full, again = result["students"]
        assert full["features.bn1.num_batches_tracked"] == 13  # 12 SGD steps and the pending batch, once each
        for key in full:
            assert torch.equal(full[key], again[key]), (rank, key)


def test_checkpoints_come_once_per_epoch_by_default(tiny_env_kwargs):
    saved = []
    env = _env(tiny_env_kwargs, episode_steps=10, sgd_steps_per_action=3)  # 20 SGD steps per epoch
    fine_tune(env.trainer, RandomPolicy(len(env.coordinate_names), seed=0), 0, evaluate=False,
              checkpoints=Checkpoints(saved.append))
    assert [s["trainer"]["sgd_step"] for s in saved] == [21]  # the decision that crossed step 20; none at the end


class _Numbers(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.tensor([float(i)]), i, i


def test_a_loader_source_resumes_its_order_mid_epoch_and_at_an_epoch_end():
    def draws(source, n):
        return [source.next().index.tolist() for _ in range(n)]

    first = LoaderSource(_Numbers(), 3, torch.device("cpu"), num_workers=0)
    first.reset(7)
    for k in (1, 3, 4):  # 3 batches per epoch: mid-epoch, exactly at its end, into the next
        first.reset(7)
        draws(first, k)
        state = first.state_dict()
        expected = draws(first, 5)
        second = LoaderSource(_Numbers(), 3, torch.device("cpu"), num_workers=0)
        second.reset(123)
        second.load_state_dict(state)
        assert draws(second, 5) == expected, k


def test_ranks_split_each_global_batch_in_the_single_process_order():
    single = EpochOrder(40, 8)
    ranks = [EpochOrder(40, 8, shard=(r, 2)) for r in range(2)]
    for order in (single, *ranks):
        order.reset(3)
    for _ in range(7):  # across an epoch boundary
        whole, _ = single.next()
        parts = [order.next()[0] for order in ranks]
        assert torch.equal(torch.cat(parts), whole)


def test_the_compiled_step_gives_the_eager_steps_losses(tiny_env_kwargs):
    """``compile=`` runs the step's forward and backward through torch.compile (aot_eager here:
    the same kernels, traced), and the run is the eager one."""
    kwargs = {k: v for k, v in tiny_env_kwargs.items()}
    runs = []
    for backend in (None, "aot_eager"):
        trainer = Trainer(**kwargs, compile=backend)
        losses = [trainer.reset(1, 2)["loss"]]
        losses += [trainer.step([0.5] * len(trainer.coordinate_names))["loss"] for _ in range(3)]
        runs.append((losses, trainer.state_dict()["student"]))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5, abs=1e-6)
    assert all(torch.allclose(runs[0][1][k], runs[1][1][k], atol=1e-6) for k in runs[0][1])
