"""Unsupervised domain adaptation from a fine-tuned model: CBST and CRST (ASG §3.5, Table 4).

Examples:
  python adapt.py --model runs/apply-policy-… --method cbst
  python adapt.py --model runs/apply-policy-…/model.safetensors --method crst-mrkld --seed 1
  python adapt.py --model runs/r50 --method crst-mrkld-lrent --config configs/uda_visda.yaml --data-root /data/visda17
  python adapt.py --out runs/adapt-… --resume          # continue a killed run after its last finished round

This is domain ADAPTATION: unlike everything else in ASG-Gym (the envs, train_policy.py and
apply_policy.py, which are domain generalisation and never see a target image), it trains on
the target images. It never reads their labels, except to evaluate after each round: a test
replaces the target labels with random ones and checks that the adapted weights do not change.

--model is an apply_policy.py run folder (or its model.safetensors): the run's summary.json
gives the task and the whole env configuration, which rebuilds the model and its data. The
method is CBST (class-balanced pseudo-labels), CRST-MRKLD (plus a KL(uniform ‖ p) model
regulariser, weight 0.1) or CRST-MRKLD+LRENT (plus soft, entropy-regularised pseudo-labels,
α = 0.25), with the official code's rounds, portions and optimiser (asg_env/adaptation/self_training.py
documents each choice; --config and --set change them).

The run folder gets rounds.csv (every round's portions, pseudo-labelled share, training
loss, time and the target evaluation), curve.png, summary.json, model.safetensors (the adapted
student) and checkpoint.pt after each round, which --resume continues from.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from agents.config import apply_overrides, read_config_file, run_cli
from agents.loading import read_file, save_policy
from asg_env import UserInputError
from asg_env.adaptation.self_training import (
    IGNORE,
    METHODS,
    SELF_TRAINING_SETTINGS,
    ConfidenceCollector,
    SelfTrainingConfig,
    hard_labels,
    labelled_fraction,
    one_hot,
    self_training_loss,
    soft_labels,
)
from asg_env.envs.settings import ENV_OWN, check_settings, recorded_settings
from asg_env.provenance import stamp
from asg_env.tasks.registry import TensorSource
from asg_env.training.trainer import Trainer

CHECKPOINT_FORMAT = "asg-gym-adapt/1"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="apply_policy.py run folder, or the model.safetensors in one")
    p.add_argument("--method", choices=tuple(METHODS),
                   help="cbst (default), crst-mrkld, crst-lrent or crst-mrkld-lrent (Table 4's three: not crst-lrent)")
    p.add_argument("--config", help="YAML file with a self_training section (see configs/uda_*.yaml)")
    p.add_argument("--rounds", type=int, help="self-training rounds (default 3, the official code's)")
    p.add_argument("--seed", type=int, help="seed of the source subsets and the shuffles (default 3, the official RANDSEED)")
    p.add_argument("--out", help="run folder (default: runs/adapt-<method>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after its last finished round")
    p.add_argument("--device", help="default: cuda if available")
    p.add_argument("--data-root", help="dataset root, if not the one the model was fine-tuned with")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a self-training setting, e.g. --set lr_ratio=0.1 (repeatable)")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> SelfTrainingConfig:
    values = {}
    if args.config:
        section = read_config_file(args.config).get("self_training", {})
        if not isinstance(section, dict):
            raise UserInputError(f"{args.config}: self_training must be a mapping of settings")
        values.update(section)
    values.update(apply_overrides({}, args.set))
    for key in ("method", "rounds", "seed"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    check_settings(values, SELF_TRAINING_SETTINGS, "self_training.")
    return SelfTrainingConfig(**values)


def model_files(path: str) -> tuple[str, str]:
    """(model.safetensors, summary.json) of an apply_policy.py run."""
    weights = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    summary = os.path.join(os.path.dirname(os.path.abspath(weights)), "summary.json")
    for name, what in ((weights, "model file"), (summary, "summary.json beside the model")):
        if not os.path.isfile(name):
            raise UserInputError(f"{what} not found: {name} (--model takes an apply_policy.py run folder)")
    return weights, summary


def load_model(path: str, device: str, data_root: str | None) -> Trainer:
    """The fine-tuned run's trainer (task, data, student), with the student's weights loaded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights, summary_path = model_files(path)
    try:
        with open(summary_path) as fh:
            config = json.load(fh)["env_kwargs"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserInputError(f"{summary_path} is not the summary.json of an apply_policy.py run") from None
    kwargs = {k: v for k, v in recorded_settings(config).items() if k not in ENV_OWN}
    kwargs.update(device=device, **({"data_root": data_root} if data_root else {}))
    trainer = Trainer(**kwargs)
    try:
        state = load_file(weights, device=str(trainer.device))
    except (SafetensorError, OSError, ValueError):
        raise UserInputError(f"{weights} is corrupt or not a safetensors file") from None
    try:
        trainer.student.load_state_dict(state)
    except RuntimeError:
        raise UserInputError(f"{weights} does not fit the model its summary.json describes") from None
    return trainer


# ------------------------------------------------------------------------------- the data
class Images(Dataset):
    """The target images alone: adaptation never reads the target labels (file datasets give
    their image without opening the label file)."""

    def __init__(self, target):
        self.target = target

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, i: int) -> torch.Tensor:
        if isinstance(self.target, TensorSource):
            return self.target.normalise(self.target.images[i : i + 1])[0]
        dataset = self.target.dataset
        while isinstance(dataset, Subset):
            dataset, i = dataset.dataset, dataset.indices[i]
        return dataset.image(i)


