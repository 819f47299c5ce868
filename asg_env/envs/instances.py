"""Task instances and instance families, for benchmarks that test a policy on runs it was not
trained on (DACBench's instance sets, learned_optimization's task families).

An **instance** is one full env configuration: settings applied on top of the env's own when an
episode starts (``env.reset(options={"instance": {...}})``, or one drawn per episode from the
env's ``instances`` list). A **family** is a seeded sampler of instances. Its axes (backbone,
η_base, run length, image size, source size, render seed) have a training range and a wider
test range, so a test split holds instances no policy saw the like of in training (EfficientNet-Lite2,
an η_base outside the training decade). Each split is drawn stratified: every value of a choice
comes up before any repeats, and a log-uniform axis spreads its draws over strata (see
:class:`LogUniform`).

An **instance file** (``configs/instances/*.yaml``) holds what a family drew, a train split and a
test split that share no instance; ``python -m asg_env.envs.instances FAMILY`` writes one::

    python -m asg_env.envs.instances syndigits --train 12 --test 4 --seed 0 --out configs/instances/syndigits.yaml
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import yaml

from asg_env.envs.settings import ENV_FREE_FORM, ENV_SETTINGS, check_settings
from asg_env.errors import UserInputError

SPLITS = ("train", "test")
FILE_FORMAT = "asg-gym-instances-v1"


@dataclass(frozen=True)
class Choice:
    """A discrete axis: ``train`` values, and the ``test`` values (a superset, or others)."""

    train: tuple
    test: tuple

    def draw(self, rng: np.random.Generator, split: str, n: int) -> list:
        values = getattr(self, split)
        rounds = -(-n // len(values))
        return [values[i] for r in range(rounds) for i in rng.permutation(len(values))][:n]

    def outside(self, value) -> bool:
        return value not in self.train


@dataclass(frozen=True)
class LogUniform:
    """A positive axis, log-uniform, rounded to two significant digits. The train split draws
    from ``train`` = (low, high) with one draw in each of n equal strata; the test split puts
    half its draws (rounded up) outside that range, alternately below and above it within
    ``test``, and the rest inside."""

    train: tuple[float, float]
    test: tuple[float, float]

    def draw(self, rng: np.random.Generator, split: str, n: int) -> list[float]:
        (lo, hi), (test_lo, test_hi) = (tuple(math.log10(v) for v in r) for r in (self.train, self.test))
        if split == "train":
            parts = [(lo + (hi - lo) * k / n, lo + (hi - lo) * (k + 1) / n) for k in range(n)]
        else:
            gap = math.log10(1.06)  # rounding to two digits never brings an outside draw back in
            outside = [(test_lo, lo - gap), (hi + gap, test_hi)]
            parts = [outside[k % 2] for k in range((n + 1) // 2)] + [(lo, hi)] * (n // 2)
        draws = [a + (b - a) * u for (a, b), u in zip(parts, rng.uniform(size=n))]
        return [float(f"{10 ** draws[k]:.2g}") for k in rng.permutation(n)]

    def outside(self, value) -> bool:
        return not self.train[0] <= value <= self.train[1]


@dataclass(frozen=True)
class IntRange:
    """Whole numbers in [low, high) per split; disjoint ranges keep the splits' data apart."""

    train: tuple[int, int]
    test: tuple[int, int]

    def draw(self, rng: np.random.Generator, split: str, n: int) -> list[int]:
        low, high = getattr(self, split)
        return [int(v) for v in rng.choice(np.arange(low, high), size=n, replace=False)]

    def outside(self, value) -> bool:
        return False  # a seed is never "out of range": it only keeps the splits' images apart


