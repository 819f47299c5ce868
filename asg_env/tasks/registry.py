"""Syn→real tasks: a seeded stream of synthetic training batches, a fixed held-out synthetic
batch, and the real target set, which is only ever evaluated on.

Keeping the three apart in one small object is what lets the env guarantee that target
images never reach training, the observation or the reward: the env reads the target only
inside :meth:`ASGEnv.evaluate_target`, under ``torch.inference_mode`` and in eval mode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2 as T

from asg_env.errors import UserInputError
from asg_env.tasks.syndigits import load_mnist_target, load_syndigits
from asg_env.tasks.visda import VISDA_CLASSES, VisDA17

Batch = tuple[torch.Tensor, torch.Tensor]
Stats = tuple[float, float, float]


class TrainBatch(NamedTuple):
    """A training batch. When the source images are fixed (no random augmentation), ``index``
    (on the CPU) names them, and ``key`` is the same index on the batch's device, which lets
    the frozen teacher's outputs be cached per image without waiting for the device."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor | None = None
    key: torch.Tensor | None = None


class EpochOrder:
    """The order in which a source is drawn: each epoch a fresh ``randperm`` from a seeded
    generator, cut into global batches of ``batch_size`` (the partial tail is dropped). Under
    torchrun, rank ``r`` of ``w`` takes the ``r``-th of ``w`` equal slices of every global
    batch, so the ranks together train on exactly the batches one process would.

    Its state (the generator and the rest of the current epoch) is what a checkpoint needs to
    continue the same order.
    """

    def __init__(self, size: int, batch_size: int, shard: tuple[int, int] = (0, 1)):
        self.size, self.batch_size = size, min(batch_size, size)
        self.rank, self.world_size = shard
        self.generator = torch.Generator()
        self.reset(0)

    def reset(self, seed: int) -> None:
        self.generator.manual_seed(seed)
        self._generator_state = self.generator.get_state()
        self._rest = torch.empty(0, dtype=torch.long)

    @property
    def batches_per_epoch(self) -> int:
        return max(1, self.size // self.batch_size)

    def next(self) -> tuple[torch.Tensor, bool]:
        """This rank's indices of the next global batch, and whether a new epoch began."""
        new_epoch = len(self._rest) < self.batch_size
        if new_epoch:
            self._rest = torch.randperm(self.size, generator=self.generator)
            self._generator_state = self.generator.get_state()
        batch, self._rest = self._rest[: self.batch_size], self._rest[self.batch_size :]
        per_rank = self.batch_size // self.world_size
        return batch[self.rank * per_rank : (self.rank + 1) * per_rank], new_epoch

    def state_dict(self) -> dict:
        return {"generator": self._generator_state, "rest": self._rest}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._generator_state = self.generator.get_state()
        self._rest = state["rest"].clone()


class TensorSource:
    """Shuffled minibatches from uint8 images held in memory, normalised on the fly with the
    backbone's ``mean``/``std`` (given for images in [0, 1])."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, device: torch.device,
                 mean: Stats, std: Stats, shard: tuple[int, int] = (0, 1)):
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
        self.labels = torch.from_numpy(labels).to(device)
        self.order = EpochOrder(len(self.labels), batch_size, shard)
        self.batch_size = self.order.batch_size
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def reset(self, seed: int) -> None:
        self.order.reset(seed)

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std

    def __len__(self) -> int:
        return len(self.labels)

    def next(self) -> TrainBatch:
        idx, _ = self.order.next()
        if self.images.is_cuda:  # a pinned copy goes to the device without waiting for it
            idx = idx.pin_memory()
        key = idx.to(self.images.device, non_blocking=True)
        return TrainBatch(self.normalise(self.images[key]), self.labels[key], idx, key)

    def next_runs(self, orders: list[EpochOrder]) -> TrainBatch:
        """The next batch of each of ``orders`` (one per batched run), stacked: x is (R, B, …),
        ``index`` and ``key`` are (R, B)."""
        idx = torch.stack([order.next()[0] for order in orders])
        if self.images.is_cuda:
            idx = idx.pin_memory()
        key = idx.to(self.images.device, non_blocking=True)
        x = self.normalise(self.images[key.flatten()])
        return TrainBatch(x.view(*key.shape, *x.shape[1:]), self.labels[key], idx, key)

    def batches(self, batch_size: int = 256, shard: tuple[int, int] = (0, 1)) -> Iterator[Batch]:
        """Every image once, in order; with ``shard=(r, w)`` only batches ``r, r + w, …``."""
        rank, world = shard
        for start in range(rank * batch_size, len(self.labels), world * batch_size):
            yield self.normalise(self.images[start : start + batch_size]), self.labels[start : start + batch_size]

    def all(self) -> Batch:
        return self.normalise(self.images), self.labels


class Indexed(Dataset):
    """``(x, y, index)`` from a dataset of ``(x, y)``: the index keys the teacher-logit cache."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        x, y = self.dataset[index]
        return x, y, index


class _EpochBatches:
    """The batch sampler of a :class:`LoaderSource`: each ``iter`` is one epoch of an
    :class:`EpochOrder`'s permutation, starting ``skip`` batches in (to resume mid-epoch).
    It records the generator state its epoch was drawn from, since a DataLoader's workers
    prefetch ahead of the batches actually consumed."""

    def __init__(self, order: EpochOrder):
        self.order, self.skip, self.epoch_state = order, 0, order.generator.get_state()

    def __iter__(self):
        order = self.order
        self.epoch_state = order.generator.get_state()
        perm = torch.randperm(order.size, generator=order.generator)
        skip, self.skip = self.skip, 0
        per_rank = order.batch_size // order.world_size
        for b in range(skip, order.batches_per_epoch):
            batch = perm[b * order.batch_size : (b + 1) * order.batch_size]
            yield batch[order.rank * per_rank : (order.rank + 1) * per_rank].tolist()

    def __len__(self) -> int:
        return self.order.batches_per_epoch


class LoaderSource:
    """Shuffled minibatches from a map-style dataset through a DataLoader with persistent
    workers, in the order of an :class:`EpochOrder`. The dataset gives ``(x, y)``, or
    ``(x, y, index)`` when its images are fixed (see :class:`Indexed`)."""

    def __init__(self, dataset: Dataset, batch_size: int, device: torch.device, num_workers: int,
                 shard: tuple[int, int] = (0, 1), eval_batch_size: int = 64):
        self.dataset, self.device, self.num_workers = dataset, device, num_workers
        self.eval_batch_size = eval_batch_size
        self.order = EpochOrder(len(dataset), batch_size, shard)
        self.batch_size = self.order.batch_size
        self.sampler = _EpochBatches(self.order)
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, num_workers=num_workers,
                                 pin_memory=device.type == "cuda", persistent_workers=num_workers > 0)
        self.reset(0)

    def __len__(self) -> int:
        return len(self.dataset)

    def reset(self, seed: int) -> None:
        self.order.reset(seed)
        self.sampler.epoch_state, self.sampler.skip = self.order.generator.get_state(), 0
        self._it, self.consumed = None, 0  # workers start on the first batch, not here

    def state_dict(self) -> dict:
        """The generator state the current epoch is drawn from and the batches consumed."""
        return {"generator": self.sampler.epoch_state, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.order.generator.set_state(state["generator"])
        self.consumed = int(state["consumed"])
        if self.consumed >= self.order.batches_per_epoch:  # that epoch was finished: start the next
            torch.randperm(self.order.size, generator=self.order.generator)
            self.consumed = 0
        self.sampler.epoch_state, self.sampler.skip = self.order.generator.get_state(), self.consumed
        self._it = None

    def next(self) -> TrainBatch:
        batch = None if self._it is None else next(self._it, None)
        if batch is None:  # first call, or the epoch ran out
            self.consumed = self.sampler.skip
            self._it = iter(self.loader)
            batch = next(self._it)
        self.consumed += 1
        x, y, *index = batch
        index = index[0] if index else None
        key = None if index is None else index.to(self.device, non_blocking=True)
        return TrainBatch(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), index, key)

    def batches(self, batch_size: int | None = None, shard: tuple[int, int] = (0, 1)) -> Iterator[Batch]:
        """Every image once, in order; with ``shard=(r, w)`` only batches ``r, r + w, …``."""
        rank, world = shard
        batch_size = batch_size or self.eval_batch_size
        mine = [i for i in range(len(self.dataset)) if (i // batch_size) % world == rank]
        dataset = self.dataset if world == 1 else Subset(self.dataset, mine)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=self.num_workers)
        for x, y, *_ in loader:
            yield x.to(self.device), y.to(self.device)


@dataclass
class Task:
    """What the env trains on (``source``, ``heldout``) and what it evaluates on (``target``).

    When the source images are files read with fixed transforms, ``cached_images`` gives
    them all as ``(x, y, index)`` and ``teacher_cache_key`` names them: the frozen teacher's
    logits are then cached on disk under that key. In-memory sources (``TensorSource``) are
    cached in memory instead, keyed by their index.
    """

    name: str
    num_classes: int
    source: TensorSource | LoaderSource
    heldout: Batch
    target: TensorSource | LoaderSource
    teacher_cache_key: str | None = None
    cached_images: Dataset | None = None
    source_eval: TensorSource | None = None  # held-out synthetic images, for evaluation only
    kind: str = "classification"  # or "segmentation": labels are (H, W) maps, 255 ignored
    class_names: tuple[str, ...] | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Full training batches in one pass over the source (the partial tail is dropped)."""
        return max(1, len(self.source) // self.source.batch_size)


@lru_cache(maxsize=4)
def _mnist(size: int) -> tuple[np.ndarray, np.ndarray]:
    return load_mnist_target(size)


def default_cache_dir() -> str:
    return os.environ.get("ASG_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "asg-gym"))


def _rendered_splits(images: np.ndarray, labels: np.ndarray, source_size: int, batch_size: int, device: torch.device,
                     mean: Stats, std: Stats, shard: tuple[int, int]) -> tuple[TensorSource, Batch, TensorSource | None]:
    """One rendered set cut in order: the training source, one held-out batch (the reward's), and
    whatever follows for ``synthetic_*`` evaluation (None when nothing does)."""
    n = source_size + batch_size
    source = TensorSource(images[:source_size], labels[:source_size], batch_size, device, mean, std, shard)
    heldout = TensorSource(images[source_size:n], labels[source_size:n], batch_size, device, mean, std).all()
    source_eval = TensorSource(images[n:], labels[n:], batch_size, device, mean, std) if len(images) > n else None
    return source, heldout, source_eval


@dataclass(frozen=True)
class TaskOptions:
    """The trainer's settings that a task builder may use (each takes what it needs)."""

    image_size: int
    batch_size: int
    device: torch.device
    mean: Stats
    std: Stats
    data_root: str | None
    source_size: int
    target_eval_size: int
    synthetic_eval_size: int
    label_dilation: int
    num_workers: int
    shard: tuple[int, int] = (0, 1)
    source_root: str | None = None
    target_root: str | None = None
    render_seed: int = 0


# Registered task builders by name, each from the run's TaskOptions: a new syn→real dataset is
# one entry (its Task.kind names the kind, asg_env.training.kinds, that trains and measures it).
TASKS: dict[str, Callable[[TaskOptions], Task]] = {}


def register_task(name: str) -> Callable[[Callable[[TaskOptions], Task]], Callable[[TaskOptions], Task]]:
    """Register a task builder under ``name`` (the trainer's ``task`` setting)."""
    def register(builder: Callable[[TaskOptions], Task]) -> Callable[[TaskOptions], Task]:
        TASKS[name] = builder
        return builder
    return register


@register_task("syndigits")
def make_syndigits_task(o: TaskOptions) -> Task:
    """Rendered digits (source, then the held-out batch, then ``synthetic_eval_size`` images
    for evaluation) and a fixed class-shuffled subset of real MNIST (target)."""
    if o.source_size < o.batch_size:
        raise UserInputError(f"source_size={o.source_size} is smaller than one training batch ({o.batch_size})")
    count = o.source_size + o.batch_size + o.synthetic_eval_size
    images, labels = load_syndigits(o.data_root or default_cache_dir(), count, o.image_size, o.render_seed)
    source, heldout, source_eval = _rendered_splits(images, labels, o.source_size, o.batch_size, o.device, o.mean, o.std,
                                                    o.shard)
    tx, ty = _mnist(o.image_size)
    keep = np.random.default_rng(0).permutation(len(ty))[: o.target_eval_size or len(ty)]
    target = TensorSource(tx[keep], ty[keep], o.batch_size, o.device, o.mean, o.std)
    return Task("SynDigits", 10, source, heldout, target, source_eval=source_eval)


@register_task("digitscenes")
def make_digitscenes_task(o: TaskOptions) -> Task:
    """Synthetic digit scenes (source, then the held-out batch, then ``synthetic_eval_size``
    scenes for evaluation) and the first ``target_eval_size`` of the real-MNIST scenes (target,
    ``REAL_SCENES`` in all; 0: all of them), 11 classes (background + digits).
    The target is rendered from its own seed, so no background is shared with the source.
    Both label sets are dilated by ``label_dilation`` pixels (0: the strokes alone)."""
    from asg_env.tasks.digitscenes import CLASSES, REAL_SCENES, dilate_labels, load_digit_scenes

    if o.source_size < o.batch_size:
        raise UserInputError(f"source_size={o.source_size} is smaller than one training batch ({o.batch_size})")
    root = o.data_root or default_cache_dir()
    images, labels = load_digit_scenes(root, "synthetic", o.source_size + o.batch_size + o.synthetic_eval_size,
                                       o.image_size, seed=o.render_seed)
    labels = dilate_labels(labels, o.label_dilation)
    source, heldout, source_eval = _rendered_splits(images, labels, o.source_size, o.batch_size, o.device, o.mean, o.std,
                                                    o.shard)
    tx, ty = load_digit_scenes(root, "real", min(o.target_eval_size or REAL_SCENES, REAL_SCENES), o.image_size, seed=1)
    ty = dilate_labels(ty, o.label_dilation)
    target = TensorSource(tx, ty, o.batch_size, o.device, o.mean, o.std)
    return Task("SynDigitScenes", len(CLASSES), source, heldout, target, source_eval=source_eval,
                kind="segmentation", class_names=CLASSES)


@register_task("gta5")
def make_gta5_cityscapes_task(o: TaskOptions) -> Task:
    """GTA5 with the paper's augmentation (source; ``batch_size`` images, fixed by a seeded
    draw and centre-cropped, are held out for the reward) and the Cityscapes validation split
    at its own resolution (target, evaluation only, two images per batch)."""
    from asg_env.tasks.gta5_cityscapes import _LUT, CITYSCAPES_CLASSES, cityscapes_val_pairs, gta5_pairs

    return _files_segmentation_task("GTA5→Cityscapes", "GTA5", CITYSCAPES_CLASSES, gta5_pairs(o.data_root),
                                    cityscapes_val_pairs(o.data_root), _LUT, None, 2, o)


def _files_segmentation_task(name: str, source_name: str, classes: tuple[str, ...], pairs: list, target_pairs: list,
                             lut: np.ndarray, target_height: int | None, eval_batch_size: int, o: TaskOptions) -> Task:
    """Segmentation from (image, label) files: the paper's augmentation on the source, whose
    ``batch_size`` images drawn by a seeded permutation and centre-cropped are held out for the
    reward, and the target resized to ``target_height`` (its own size when None)."""
    from asg_env.tasks.gta5_cityscapes import EvalTransform, SegmentationFiles, TrainTransform

    image_size, batch_size, device, mean, std = o.image_size, o.batch_size, o.device, o.mean, o.std
    if len(pairs) < 2 * batch_size:
        raise UserInputError(f"{source_name} has {len(pairs)} images; it needs at least {2 * batch_size} "
                             f"(one training batch plus the held-out batch of {batch_size})")
    held = set(torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))[:batch_size].tolist())
    heldout_set = SegmentationFiles([pairs[i] for i in sorted(held)], EvalTransform(image_size, mean, std, crop=image_size),
                                    lut)
    hx, hy = zip(*(heldout_set[i] for i in range(len(heldout_set))))
    heldout = (torch.stack(hx).to(device), torch.stack(hy).to(device))
    train = SegmentationFiles([p for i, p in enumerate(pairs) if i not in held], TrainTransform(image_size, mean, std), lut)
    target: Dataset = SegmentationFiles(target_pairs, EvalTransform(target_height, mean, std), lut)
    if 0 < o.target_eval_size < len(target):
        keep = torch.randperm(len(target), generator=torch.Generator().manual_seed(0))[:o.target_eval_size]
        target = Subset(target, keep.tolist())
    return Task(name, len(classes), LoaderSource(train, batch_size, device, o.num_workers, o.shard),
                heldout, LoaderSource(target, batch_size, device, o.num_workers, eval_batch_size=eval_batch_size),
                kind="segmentation", class_names=classes)