class SelfTrainingSet(Dataset):
    """A round's training set: the source subset ``source_index`` with its labels, then every
    target image with its pseudo-label. Items are ``(x, label, is_target)``."""

    def __init__(self, source, source_index: np.ndarray, target: Images, pseudo: torch.Tensor, num_classes: int,
                 crop: int):
        self.source, self.source_index, self.target, self.pseudo = source, source_index, target, pseudo
        self.soft, self.num_classes, self.crop = pseudo.is_floating_point(), num_classes, crop

    def __len__(self) -> int:
        return len(self.source_index) + len(self.target)

    def __getitem__(self, i: int):
        if i >= len(self.source_index):
            j = i - len(self.source_index)
            label = self.pseudo[j].float() if self.soft else self.pseudo[j].long()
            x = self.target[j]
            if label.dim() >= 2 and tuple(x.shape[-2:]) != (self.crop, self.crop):
                x, label = _random_crop(x, label, self.crop, self.soft)
            return x, label, True
        k = int(self.source_index[i])
        if isinstance(self.source, TensorSource):
            x, y = self.source.normalise(self.source.images[k : k + 1])[0], self.source.labels[k].cpu()
        else:
            x, y, *_ = self.source.dataset[k]
            y = torch.as_tensor(y)
        y = y.long()
        return x, one_hot(y.unsqueeze(0), self.num_classes)[0] if self.soft else y, False


def _random_crop(x: torch.Tensor, label: torch.Tensor, size: int, soft: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``size × size`` crop of a larger target image and its pseudo-label (padded with
    unlabelled pixels where the image is smaller), from torch's RNG (seeded per round)."""
    h, w = x.shape[-2:]
    ph, pw = max(size - h, 0), max(size - w, 0)
    x = F.pad(x, (0, pw, 0, ph))
    label = F.pad(label, (0, pw, 0, ph), value=0.0 if soft else IGNORE)
    top = int(torch.randint(x.shape[-2] - size + 1, ()))
    left = int(torch.randint(x.shape[-1] - size + 1, ()))
    return x[..., top : top + size, left : left + size], label[..., top : top + size, left : left + size]


def _loader(dataset: Dataset, trainer: Trainer, batch_size: int, order=None) -> DataLoader:
    in_memory = isinstance(trainer.task.target, TensorSource) or isinstance(trainer.task.source, TensorSource)
    workers = 0 if in_memory else trainer.task.source.num_workers  # no workers for tensors already on the device
    return DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=workers)


# ------------------------------------------------------------------------------ one round
@torch.no_grad()
def _probabilities(trainer: Trainer, images: Images, batch_size: int, flip: bool):
    trainer.student.eval()
    for x in _loader(images, trainer, batch_size):
        x = x.to(trainer.device).contiguous(memory_format=trainer.memory_format)
        probs = F.softmax(trainer.student(x)[0].float(), 1)
        if flip:  # the mirror image's prediction, mirrored back for a map
            mirrored = F.softmax(trainer.student(x.flip(-1))[0].float(), 1)
            probs = (probs + (mirrored.flip(-1) if probs.dim() > 2 else mirrored)) / 2
        yield probs


SOFT_LABEL_LIMIT = 8 * 2**30  # bytes of LRENT soft labels kept in memory