@dataclass(frozen=True)
class Family:
    """Instances of one env: ``base`` settings that every instance shares and the sampled axes."""

    env_id: str
    base: dict
    axes: dict
    description: str = ""
    meta_training: dict = field(default_factory=dict)  # on top of base and every train instance: a cheaper
    # episode for meta-training a policy (benchmarks/learning_gate.py), since evaluation runs can be long

    def sample(self, split: str, n: int, seed: int) -> list[dict]:
        """``n`` instances of ``split``, a pure function of ``(split, n, seed)``."""
        if split not in SPLITS:
            raise UserInputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        columns = {name: axis.draw(rng, split, n) for name, axis in self.axes.items()}
        return [{name: columns[name][i] for name in self.axes} for i in range(n)]

    def outside_training(self, instance: dict) -> list[str]:
        """The axes on which ``instance`` lies outside the training ranges."""
        return [name for name, axis in self.axes.items() if name in instance and axis.outside(instance[name])]


LITE = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")

# Registered families. Runs are short (8–64 SGD steps of batch 32) so that a benchmark of many
# runs fits on two CPU cores; T = 8 decisions in every instance, so one action sequence fits all.
FAMILIES: dict[str, Family] = {
    "syndigits": Family(
        "SynDigits-v0",
        base={"episode_steps": 8, "lam": 0.1, "reward_batch": "heldout", "target_eval_size": 1000,
              "synthetic_eval_size": 500},
        axes={
            "backbone": Choice(LITE[:2], LITE),
            "lr_base": LogUniform((1e-3, 1e-2), (5e-4, 2e-2)),
            "epochs": Choice((1, 2, 3, 4), (1, 2, 3, 4)),
            "image_size": Choice((48, 64), (48, 64)),
            "source_size": Choice((256, 512), (256, 512)),
            "render_seed": IntRange((1, 1000), (1000, 2000)),
        },
        description="fonts-rendered digits → real MNIST on EfficientNet-Lite0/1 (train) and Lite0/1/2 (test)",
        meta_training={"image_size": 32, "epochs": 1, "synthetic_eval_size": 200},
    ),
    # Runs long enough to pose the problem (384 or 512 SGD steps at 32 px; four trial runs of a
    # fixed setting at a suitable η_base ended at 91-99 % synthetic held-out accuracy): the L2O
    # benchmark's family. Meta-training episodes
    # are 16 SGD steps of the same instances (one epoch of 512 images), evaluation runs 24-32 times longer.
    "syndigits-long": Family(
        "SynDigits-v0",
        base={"episode_steps": 8, "lam": 0.1, "reward_batch": "heldout", "target_eval_size": 1000,
              "synthetic_eval_size": 500, "image_size": 32, "source_size": 4096},
        axes={
            "backbone": Choice(LITE[:2], LITE),
            "lr_base": LogUniform((5e-3, 2e-2), (3e-3, 4e-2)),
            "epochs": Choice((3, 4), (3, 4)),
            "render_seed": IntRange((1, 1000), (1000, 2000)),
        },
        description="fonts-rendered digits → real MNIST at 32 px, 384-512 SGD steps, on EfficientNet-Lite0/1 (train) "
                    "and Lite0/1/2 (test)",
        meta_training={"source_size": 512, "epochs": 1, "synthetic_eval_size": 200},
    ),
    "digitscenes": Family(
        "SynDigitScenes-v0",
        base={"episode_steps": 8, "lam": 0.1, "reward_batch": "heldout", "target_eval_size": 300,
              "synthetic_eval_size": 100},
        axes={
            "backbone": Choice(LITE[:2], LITE),
            "lr_base": LogUniform((2e-3, 2e-2), (1e-3, 4e-2)),
            "epochs": Choice((1, 2, 3, 4), (1, 2, 3, 4)),
            "image_size": Choice((48, 64), (48, 64)),
            "source_size": Choice((128, 256), (128, 256)),
            "render_seed": IntRange((1, 1000), (1000, 2000)),
        },
        description="digit-scene segmentation → real-MNIST scenes, FCN-8s on EfficientNet-Lite0/1 (train), Lite0/1/2 (test)",
    ),
}


def instance_key(instance: dict) -> str:
    return json.dumps(instance, sort_keys=True)


