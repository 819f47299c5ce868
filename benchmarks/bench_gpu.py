"""Fine-tuning throughput on one GPU: a plain loop, the trainer and ``env.step``, side by side.

ResNet-101 at 224 px, batch 32, on random images held on the device (no dataset needed) and
random weights, with learning rate 0 so that random weights never diverge (every kernel of the
SGD step still runs; the speed depends on neither). Each setting runs in fp32 and in bf16
autocast:

* plain loop: a torchvision-style fine-tuning step (forward, cross-entropy, backward,
  ``torch.optim.SGD``), with no guidance and with proxy guidance (the teacher run each step);
* trainer: :class:`asg_env.training.trainer.Trainer.step`, one decision per SGD step (the most
  host–device reads), with no guidance, with the teacher run, and with the teacher cached;
* ``env.step`` around the same trainer, teacher cached;
* with ``--compile BACKEND`` (``inductor`` by default on a GPU), the plain loop, the trainer
  and ``env.step`` again with the step's forward and backward under ``torch.compile``
  (the trainer's ``compile=`` option), beside their eager rows. Goal (issue 19): ≥ 30 % MFU
  in bf16 at ``--batch-size 128`` for ResNet-101 at 224 px.

It prints img/s, each row's ratio to the plain loop without guidance, the model FLOP
utilisation (student forward + backward FLOPs per image, counted by
``torch.utils.flop_counter``, against the card's dense bf16 peak), and the host–device
syncs per decision that ``torch.cuda.set_sync_debug_mode`` reports. Goals: trainer + PG
≥ 0.7× the plain loop without it; ``env.step`` ≥ 0.95× the trainer.

On a GPU (or with ``--episode``) it also times one SynDigits-v0 episode in the comparison
configuration (configs/reinforce_syndigits.yaml: EfficientNet-Lite0 at 64 px, batch 32, T = 32
decisions over 124 SGD steps, proxy guidance, held-out reward batch), eager and compiled, after
an untimed first episode.

    python -m benchmarks.bench_gpu                     # about 2 minutes on an H100
    python -m benchmarks.bench_gpu --device cpu --backbone efficientnet_lite0 --image-size 32 \\
        --batch-size 4 --steps 2 --warmup 1            # tiny, for the test suite
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from asg_env.envs.env import ASGEnv
from asg_env.tasks.registry import Task, TensorSource
from asg_env.training.backbones import build_backbone, input_normalisation
from asg_env.training.proxy import kl_to_teacher, make_teacher

# Dense bf16 tensor-core peaks in TFLOP/s (SXM parts), for MFU.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def random_task(n: int, size: int, classes: int, batch: int, device: torch.device, backbone: str) -> Task:
    mean, std = input_normalisation(backbone)
    rng = np.random.default_rng(0)

    def source(count: int) -> TensorSource:
        return TensorSource(rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8),
                            rng.integers(0, classes, count).astype(np.int64), batch, device, mean, std)

    return Task("random", classes, source(n), source(batch).all(), source(batch))


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def plain_loop(args, device: torch.device, bf16: bool, guidance: bool, compile: str | None = None):
    """A fine-tuning loop as one would write it with torchvision, in the trainer's protocol
    (eval-mode BatchNorm, channels_last)."""
    parts = build_backbone(args.backbone, None)
    model = nn.Sequential(parts.features, nn.Linear(parts.feature_dim, args.classes)).to(
        device, memory_format=torch.channels_last).eval()
    teacher = make_teacher(parts).to(device, memory_format=torch.channels_last) if guidance else None
    imagenet_head = parts.imagenet_head.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=5e-4)
    forward = torch.compile(model, backend=compile, dynamic=False) if compile else model
    source = random_task(args.source_size, args.image_size, args.classes, args.batch_size, device, args.backbone).source

    def step() -> None:
        x, y, *_ = source.next()
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, bf16):
            if teacher is None:
                loss = F.cross_entropy(forward(x).float(), y)
            else:
                features = model[0](x)
                loss = F.cross_entropy(model[1](features).float(), y)
                with torch.no_grad():
                    t = teacher(x)
                loss = loss + 0.1 * kl_to_teacher(imagenet_head(features), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, None


def trainer_loop(args, device: torch.device, bf16: bool, guidance: str, cached: bool, env: bool,
                 compile: str | None = None):
    task = random_task(args.source_size, args.image_size, args.classes, args.batch_size, device, args.backbone)
    e = ASGEnv(evaluate_target=False, task=task, backbone=args.backbone, weights=None, episode_steps=10**6,
               batch_size=args.batch_size, image_size=args.image_size, lam=0.1, guidance=guidance,
               lr_base=0.0, device=str(device), amp=bf16, cache_teacher=cached, imagenet_photos=0, compile=compile)
    e.reset(seed=0)
    action = np.full(len(e.coordinate_names), 10)
    scales = action / 10
    return ((lambda: e.step(action)), e) if env else ((lambda: e.trainer.step(scales)), e.trainer)


def flops_per_image(args, device: torch.device) -> float:
    """Student forward + backward FLOPs per image (teacher and optimizer not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    parts = build_backbone(args.backbone, None)
    model = nn.Sequential(parts.features, nn.Linear(parts.feature_dim, args.classes)).to(device).eval()
    x = torch.randn(2, 3, args.image_size, args.image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), torch.zeros(2, dtype=torch.long, device=device)).backward()
    return counter.get_total_flops() / 2


def syncs_per_call(step, device: torch.device, calls: int = 3) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(calls):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / calls


