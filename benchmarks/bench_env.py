"""Env overhead, measured side by side in one run.

Prints these ratios (median of interleaved timing blocks, same process, same data):

1. ``env.step`` vs the same SGD step written as a plain PyTorch loop (target ≤ 1.03×). Both
   run the teacher on every batch (the env's teacher cache is off for this pair).
2. Proxy guidance on (λ=0.1) vs off (λ=0) on SynDigits: with the teacher run on every batch
   under inference_mode, and with the teacher's logits cached per rendered image (the
   default, measured warm).
3. channels_last vs contiguous, and the held-out reward batch vs the free training-batch reward.
4. Proxy guidance on vs off on the VisDA-17 layout (a generated tree of random images, ResNet-50
   at 64 px, images decoded from files each step), with the teacher's logits cached on disk
   (the default; target ≤ 1.05×) and with the teacher run on every batch.

About 2.5 minutes on 2 CPU cores with the defaults.

    python -m benchmarks.bench_env [--steps 10] [--repeats 5] [--batch-size 32] [--image-size 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import gymnasium as gym
import numpy as np
import torch

import asg_env  # noqa: F401  (registers the ids)
from asg_env.training.proxy import proxy_guidance_loss


def plain_loop(env: asg_env.ASGEnv, steps: int) -> None:
    """The fine-tuning step with no env around it: batch, teacher, forward, loss, SGD."""
    source, fmt = env.trainer.task.source, env.trainer.memory_format
    for _ in range(steps):
        x, y, *_ = source.next()
        x = x.contiguous(memory_format=fmt)
        with torch.inference_mode():
            teacher = env.trainer.teacher(x)
        new, old = env.trainer.student(x)
        loss = proxy_guidance_loss(new, y, old, teacher.clone(), env.trainer.lam)
        env.trainer.optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        env.trainer.optimizer.step()
        loss.total.item()


def env_loop(env: asg_env.ASGEnv, steps: int) -> None:
    action = np.full(len(env.trainer.coordinates), 10)
    for _ in range(steps):
        env.step(action)


def fake_visda(root: str, per_class: int, size: int = 72) -> str:
    """A VisDA-17 tree of random images (the layout is what matters for the timing)."""
    from PIL import Image

    from asg_env.tasks.visda import VISDA_CLASSES

    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        lines = []
        for label, name in enumerate(VISDA_CLASSES):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(per_class):
                rel = f"{name}/{i:04d}.png"
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(os.path.join(root, split, rel))
                lines.append(f"{rel} {label}")
        with open(os.path.join(root, split, "image_list.txt"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return root


def seconds_per_step(runs: dict, steps: int, repeats: int, warmup: int | None = None) -> dict[str, float]:
    """Interleave the runs block by block so drift in machine speed hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for name, (env, fn) in runs.items():  # warm-up: by default one epoch, which fills any teacher cache
        env.reset(seed=0)
        fn(env, warmup if warmup is not None else 3 + env.trainer.task.steps_per_epoch)
    for _ in range(repeats):
        for name, (env, fn) in runs.items():
            env.reset(seed=0)
            start = time.perf_counter()
            fn(env, steps)
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="steps per timing block")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved blocks per setting")
    parser.add_argument("--source-size", type=int, default=320, help="rendered training images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    def make(**kw) -> asg_env.ASGEnv:
        base = dict(batch_size=args.batch_size, image_size=args.image_size, device=args.device,
                    episode_steps=10**6, evaluate_target=False, source_size=args.source_size)
        return gym.make("SynDigits-v0", **{**base, **kw}).unwrapped

    uncached = make(lam=0.1, cache_teacher=False)
    runs = {
        "plain PyTorch step": (uncached, plain_loop),
        "env.step": (uncached, env_loop),
        "env.step, teacher cached": (make(lam=0.1), env_loop),
        "env.step, proxy off": (make(lam=0.0), env_loop),
        "env.step, contiguous": (make(lam=0.1, cache_teacher=False, channels_last=False), env_loop),
        "env.step, held-out reward": (make(lam=0.1, cache_teacher=False, reward_batch="heldout"), env_loop),
    }
    t = seconds_per_step(runs, args.steps, args.repeats)
    print(f"device={args.device} threads={torch.get_num_threads()} batch={args.batch_size} "
          f"image={args.image_size}px backbone={uncached.backbone_name}")
    for name, s in t.items():
        print(f"  {name:<28} {s * 1e3:8.1f} ms/step")
    print("ratios:")
    print(f"  env.step / plain PyTorch step      {t['env.step'] / t['plain PyTorch step']:.3f}x  (target <= 1.03)")
    print(f"  proxy on / proxy off, teacher run  {t['env.step'] / t['env.step, proxy off']:.3f}x")
    print(f"  proxy on / proxy off, cached       {t['env.step, teacher cached'] / t['env.step, proxy off']:.3f}x  (target <= 1.05)")
    print(f"  contiguous / channels_last         {t['env.step, contiguous'] / t['env.step']:.3f}x")
    print(f"  held-out reward / training reward  {t['env.step, held-out reward'] / t['env.step']:.3f}x")

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ASG_CACHE"] = tmp  # the teacher-logit cache is built here and thrown away

        def visda(**kw) -> asg_env.ASGEnv:
            base = dict(data_root=fake_visda(os.path.join(tmp, "visda"), per_class=8), backbone="resnet50",
                        weights=None, image_size=64, batch_size=16, num_workers=0, device=args.device,
                        episode_steps=10**6, evaluate_target=False)
            return gym.make("VisDA-v0", **{**base, **kw}).unwrapped

        runs = {"proxy on, teacher cached on disk": (visda(lam=0.1), env_loop),
                "proxy on, teacher run": (visda(lam=0.1, cache_teacher=False), env_loop),
                "proxy off": (visda(lam=0.0), env_loop)}
        v = seconds_per_step(runs, args.steps, args.repeats, warmup=2)
    print("VisDA-17 layout (generated tree, ResNet-50, 64 px, batch 16, images decoded every step):")
    for name, s in v.items():
        print(f"  {name:<34} {s * 1e3:8.1f} ms/step")
    print(f"  proxy on / off, teacher cached     {v['proxy on, teacher cached on disk'] / v['proxy off']:.3f}x  (target <= 1.05)")
    print(f"  proxy on / off, teacher run        {v['proxy on, teacher run'] / v['proxy off']:.3f}x")


if __name__ == "__main__":
    main()
