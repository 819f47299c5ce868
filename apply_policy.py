"""Drive a full fine-tuning run with a frozen learning-rate policy and evaluate it on the real target.

Examples:
  python apply_policy.py --policy runs/r1/policy.pt --steps 500
  python apply_policy.py --policy hand-tuned --epochs 2
  python apply_policy.py --policy constant:1,1,1,1,1,1,1,1,10 --eval-every 50
  python apply_policy.py --policy runs/r1/policy.pt --env VisDA-v0 --data-root /data/visda17 --amp

--policy takes a policy.pt written by train_policy.py, or a baseline: random,
hand-tuned (= small-backbone-large-classifier: backbone 0.1, classifier 1.0),
large-everywhere, classifier-only, or constant:L1,…,LC (levels 0-10 per coordinate).
A learned policy acts greedily (argmax) unless --sample is given.

The run folder gets curve.csv and curve.png (target accuracy and mean per-class accuracy
over training, and teacher agreement), steps.csv (every step's action, reward and losses),
summary.json, and model.safetensors (the fine-tuned student).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import torch

from agents.config import apply_overrides, load_config, make_env, merge, run_cli
from agents.loading import load_policy, read_policy_file
from agents.rollout import EVAL_KEYS, fine_tune


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default="hand-tuned", help="policy.pt file or baseline name (default: hand-tuned)")
    p.add_argument("--env", help="env id (default: the policy's env, else SynDigits-v0)")
    p.add_argument("--config", help="YAML config whose env section is used")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="number of policy actions (default 500)")
    length.add_argument("--epochs", type=float, help="length in passes over the synthetic training set")
    p.add_argument("--eval-every", type=int, default=50, help="evaluate on the real target every N steps")
    p.add_argument("--seed", type=int, default=0, help="fine-tuning seed (θ_n init and data order)")
    p.add_argument("--sample", action="store_true", help="sample actions instead of taking the argmax")
    p.add_argument("--device", help="default: cuda if available")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--no-channels-last", action="store_true", help="keep NCHW memory format")
    p.add_argument("--data-root", help="dataset root (VisDA-17) or SynDigits cache folder")
    p.add_argument("--out", help="run folder (default: runs/apply-<policy>-<time>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry, e.g. --set env.kwargs.lam=0.05")
    return p.parse_args(argv)


def plot_curve(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in rows]
    for key, label in zip(EVAL_KEYS, ("target accuracy", "target mean per-class accuracy", "teacher agreement")):
        ax.plot(steps, [r[key] for r in rows], marker="o", ms=3, label=label)
    ax.set(xlabel="training step", ylabel="fraction", ylim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_csv(rows: list[dict], path: str) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    env_id = args.env
    if env_id is None and os.path.isfile(args.policy):
        env_id = read_policy_file(args.policy).get("env_id")
    if env_id:
        config = merge(config, {"env": {"id": env_id}})
    config = apply_overrides(config, args.set)
    kwargs = config["env"].setdefault("kwargs", {})
    kwargs.update(eval_every=args.eval_every, evaluate_target=True, channels_last=not args.no_channels_last, amp=args.amp)
    kwargs["episode_steps"] = args.steps or 500
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    env = make_env(config, data_root=args.data_root, device=device)
    u = env.unwrapped
    if args.epochs:
        source = u.task.source
        u.T = max(1, round(args.epochs * (len(source) // source.batch_size) / u.k))
    policy = load_policy(args.policy, env, deterministic=not args.sample, seed=args.seed)

    name = os.path.splitext(os.path.basename(args.policy))[0] if os.path.isfile(args.policy) else args.policy.replace(":", "_").replace(",", "-")
    out = args.out or os.path.join("runs", f"apply-{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    try:
        history = fine_tune(env, policy, args.seed, progress=True, desc=f"fine-tuning with {args.policy}")
    except KeyboardInterrupt:
        print("\ninterrupted; no results written beyond this folder's earlier files", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - start

    curve = [{k: r[k] for k in ("step", *EVAL_KEYS)} for r in history if "target_acc" in r]
    write_csv(curve, os.path.join(out, "curve.csv"))
    write_csv(history, os.path.join(out, "steps.csv"))
    plot_curve(curve, os.path.join(out, "curve.png"), f"{config['env']['id']}: {args.policy}")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in u.student.state_dict().items()}, os.path.join(out, "model.safetensors"))
    final, best = curve[-1], max(curve, key=lambda r: r["target_mean_class_acc"])
    summary = {"policy": args.policy, "env": config["env"]["id"], "steps": u.t, "seed": args.seed,
               "diverged": bool(history[-1].get("diverged")), "seconds": round(seconds, 1),
               "final": final, "best_mean_class": best, "env_kwargs": kwargs}
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    print(f"{u.t} steps in {seconds / 60:.1f} min on {device}; final target accuracy {final['target_acc']:.3f}, "
          f"mean per-class {final['target_mean_class_acc']:.3f} (best {best['target_mean_class_acc']:.3f} at step "
          f"{best['step']}), teacher agreement {final['teacher_agreement']:.3f}")
    print(f"results in {out}/: curve.csv, curve.png, steps.csv, summary.json, model.safetensors")
    return 0


def main(argv=None) -> int:
    return run_cli(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