@register_task("segfolder")
def make_segfolder_task(o: TaskOptions) -> Task:
    """Your own segmentation data (:mod:`asg_env.tasks.folders`): GTA5's recipe on the source
    folder; the target images resized to ``image_size`` high and evaluated one at a time (so
    they may differ in width)."""
    from asg_env.tasks.folders import segmentation_folder

    classes, pairs, lut = segmentation_folder(o.source_root, "source_root")
    target_classes, target_pairs, _ = segmentation_folder(o.target_root, "target_root")
    if target_classes != classes:
        raise UserInputError(f"source_root and target_root list different classes in classes.txt: "
                             f"{', '.join(classes)} against {', '.join(target_classes)}")
    return _files_segmentation_task("SegFolder", "source_root", classes, pairs, target_pairs, lut, o.image_size, 1, o)


@register_task("visda")
def make_visda_task(o: TaskOptions) -> Task:
    """VisDA-17 train (synthetic) and validation (real) splits, preprocessed as the official
    ``train.py`` does for both: ``Resize(size)``, ``CenterCrop(size)``, no random augmentation.

    Fixed transforms make the frozen teacher's logits a pure function of the image, so the
    task names its source images for the on-disk teacher cache.
    """
    train = VisDA17(o.data_root, "train", _fixed_transform(o.image_size, o.mean, o.std))
    target = VisDA17(o.data_root, "validation")
    return _files_classification_task("VisDA-17", "VisDA-17 train split", VISDA_CLASSES, train, target, "visda17-train", o)


