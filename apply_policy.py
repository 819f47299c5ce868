"""Drive a full fine-tuning run with a frozen learning-rate policy and evaluate it on the real target.

Examples:
  python apply_policy.py --policy pretrained                        # the shipped policy (results/policies/)
  python apply_policy.py --policy runs/r1/policy.pt                 # the policy's own run length
  python apply_policy.py --policy runs/r1/policy.pt --steps 1000    # same decisions, longer windows
  python apply_policy.py --policy hand-tuned --epochs 2 --eval-every 25
  python apply_policy.py --policy constant:1,1,1,1,1,1,1,1,10 --steps 300
  python apply_policy.py --policy cosine:1.0,0.1,0.7 --epochs 2
  python apply_policy.py --policy runs/r1/policy.pt --env VisDA-v0 --data-root /data/visda17 --amp

--policy takes a policy.pt written by train_policy.py, or a baseline: random,
hand-tuned (the official train.py: backbone 0.1, classifier 1.0, with its warm-up and
poly decay), small-backbone-large-classifier (the same levels, constant), large-everywhere,
classifier-only, constant:L1,…,LC (levels 0-10 per coordinate), llrd:HEAD,DECAY (layer-wise
decay: the classifier at HEAD, each coordinate below at DECAY times the one above) or
cosine:PEAK,WARMUP,DECAY (that decay from PEAK, under a warm-up over the first WARMUP fraction
of the run and a cosine decay to 0). A learned policy acts greedily (argmax) unless --sample is given.

A learned policy runs in the env configuration it was trained in (recorded in policy.pt):
η_base, λ, the reward batch, image size, SGD form, windows… Anything you set explicitly
(--config, --set, --data-root, --amp…) overrides it, and the tool prints each override.
Another env id (--env, or a --config naming another env.id) is another task: the run then
starts from that id's registered settings plus yours, none of the policy's (its run length
and decisions too: set them with --steps or --epochs and --set env.kwargs.episode_steps=T), and
the policy must fit its coordinates (a policy for other coordinate names is refused).
A coordinate-wise policy (train_policy.py --set agent.reinforce.network=coordinate-wise) runs
on any backbone, e.g. --set env.kwargs.backbone=resnet50, and the tool says when it does so.

The run length: a policy trained with fixed windows (episode_steps = T) keeps its T
decisions, and --steps or --epochs hold each decision for proportionally more SGD steps, so
t/T and the observation mean what they meant in training. A policy trained with one decision
per SGD step (episode_steps null) or with growing windows keeps its windows instead, so T
follows the new length. The tool prints which applies. --decision-every-step asks for one
decision per SGD step. A baseline decides at every SGD step.

The run folder gets curve.csv and steps.csv, written as the run goes (every evaluation,
and every decision's action, reward and losses), checkpoint.pt (see below), and at the end
curve.png (target accuracy, mean per-class accuracy, retention), summary.json (the env
configuration used, the overrides, decisions, SGD steps and world size) and
model.safetensors (the fine-tuned student).

Runs survive a kill: checkpoint.pt (student, optimizer, policy state, data position, RNGs)
is written after the decision that ends each epoch (--checkpoint-every) and at least every
--checkpoint-minutes; `apply_policy.py --out RUN --resume` continues from it, loses at most
one interval, and ends with the result the uninterrupted run would have had.

Several GPUs: `torchrun --nproc_per_node N apply_policy.py …` fine-tunes with
DistributedDataParallel; each global batch is split over the ranks, every rank takes the
same decision from the rank-averaged losses, and rank 0 writes the files.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import torch

from agents.config import DEFAULTS, apply_overrides, make_env, read_config_file, run_cli
from agents.loading import (
    PRETRAINED,
    load_policy,
    pretrained_names,
    read_file,
    read_policy_file,
    resolve_policy,
    save_policy,
    transfer_note,
)
from agents.policies import baseline_env_kwargs, is_baseline
from agents.rollout import EVAL_KEYS, Checkpoints, fine_tune
from asg_env import UserInputError
from asg_env.envs.settings import recorded_settings
from asg_env.provenance import stamp
from asg_env.training.trainer import init_distributed

# Not reported as overrides: evaluation never changes the trajectory, and the run length is
# printed as "T decisions over N SGD steps".
NOT_OVERRIDES = ("evaluate_target", "eval_every", "target_eval_size", "device",
                 "episode_steps", "sgd_steps_per_action", "sgd_steps", "epochs")


def eval_every_arg(value: str) -> int | str:
    if value == "epoch":
        return value
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of decisions or 'epoch', got {value!r}")
    if count < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {count}")
    return count


def positive(kind):
    def parse(value: str):
        number = kind(value)
        if not number > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {value}")
        return number
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shipped = ", ".join(pretrained_names()) or "none in this installation"
    p.add_argument("--policy", default="hand-tuned",
                   help="policy.pt file, baseline name, or a shipped policy's name: pretrained (= "
                        f"{PRETRAINED}) or one of results/policies/ ({shipped}); default: hand-tuned")
    p.add_argument("--env", help="env id (default: the policy's env, else SynDigits-v0); another id than the policy's "
                   "starts from that id's own settings")
    p.add_argument("--config", help="YAML config whose env section overrides the policy's settings")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive(int), help="SGD steps of the run (default: the policy's own run length)")
    length.add_argument("--epochs", type=positive(float), help="length in passes over the synthetic training set")
    p.add_argument("--decision-every-step", action="store_true",
                   help="one decision per SGD step instead of the policy's T decisions over the run")
    p.add_argument("--eval-every", type=eval_every_arg, default="epoch",
                   help="evaluate on the real target every N decisions, or 'epoch' (default); always at the start and end")
    p.add_argument("--tta-flip", action="store_true", help="average each target image's scores with its mirror image's")
    p.add_argument("--seed", type=int, default=0, help="fine-tuning seed (θ_n init, data order) and the policy's sampling seed")
    p.add_argument("--sample", action="store_true", help="sample actions instead of taking the argmax")
    p.add_argument("--device", help="default: cuda if available")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--no-channels-last", action="store_true", help="keep NCHW memory format")
    p.add_argument("--data-root", help="dataset root (VisDA-17) or SynDigits cache folder")
    p.add_argument("--out", help="run folder (default: runs/apply-<policy>-<time>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an env setting, e.g. --set env.kwargs.lam=0.05")
    p.add_argument("--checkpoint-every", type=eval_every_arg, default="epoch",
                   help="save checkpoint.pt every N decisions, or 'epoch' (default)")
    p.add_argument("--checkpoint-minutes", type=positive(float), default=10.0,
                   help="also save whenever this many minutes have passed since the last save (default 10)")
    p.add_argument("--resume", action="store_true",
                   help="continue the killed run in --out from its checkpoint.pt (its settings are used)")
    return p.parse_args(argv)


def resolve_env(args: argparse.Namespace) -> tuple[dict, dict, str | None, int | None]:
    """The env config to run: the policy's recorded one (or the defaults, for a baseline; or
    the registered defaults of another env id), then the user's explicit settings on top.
    Returns the config, the overrides of the policy's trajectory-relevant settings, as
    {key: (policy's value, new value)}, the policy's env id where the run uses another, and the
    number of decisions the policy was trained with (None for a baseline or an older file)."""
    state = None if is_baseline(args.policy) else read_policy_file(args.policy)
    recorded = recorded_settings(state.get("env_kwargs") or {}) if state else {}
    trained_id = (state or {}).get("env_id")
    env_id = trained_id or DEFAULTS["env"]["id"]
    explicit: dict = {}
    if args.config:
        section = read_config_file(args.config).get("env", {})
        env_id = section.get("id", env_id)
        explicit.update(section.get("kwargs", {}))
    env_id = args.env or env_id
    user = apply_overrides({"env": {"id": env_id, "kwargs": {}}}, args.set)["env"]
    env_id = user["id"]
    moved_from = trained_id if state is not None and trained_id and env_id != trained_id else None
    if moved_from:  # another task: its registered settings and the user's, none of the policy's
        recorded = {}
    explicit.update(user["kwargs"])
    explicit.update(baseline_env_kwargs(args.policy))
    if args.data_root:
        explicit["data_root"] = args.data_root
    if args.amp:
        explicit["amp"] = True
    if args.no_channels_last:
        explicit["channels_last"] = False
    if args.tta_flip:
        explicit["tta_flip"] = True
    if args.steps or args.epochs:
        explicit.update(sgd_steps=args.steps, epochs=args.epochs)
        if state is None:
            explicit["episode_steps"] = None  # a baseline decides at every SGD step
    if args.decision_every_step:
        explicit.update(episode_steps=None, sgd_steps_per_action=1)
        if not (args.steps or args.epochs or recorded.get("sgd_steps") or recorded.get("epochs")):
            explicit["sgd_steps"] = recorded.get("episode_steps", 100) * recorded.get("sgd_steps_per_action", 1)
    kwargs = {**recorded, **explicit, "evaluate_target": True, "eval_every": args.eval_every,
              "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu")}
    changed = {k: (recorded[k], v) for k, v in explicit.items()
               if k in recorded and recorded[k] != v and k not in NOT_OVERRIDES}
    return {"id": env_id, "kwargs": kwargs}, changed, moved_from, (state or {}).get("decisions")


def run_length_note(trainer, learned: bool, trained_decisions: int | None, every_step: bool) -> str:
    """How a learned policy's T relates to this run (see the module docstring)."""
    if not learned:
        return ""
    if every_step:
        return "; one decision per SGD step (--decision-every-step)"
    trained = "" if trained_decisions in (None, trainer.T) else f" (the policy was trained with T = {trained_decisions})"
    if trainer.config["window"] == "growing":
        return f"; growing windows, which the policy keeps: T follows the run length{trained}"
    if trainer.config["episode_steps"] is None:
        return f"; one decision per SGD step, which the policy keeps: T follows the run length{trained}"
    if not trained:
        return "; the policy's T, each decision held for the run's share of SGD steps"
    return f"; T set here, the policy was trained with T = {trained_decisions}"


def plot_curve(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["sgd_step"] for r in rows]
    labels = {"target_acc": "real target accuracy", "target_mean_class_acc": "real target mean per-class accuracy",
              "target_miou": "real target mIoU", "synthetic_miou": "synthetic held-out mIoU",
              "synthetic_acc": "synthetic held-out accuracy", "imagenet_top1": "ImageNet top-1 of θ_o (photos)",
              "teacher_agreement": "agreement with the teacher on the target"}
    for key, label in labels.items():
        if key in rows[0]:
            ax.plot(steps, [r[key] for r in rows], marker="o", ms=3, label=label)
    ax.set(xlabel="SGD step", ylabel="fraction", ylim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class CsvLog:
    """A CSV file written row by row and flushed, so a killed run keeps every row so far."""

    def __init__(self, path: str, fields: list[str], rows: list[dict] = ()):
        self.fh = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.fh, fieldnames=fields, restval="", extrasaction="ignore")
        self.writer.writeheader()
        for row in rows:
            self.write(row)

    def write(self, row: dict) -> None:
        self.writer.writerow(row)
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def start(args: argparse.Namespace, out: str, world_size: int) -> tuple[dict, dict, dict | None]:
    """The run's settings: new ones from the arguments, or the killed run's with --resume
    (plus this invocation's device, data root and rank count)."""
    path = os.path.join(out, "checkpoint.pt")
    if not args.resume:
        if os.path.exists(path) or os.path.exists(os.path.join(out, "summary.json")):
            raise UserInputError(f"{out} already holds a run; choose another --out (or --resume an unfinished one)")
        env_config, changed, moved_from, decisions = resolve_env(args)
        return {"policy": args.policy, "seed": args.seed, "sample": args.sample, "env": env_config,
                "trained_env": moved_from, "trained_decisions": decisions,
                "decision_every_step": args.decision_every_step,
                "overrides": {k: list(v) for k, v in changed.items()}}, changed, None
    state = read_file(path, "checkpoint", " (--resume needs --out pointing at an unfinished run)")
    run_args = state["run"]
    if run_args["world_size"] != world_size:
        raise UserInputError(f"{out} was run on {run_args['world_size']} process(es); resume it on as many, not {world_size}")
    kwargs = run_args["env"]["kwargs"]
    kwargs["device"] = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.data_root:
        kwargs["data_root"] = args.data_root
    return run_args, {k: tuple(v) for k, v in run_args["overrides"].items()}, state


def run(args: argparse.Namespace) -> int:
    rank, world_size, rank_device = init_distributed()
    if rank_device is not None:
        args.device = rank_device
    if args.resume and not args.out:
        raise UserInputError("--resume needs --out, the folder of the run to continue")
    shipped = args.policy
    args.policy = resolve_policy(args.policy)
    if is_baseline(args.policy):
        name = args.policy.replace(":", "_").replace(",", "-")
    else:
        name = shipped if args.policy != shipped else os.path.splitext(os.path.basename(args.policy))[0]
    out = args.out or os.path.join("runs", f"apply-{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_args, changed, resume = start(args, out, world_size)
    run_args["world_size"] = world_size
    lead = rank == 0
    if lead:
        if run_args.get("trained_env"):
            print(f"env: {run_args['env']['id']}, not the policy's {run_args['trained_env']}: the run takes "
                  f"{run_args['env']['id']}'s registered settings and yours, none of the policy's")
        for key, (old, new) in changed.items():
            print(f"override: {key} = {new!r} (the policy was trained with {old!r})")
    env = make_env({"env": run_args["env"]})
    u = env.unwrapped
    trainer = u.trainer
    policy = load_policy(run_args["policy"], env, deterministic=not run_args["sample"], seed=run_args["seed"])
    note = transfer_note(run_args["policy"], env)
    if lead and note:
        print(note)

    names = [f"action/{n}" for n in u.coordinate_names]
    history = list(resume["history"]) if resume else []
    logs = None
    if lead:
        os.makedirs(out, exist_ok=True)
        curve_fields = ["step", "sgd_step", *EVAL_KEYS, *trainer.class_iou_keys]
        logs = (CsvLog(os.path.join(out, "steps.csv"), ["step", "sgd_step", "reward", "loss", "loss_xe", "loss_guidance",
                                                          "diverged", *names, *EVAL_KEYS], history),
                CsvLog(os.path.join(out, "curve.csv"), curve_fields, [r for r in history if "target_kl" in r]))
        print(f"{trainer.T} decisions over {trainer.total_sgd_steps} SGD steps "
              f"({trainer.total_sgd_steps / trainer.steps_per_epoch:.2f} epochs) on {world_size} process(es)"
              + run_length_note(trainer, not is_baseline(run_args["policy"]), run_args.get("trained_decisions"),
                                run_args.get("decision_every_step", False))
              + (f"; resuming after decision {resume['trainer']['t']}" if resume else ""))

    def on_row(row: dict) -> None:
        if logs:
            logs[0].write(row)
            if "target_kl" in row:
                logs[1].write(row)

    def save(state: dict) -> None:
        if lead:
            save_policy({**state, "run": run_args}, os.path.join(out, "checkpoint.pt"))

    checkpoints = Checkpoints(save, args.checkpoint_every, args.checkpoint_minutes)
    started = time.perf_counter()
    try:
        history = fine_tune(trainer, policy, run_args["seed"], progress=lead, desc=f"fine-tuning with {run_args['policy']}",
                            on_row=on_row, checkpoints=checkpoints, resume=resume, control=u.control)
    except KeyboardInterrupt:
        print(f"\ninterrupted; steps.csv and curve.csv hold every decision so far. Continue from the last checkpoint with:\n"
              f"  python apply_policy.py --out {out} --resume", file=sys.stderr)
        return 130
    finally:
        if logs:
            for log in logs:
                log.close()
    seconds = time.perf_counter() - started
    if not lead:
        return 0

    keys = ("step", "sgd_step", *EVAL_KEYS, *trainer.class_iou_keys)
    curve = [{k: r[k] for k in keys if k in r} for r in history if "target_kl" in r]
    plot_curve(curve, os.path.join(out, "curve.png"), f"{run_args['env']['id']}: {run_args['policy']}")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in trainer.student.state_dict().items()}, os.path.join(out, "model.safetensors"))
    headline = trainer.headline
    final, best = curve[-1], max(curve, key=lambda r: r[headline])
    summary = {"policy": run_args["policy"], "env": run_args["env"]["id"], "seed": run_args["seed"],
               "decisions": trainer.T, "decisions_made": trainer.t, "sgd_steps": trainer.total_sgd_steps,
               "sgd_steps_done": trainer.sgd_step, "diverged": bool(history[-1].get("diverged")),
               "world_size": world_size, "resumed": resume is not None, "seconds": round(seconds, 1),
               "final": final, f"best_{headline}_oracle": best, "env_kwargs": u.config,
               "trained_env": run_args.get("trained_env"),
               "overrides": {k: {"trained": old, "applied": new} for k, (old, new) in changed.items()}}
    summary.update(stamp({"policy": summary["policy"], "env_kwargs": u.config, "seed": summary["seed"]}))
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    if os.path.exists(os.path.join(out, "checkpoint.pt")):
        os.remove(os.path.join(out, "checkpoint.pt"))  # the run is complete: model.safetensors holds it
    scores = (f"mIoU {final['target_miou']:.3f}, pixel accuracy {final['target_pixel_acc']:.3f}"
              if headline == "target_miou" else
              f"accuracy {final['target_acc']:.3f}, mean per-class {final['target_mean_class_acc']:.3f}")
    print(f"{trainer.sgd_step} SGD steps in {seconds / 60:.1f} min on {trainer.device}; final target {scores} "
          f"(oracle best {best[headline]:.3f} at SGD step {best['sgd_step']}), "
          f"KL(teacher ‖ θ_o) on the target {final['target_kl']:.3f}"
          + (f", ImageNet top-1 of θ_o {final['imagenet_top1']:.2f} (teacher {final['imagenet_teacher_top1']:.2f})"
             if "imagenet_top1" in final else ""))
    print(f"results in {out}/: curve.csv, curve.png, steps.csv, summary.json, model.safetensors")
    return 0


def main(argv=None) -> int:
    return run_cli(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
