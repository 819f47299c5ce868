"""GTA5 (synthetic source) and Cityscapes (real target) for semantic segmentation, read from
the layouts they are released in, under one data root::

    ROOT/gta5/images/00001.png           # 1914×1052 game frames
    ROOT/gta5/labels/00001.png           # Cityscapes label ids (0-33) per pixel
    ROOT/cityscapes/leftImg8bit/val/<city>/<name>_leftImg8bit.png
    ROOT/cityscapes/gtFine/val/<city>/<name>_gtFine_labelIds.png

Both label sets are mapped to the 19 Cityscapes training ids with the standard table; every
other id becomes 255, which the loss and mIoU ignore.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from asg_env.errors import UserInputError

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
# Cityscapes label id → train id (cityscapesscripts' labels.py); the rest → 255.
ID_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                  26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
_LUT = np.full(256, 255, dtype=np.uint8)
for _id, _train in ID_TO_TRAIN_ID.items():
    _LUT[_id] = _train
LAYOUT = ("expected ROOT/gta5/images/*.png with ROOT/gta5/labels/*.png of the same names, and "
          "ROOT/cityscapes/leftImg8bit/val/<city>/*_leftImg8bit.png with "
          "ROOT/cityscapes/gtFine/val/<city>/*_gtFine_labelIds.png")


def to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Cityscapes label ids → train ids 0-18, 255 for the ignored ones."""
    return _LUT[label_ids]


def resolve_root(root: str | None) -> str:
    root = root or os.environ.get("ASG_DATA")
    if not root:
        raise UserInputError(f"GTA5→Cityscapes needs a data root (data_root=... or $ASG_DATA); {LAYOUT}")
    for sub in ("gta5/images", "gta5/labels", "cityscapes/leftImg8bit/val", "cityscapes/gtFine/val"):
        if not os.path.isdir(os.path.join(root, sub)):
            raise UserInputError(f"data root {root!r} is missing {sub}/; {LAYOUT}")
    return root


def _open(path: str, mode: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert(mode) if mode == "RGB" else img.copy()
    except (OSError, UnidentifiedImageError) as exc:
        raise UserInputError(f"corrupt image {path}: {exc}") from exc


class SegmentationFiles(Dataset):
    """(image, train-id label) pairs from files, through ``transform(image, label)`` which
    takes PIL images and returns tensors; ``lut`` maps the label files' values to train ids
    (Cityscapes label ids by default)."""

    def __init__(self, pairs: list[tuple[str, str]], transform, lut: np.ndarray = _LUT):
        self.pairs, self.transform, self.lut = pairs, transform, lut  # lut: label file value → train id

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        image_path, label_path = self.pairs[index]
        image, label = _open(image_path, "RGB"), _open(label_path, "L")
        if label.mode not in ("L", "P") or image.size != label.size:
            raise UserInputError(f"{label_path} is not a {image.size[0]}×{image.size[1]} map of label ids")
        return self.transform(image, Image.fromarray(self.lut[np.asarray(label)]))

    def image(self, index: int) -> torch.Tensor:
        """The transformed image alone: its label file is not opened (domain adaptation reads
        target images only)."""
        image = _open(self.pairs[index][0], "RGB")
        return self.transform(image, Image.new("L", image.size, 255))[0]


def gta5_pairs(root: str | None) -> list[tuple[str, str]]:
    root = resolve_root(root)
    images = sorted(glob.glob(os.path.join(root, "gta5", "images", "*.png")))
    if not images:
        raise UserInputError(f"no images in {os.path.join(root, 'gta5', 'images')}; {LAYOUT}")
    pairs = []
    for image in images:
        label = os.path.join(root, "gta5", "labels", os.path.basename(image))
        if not os.path.isfile(label):
            raise UserInputError(f"GTA5 image {image} has no label file {label}")
        pairs.append((image, label))
    return pairs


def cityscapes_val_pairs(root: str | None) -> list[tuple[str, str]]:
    root = resolve_root(root)
    images = sorted(glob.glob(os.path.join(root, "cityscapes", "leftImg8bit", "val", "*", "*_leftImg8bit.png")))
    if not images:
        raise UserInputError(f"no *_leftImg8bit.png under {os.path.join(root, 'cityscapes', 'leftImg8bit', 'val')}; {LAYOUT}")
    pairs = []
    for image in images:
        city, name = os.path.basename(os.path.dirname(image)), os.path.basename(image)
        label = os.path.join(root, "cityscapes", "gtFine", "val", city, name.replace("_leftImg8bit.png", "_gtFine_labelIds.png"))
        if not os.path.isfile(label):
            raise UserInputError(f"Cityscapes image {image} has no label file {label}")
        pairs.append((image, label))
    return pairs


class TrainTransform:
    """The paper's augmentation (§3.2): a random scale in [0.75, 1.25] of the image resized to
    ``size`` pixels high, a random ``size × size`` crop (padded with label 255 where the
    scaled image is smaller) and a horizontal flip half of the time."""

    def __init__(self, size: int, mean, std, scales=(0.75, 1.25)):
        self.size, self.scales = size, scales
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: Image.Image, label: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng(torch.randint(2**31, ()).item())  # per-worker torch seeding reaches here
        s = rng.uniform(*self.scales) * self.size / image.size[1]
        w, h = max(1, round(image.size[0] * s)), max(1, round(image.size[1] * s))
        image, label = image.resize((w, h), Image.BILINEAR), label.resize((w, h), Image.NEAREST)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
        y = torch.from_numpy(np.asarray(label, dtype=np.int64))
        ph, pw = max(self.size - h, 0), max(self.size - w, 0)
        x = torch.nn.functional.pad(x, (0, pw, 0, ph))
        y = torch.nn.functional.pad(y, (0, pw, 0, ph), value=255)
        top, left = rng.integers(0, y.shape[0] - self.size + 1), rng.integers(0, y.shape[1] - self.size + 1)
        x, y = x[:, top : top + self.size, left : left + self.size], y[top : top + self.size, left : left + self.size]
        if rng.random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return (x - self.mean) / self.std, y


class EvalTransform:
    """Resize to ``height`` pixels high (the image's own size when None), no augmentation."""

    def __init__(self, height: int | None, mean, std, crop: int | None = None):
        self.height, self.crop = height, crop
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: Image.Image, label: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        if self.height is not None and image.size[1] != self.height:
            w = max(1, round(image.size[0] * self.height / image.size[1]))
            image, label = image.resize((w, self.height), Image.BILINEAR), label.resize((w, self.height), Image.NEAREST)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
        y = torch.from_numpy(np.asarray(label, dtype=np.int64))
        if self.crop is not None:  # a centred square, for the fixed held-out batch
            top, left = max((y.shape[0] - self.crop) // 2, 0), max((y.shape[1] - self.crop) // 2, 0)
            x, y = x[:, top : top + self.crop, left : left + self.crop], y[top : top + self.crop, left : left + self.crop]
        return (x - self.mean) / self.std, y