def pseudo_label(trainer: Trainer, images: Images, cfg: SelfTrainingConfig, portion: float,
                 batch_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """Steps 1 and 2 (see :mod:`asg_env.adaptation.self_training`): two passes over the target images,
    one for the class thresholds and one for the labels, so no probability map is stored."""
    collector = ConfidenceCollector(trainer.task.num_classes, cfg.ds_rate)
    alpha = cfg.weights[1]
    for probs in _probabilities(trainer, images, batch_size, cfg.test_flipping):
        need = 2 * probs[0].numel() * len(images)
        if alpha and need > SOFT_LABEL_LIMIT:
            raise UserInputError(f"LRENT's soft labels for {len(images)} target images of {tuple(probs.shape[1:])} would "
                                 f"take {need / 2**30:.0f} GiB of memory; use cbst or crst-mrkld, or fewer target images")
        collector.add(probs)
    thresholds = collector.thresholds(portion)
    labels = [(soft_labels(p, thresholds, alpha).half() if alpha else hard_labels(p, thresholds).to(torch.uint8)).cpu()
              for p in _probabilities(trainer, images, batch_size, cfg.test_flipping)]
    return torch.cat(labels), thresholds


def train_round(trainer: Trainer, dataset: SelfTrainingSet, cfg: SelfTrainingConfig, lr: float, batch_size: int,
                generator: torch.Generator) -> float:
    """Step 3: ``epochs_per_round`` epochs of SGD (a new optimizer), θ_n at ``head_lr_mult`` × lr."""
    student = trainer.student
    head = list(student.new_head.parameters())
    ids = {id(p) for p in head}
    body = [p for p in student.parameters() if p.requires_grad and id(p) not in ids]
    optimizer = torch.optim.SGD([{"params": body, "lr": lr}, {"params": head, "lr": lr * cfg.head_lr_mult}],
                                lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    kld, _ = cfg.weights
    kld = kld**2 if cfg.kld_weight_squared else kld
    student.train(trainer.bn_stats == "train")
    total, steps = 0.0, 0
    for _ in range(cfg.epochs_per_round):
        order = torch.randperm(len(dataset), generator=generator).tolist()
        for x, label, is_target in _loader(dataset, trainer, batch_size, order):
            x = x.to(trainer.device).contiguous(memory_format=trainer.memory_format)
            logits = student(x)[0]
            loss = self_training_loss(logits, label.to(trainer.device), is_target.to(trainer.device), kld)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
    student.eval()
    return total / max(steps, 1)


# ------------------------------------------------------------------------------- the run
def adapt(trainer: Trainer, cfg: SelfTrainingConfig, on_round=None, checkpoint=None, resume: dict | None = None) -> list[dict]:
    """All rounds. Row 0 is the model as fine-tuned; row r follows round r. ``checkpoint``
    saves the state after each round; ``resume`` continues from such a state."""
    images = Images(trainer.task.target)
    source = trainer.task.source
    batch_size = cfg.batch_size or source.batch_size
    lr = cfg.lr if cfg.lr is not None else cfg.lr_ratio * trainer.lr_base
    if resume is None:
        trainer.student.eval()
        history = [{"round": 0, **trainer.evaluate()}]
        if on_round:
            on_round(history[0])
    else:
        trainer.student.load_state_dict(resume["student"])
        history = list(resume["history"])
    for r in tqdm(range(len(history) - 1, cfg.rounds), initial=len(history) - 1, total=cfg.rounds, desc="self-training rounds"):
        start = time.perf_counter()
        tgt_portion, src_portion = cfg.portions(r)
        pseudo, thresholds = pseudo_label(trainer, images, cfg, tgt_portion, batch_size)
        # the official 'r' source policy: a new random subset every round (from the seed's
        # round-r spawn, where the official code seeds numpy with its seed + 1 each round)
        rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(r,)))
        n_source = int(math.floor(len(source) * src_portion))
        source_index = rng.choice(len(source), n_source, replace=False)
        generator = torch.Generator().manual_seed(int(rng.integers(2**31 - 1)))
        torch.manual_seed(int(rng.integers(2**31 - 1)))  # crops and augmentation, the loader's workers: a resume redraws them
        dataset = SelfTrainingSet(source, source_index, images, pseudo, trainer.task.num_classes,
                                  int(trainer.config["image_size"]))
        loss = train_round(trainer, dataset, cfg, lr, batch_size, generator)
        row = {"round": r + 1, "target_portion": tgt_portion, "source_portion": src_portion, "source_images": n_source,
               "pseudo_labelled": labelled_fraction(pseudo), "mean_threshold": float(np.mean(thresholds)),
               "train_loss": loss, "seconds": round(time.perf_counter() - start, 2), **trainer.evaluate()}
        history.append(row)
        if on_round:
            on_round(row)
        if checkpoint:
            checkpoint({"student": {k: v.detach().clone() for k, v in trainer.student.state_dict().items()},
                        "history": list(history)})
    return history