def images_per_second(step, args, device: torch.device, warmup: int) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.steps * args.batch_size / (time.perf_counter() - start)


def episode_seconds(device: torch.device, compile: str | None) -> float:
    """Wall time of one SynDigits-v0 episode in the comparison configuration (level 10 everywhere)."""
    import os

    from agents.config import load_config, make_env

    config = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                      "reinforce_syndigits.yaml"))
    env = make_env(config, device=str(device), compile=compile)
    action = np.full(len(env.unwrapped.coordinate_names), 10)
    for seed in (0, 1):  # the first fills the teacher cache and compiles
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        env.reset(seed=seed)
        done = False
        while not done:
            done = env.step(action)[2]
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbone", default="resnet101")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--classes", type=int, default=12)
    p.add_argument("--source-size", type=int, default=512, help="random images on the device (one epoch fills the teacher cache)")
    p.add_argument("--steps", type=int, default=40, help="timed SGD steps per row")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps first (cached rows: plus one epoch)")
    p.add_argument("--compile", default=None if not torch.cuda.is_available() else "inductor",
                   help="torch.compile backend of the compiled rows (default: inductor on a GPU, none on a CPU); "
                        "'none' skips them")
    p.add_argument("--episode", action=argparse.BooleanOptionalAction, default=None,
                   help="also time one SynDigits-v0 episode (default: on a GPU only)")
    args = p.parse_args(argv)
    compile = None if args.compile in (None, "none") else args.compile
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    precisions = [False, True] if device.type == "cuda" else [False]
    epoch = args.source_size // args.batch_size

    rows = []
    for bf16 in precisions:
        settings = [
            ("plain loop", lambda: plain_loop(args, device, bf16, False), 0),
            ("plain loop + PG (teacher run)", lambda: plain_loop(args, device, bf16, True), 0),
            ("trainer", lambda: trainer_loop(args, device, bf16, "none", False, False), 0),
            ("trainer + PG (teacher run)", lambda: trainer_loop(args, device, bf16, "kl", False, False), 0),
            ("trainer + PG (teacher cached)", lambda: trainer_loop(args, device, bf16, "kl", True, False), epoch),
            ("env.step + PG (teacher cached)", lambda: trainer_loop(args, device, bf16, "kl", True, True), epoch),
        ]
        if compile:
            settings += [
                ("plain loop, compiled", lambda: plain_loop(args, device, bf16, False, compile), 0),
                ("trainer + PG (teacher cached), compiled",
                 lambda: trainer_loop(args, device, bf16, "kl", True, False, compile), epoch),
                ("env.step + PG (teacher cached), compiled",
                 lambda: trainer_loop(args, device, bf16, "kl", True, True, compile), epoch),
            ]
        for name, build, extra_warmup in settings:
            step, runner = build()
            ips = images_per_second(step, args, device, args.warmup + extra_warmup)
            rows.append({"precision": "bf16" if bf16 else "fp32", "name": name, "img/s": ips,
                         "syncs": syncs_per_call(step, device) if not name.startswith("plain") else None})
            if getattr(runner, "diverged", False):  # a diverged env would return without training
                raise RuntimeError(f"{name}: the loss became non-finite; the timing is void")
            del step
            if device.type == "cuda":
                torch.cuda.empty_cache()

    flops = flops_per_image(args, device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in card), None)
    print(f"{card}: {args.backbone} at {args.image_size} px, batch {args.batch_size}, "
          f"{flops / 1e9:.1f} GFLOP per image (student forward + backward), torch {torch.__version__}")
    print(f"| precision | setting | img/s | × plain loop | MFU (bf16 peak {peak or 'n/a'} TFLOP/s) | syncs / decision |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        base = next(b["img/s"] for b in rows if b["precision"] == r["precision"] and b["name"] == "plain loop")
        mfu = f"{100 * r['img/s'] * flops / (peak * 1e12):.1f} %" if peak else "n/a"
        syncs = "" if r["syncs"] is None else f"{r['syncs']:g}"
        print(f"| {r['precision']} | {r['name']} | {r['img/s']:.0f} | {r['img/s'] / base:.2f} | {mfu} | {syncs} |")
    for precision in ("fp32", "bf16")[: len(precisions)]:
        get = {r["name"]: r["img/s"] for r in rows if r["precision"] == precision}
        print(f"{precision}: trainer + PG (cached) / plain loop = {get['trainer + PG (teacher cached)'] / get['plain loop']:.2f} "
              f"(goal ≥ 0.7); trainer + PG (run) / plain loop = {get['trainer + PG (teacher run)'] / get['plain loop']:.2f}; "
              f"env.step / trainer = {get['env.step + PG (teacher cached)'] / get['trainer + PG (teacher cached)']:.2f} (goal ≥ 0.95)")
        if compile:
            t, e = get["trainer + PG (teacher cached), compiled"], get["env.step + PG (teacher cached), compiled"]
            print(f"{precision}, compiled ({compile}): trainer / eager trainer = {t / get['trainer + PG (teacher cached)']:.2f}; "
                  f"trainer + PG (cached) / compiled plain loop = {t / get['plain loop, compiled']:.2f} (goal ≥ 0.9); "
                  f"env.step / trainer = {e / t:.2f} (goal ≥ 0.95)")
    if args.episode if args.episode is not None else device.type == "cuda":
        times = {"eager": episode_seconds(device, None)}
        if compile:
            times[f"compiled ({compile})"] = episode_seconds(device, compile)
        print("SynDigits-v0 episode (Lite0, 64 px, batch 32, T = 32 over 124 SGD steps, PG, held-out reward): "
              + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