def _fixed_transform(image_size: int, mean: Stats, std: Stats) -> T.Compose:
    return T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToImage(),
                      T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])


def _files_classification_task(name: str, source_name: str, classes: tuple[str, ...], train: Dataset, target: Dataset,
                               cache_prefix: str, o: TaskOptions) -> Task:
    """Classification from image files with the official fixed transforms on both sides; the
    source's ``batch_size`` images drawn by a seeded permutation are held out for the reward,
    and the rest are named for the on-disk teacher cache."""
    batch_size, device = o.batch_size, o.device
    if len(train) < 2 * batch_size:
        raise UserInputError(
            f"{source_name} has {len(train)} images; it needs at least {2 * batch_size} "
            f"(one training batch plus the held-out batch of {batch_size})"
        )
    target.transform = train.transform
    held_idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:batch_size].tolist()
    train_idx = sorted(set(range(len(train))) - set(held_idx))
    hx, hy = zip(*(train[i] for i in held_idx))
    heldout = (torch.stack(hx).to(device), torch.tensor(hy, device=device))
    if 0 < o.target_eval_size < len(target):
        keep = torch.randperm(len(target), generator=torch.Generator().manual_seed(0))[:o.target_eval_size]
        target = Subset(target, keep.tolist())
    indexed = Indexed(train)
    source = LoaderSource(Subset(indexed, train_idx), batch_size, device, o.num_workers, o.shard)
    key = f"{cache_prefix}-{train.fingerprint()}-size{o.image_size}-mean{o.mean}-std{o.std}"
    return Task(name, len(classes), source, heldout, LoaderSource(target, batch_size, device, o.num_workers),
                teacher_cache_key=key, cached_images=indexed, class_names=tuple(classes))


@register_task("imagefolder")
def make_imagefolder_task(o: TaskOptions) -> Task:
    """Your own classification data (:mod:`asg_env.tasks.folders`) with VisDA-17's recipe."""
    from asg_env.tasks.folders import ImageFolderSplit, same_classes

    train = ImageFolderSplit(o.source_root, "source_root", _fixed_transform(o.image_size, o.mean, o.std))
    target = ImageFolderSplit(o.target_root, "target_root")
    same_classes(train.classes, target.classes)
    key = f"imagefolder-{os.path.abspath(o.source_root)}"
    return _files_classification_task("ImageFolder", "source_root", train.classes, train, target, key, o)


def build_task(name: str, options: TaskOptions) -> Task:
    if name not in TASKS:
        raise UserInputError(f"unknown task {name!r}; choose one of {', '.join(map(repr, TASKS))}")
    return TASKS[name](options)