def plot_rounds(history: list[dict], key: str, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot([r["round"] for r in history], [r[key] for r in history], marker="o")
    ax.set(xlabel="self-training round (0: the fine-tuned model)", ylabel=key, title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    resume = None
    if args.resume:
        if not args.out:
            raise UserInputError("--resume needs --out, the folder of the run to continue")
        given = [flag for flag, value in (("--model", args.model), ("--method", args.method), ("--seed", args.seed),
                                          ("--config", args.config), ("--set", args.set)) if value]
        if given:
            raise UserInputError(f"--resume continues the run with its own settings; drop {', '.join(given)}")
        resume = read_file(os.path.join(args.out, "checkpoint.pt"), "checkpoint",
                           " (--resume needs --out pointing at an unfinished adapt.py run)")
        if not isinstance(resume, dict) or resume.get("format") != CHECKPOINT_FORMAT:
            raise UserInputError(f"{args.out}/checkpoint.pt is not an adapt.py checkpoint")
        check_settings(resume["config"], SELF_TRAINING_SETTINGS, "self_training.")
        model, cfg = resume["model"], SelfTrainingConfig(**resume["config"])
        args.data_root = args.data_root or resume.get("data_root")
        if args.rounds is not None:
            cfg.rounds = args.rounds
    else:
        if not args.model:
            raise UserInputError("--model is required: an apply_policy.py run folder or its model.safetensors")
        model, cfg = args.model, resolve_config(args)
    if cfg.rounds < 1:
        raise UserInputError(f"--rounds must be at least 1, not {cfg.rounds}")
    out = args.out or os.path.join("runs", f"adapt-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    if not args.resume and any(os.path.exists(os.path.join(out, f)) for f in ("summary.json", "checkpoint.pt")):
        raise UserInputError(f"{out} already holds a run; choose another --out (or --resume an unfinished one)")
    trainer = load_model(model, device, args.data_root)
    os.makedirs(out, exist_ok=True)
    rows = list(resume["history"]) if resume else []
    fields = ["round", "target_portion", "source_portion", "source_images", "pseudo_labelled", "mean_threshold",
              "train_loss", "seconds"]

    def on_round(row: dict) -> None:
        rows.append(row)
        keys = fields + [k for k in dict.fromkeys(k for r in rows for k in r) if k not in fields]
        with open(os.path.join(out, "rounds.csv"), "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys, restval="")
            writer.writeheader()
            writer.writerows(rows)

    def checkpoint(state: dict) -> None:
        save_policy({"format": CHECKPOINT_FORMAT, "model": model, "config": dataclasses.asdict(cfg),
                     **({"data_root": args.data_root} if args.data_root else {}), **state},
                    os.path.join(out, "checkpoint.pt"))

    print(f"{cfg.method} on {trainer.task.name} from {model}: {cfg.rounds} rounds, {len(trainer.task.target)} unlabelled "
          f"target images, {len(trainer.task.source)} labelled source images"
          + (f"; resuming after round {len(rows) - 1}" if resume else ""))
    try:
        history = adapt(trainer, cfg, on_round, checkpoint, resume)
    except KeyboardInterrupt:
        print(f"\ninterrupted; every finished round is saved. Continue with:\n  python adapt.py --out {out} --resume",
              file=sys.stderr)
        return 130
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in trainer.student.state_dict().items()}, os.path.join(out, "model.safetensors"))
    key = trainer.headline
    plot_rounds(history, key, os.path.join(out, "curve.png"), f"{trainer.task.name}: {cfg.method}")
    summary = {"model": model, "method": cfg.method, "config": dataclasses.asdict(cfg), "task": trainer.task.name,
               "start": history[0], "final": history[-1], "seconds": round(sum(r.get("seconds", 0) for r in history), 1)}
    summary.update(stamp({"model": model, "config": summary["config"]}))
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    if os.path.exists(os.path.join(out, "checkpoint.pt")):
        os.remove(os.path.join(out, "checkpoint.pt"))
    print(f"target {key}: {history[0][key]:.4f} before, {history[-1][key]:.4f} after {cfg.rounds} rounds "
          f"({summary['seconds'] / 60:.1f} min)")
    print(f"results in {out}/: rounds.csv, curve.png, summary.json, model.safetensors")
    return 0


def main(argv=None) -> int:
    return run_cli(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