def write_instances(family: str, n_train: int, n_test: int, seed: int) -> dict:
    """An instance file's content: the family's draws of both splits."""
    if family not in FAMILIES:
        raise UserInputError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    fam = FAMILIES[family]
    return {"format": FILE_FORMAT, "family": family, "seed": seed, "env": fam.env_id, "base": dict(fam.base),
            "train": fam.sample("train", n_train, seed), "test": fam.sample("test", n_test, seed)}


def meta_training_instances(instance_file: str) -> dict:
    """The file's train split at its family's meta-training size, as an instance file's content:
    the family's ``meta_training`` settings that are axes go into every instance, the others
    into the shared base."""
    train = load_instances(instance_file, "train")
    if train.family not in FAMILIES:
        raise UserInputError(f"{instance_file}: family {train.family!r} is not registered; choose one of "
                             f"{', '.join(FAMILIES)}")
    family = FAMILIES[train.family]
    with open(instance_file) as fh:
        data = yaml.safe_load(fh)
    on_instance = {k: v for k, v in family.meta_training.items() if k in family.axes}
    data["base"] = {**data["base"], **{k: v for k, v in family.meta_training.items() if k not in family.axes}}
    data["train"] = [{**i, **on_instance} for i in train.instances]
    return data


@dataclass(frozen=True)
class InstanceSet:
    """One split of an instance file, ready for an env: ``env_id``, the shared ``base`` settings
    and the ``instances``; ``digest`` identifies the split's content (policies record it)."""

    path: str
    family: str
    split: str
    env_id: str
    base: dict
    instances: list
    digest: str

    def describe(self) -> dict:
        """What a policy records of the instances it was trained on."""
        return {"file": self.path, "family": self.family, "split": self.split, "count": len(self.instances),
                "digest": self.digest}


def load_instances(path: str, split: str) -> InstanceSet:
    """Read ``split`` of an instance file; a missing or malformed file is one error line."""
    if not os.path.isfile(path):
        raise UserInputError(f"instance file not found: {path}")
    if split not in SPLITS:
        raise UserInputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise UserInputError(f"cannot parse {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
        raise UserInputError(f"{path} is not an instance file (expected format: {FILE_FORMAT})")
    instances, base = data.get(split), data.get("base") or {}
    if not isinstance(instances, list) or not instances or not all(isinstance(i, dict) for i in instances):
        raise UserInputError(f"{path}: split {split!r} must be a non-empty list of instances (mappings of env settings)")
    if not isinstance(base, dict) or not isinstance(data.get("env"), str):
        raise UserInputError(f"{path} needs env (an env id) and base (a mapping of env settings)")
    for i, instance in enumerate(instances):
        check_settings({**base, **instance}, ENV_SETTINGS, f"{path}: {split}[{i}].", ignore=ENV_FREE_FORM)
    train, test = ({instance_key(i) for i in data.get(s) or [] if isinstance(i, dict)} for s in SPLITS)
    if train & test:
        raise UserInputError(f"{path}: {len(train & test)} instance(s) are in both the train and the test split")
    digest = hashlib.sha256(instance_key({"base": base, split: instances}).encode()).hexdigest()[:16]
    return InstanceSet(path, str(data.get("family", "")), split, data["env"], dict(base), list(instances), digest)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write an instance file: a family's seeded train and test splits.")
    p.add_argument("family", choices=sorted(FAMILIES))
    p.add_argument("--train", type=int, default=12, help="instances in the train split")
    p.add_argument("--test", type=int, default=4, help="instances in the test split")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    p.add_argument("--out", help="file to write (default: standard output)")
    args = p.parse_args(argv)
    if args.train < 1 or args.test < 1 or args.seed < 0:
        p.error("--train and --test must be at least 1 and --seed at least 0")
    data = write_instances(args.family, args.train, args.test, args.seed)
    text = (f"# {FAMILIES[args.family].description}\n"
            f"# written by: python -m asg_env.envs.instances {args.family} --train {args.train} --test {args.test} "
            f"--seed {args.seed}\n" + yaml.safe_dump(data, sort_keys=False))
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
