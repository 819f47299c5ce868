"""Your own syn→real data from folders.

Classification (``ImageFolder-v0``), torchvision's ``ImageFolder`` layout on both sides::

    SOURCE_ROOT/<class>/<image>     # synthetic (training)
    TARGET_ROOT/<class>/<image>     # real (evaluation only), the same class folder names

Segmentation (``SegFolder-v0``), on both sides::

    ROOT/classes.txt                # one class name per line; line i is label value i
    ROOT/images/<name>.<ext>        # RGB images
    ROOT/labels/<name>.png          # one label value per pixel; 255 (or any value ≥ the class count) is ignored

Class names are matched by name: a class on one side only is one error, as is every other
layout problem.
"""

from __future__ import annotations

import glob
import hashlib
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from asg_env.errors import UserInputError

CLASSIFICATION_LAYOUT = "expected ROOT/<class>/<image> folders (torchvision's ImageFolder layout)"
SEGMENTATION_LAYOUT = ("expected ROOT/classes.txt (a class name per line), ROOT/images/<name>.<ext> and "
                       "ROOT/labels/<name>.png")


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMG_EXTENSIONS)


def _root(root: str | None, setting: str, layout: str) -> str:
    if not root:
        raise UserInputError(f"{setting} is needed: the folder of your images; {layout}")
    if not os.path.isdir(root):
        raise UserInputError(f"{setting} {root!r} is not a folder; {layout}")
    return root


def fingerprint(paths: list[str], labels: list[int], base: str) -> str:
    """A short hash of a file list (paths, labels, sizes and times), in order: cheap to compute
    at every start, and it changes when a file is replaced."""
    h = hashlib.sha1()
    for path, label in zip(paths, labels):
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, base)}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _header(path: str) -> tuple[tuple[int, int], str]:
    """An image's size and mode from its header alone, so a corrupt file is found before any
    training starts (and not as a DataLoader worker's traceback)."""
    try:
        with Image.open(path) as img:
            return img.size, img.mode
    except (OSError, UnidentifiedImageError) as exc:
        raise UserInputError(f"corrupt image {path}: {exc}") from None


def load_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise UserInputError(f"corrupt image {path}: {exc}") from exc


def class_folders(root: str | None, setting: str) -> list[str]:
    root = _root(root, setting, CLASSIFICATION_LAYOUT)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise UserInputError(f"{setting} {root!r} holds no class folders; {CLASSIFICATION_LAYOUT}")
    return classes


def same_classes(source: list[str], target: list[str]) -> None:
    if source != target:
        only = lambda a, b: ", ".join(sorted(set(a) - set(b))) or "none"  # noqa: E731
        raise UserInputError(f"the source and target class folders differ: only in source_root: {only(source, target)}; "
                             f"only in target_root: {only(target, source)}")


class LabelledImages(Dataset):
    """Images listed as (path, label) in ``samples``, read as RGB and passed through
    ``transform``; ``folder`` is where they were found (it enters the fingerprint)."""

    samples: list[tuple[str, int]]
    transform = None
    folder: str

    def __len__(self) -> int:
        return len(self.samples)

    def fingerprint(self) -> str:
        return fingerprint(*map(list, zip(*self.samples)), self.folder)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        img = load_rgb(path)
        return (self.transform(img) if self.transform else img), label

    def image(self, index: int):
        """The transformed image alone (domain adaptation reads target images only)."""
        img = load_rgb(self.samples[index][0])
        return self.transform(img) if self.transform else img


class ImageFolderSplit(LabelledImages):
    """``ROOT/<class>/<image>`` as (image tensor, label) pairs, labels by the sorted class names."""

    def __init__(self, root: str | None, setting: str, transform=None):
        self.classes = class_folders(root, setting)
        self.folder, self.transform = root, transform
        self.samples = [(path, label) for label, name in enumerate(self.classes)
                        for path in sorted(glob.glob(os.path.join(root, name, "**", "*"), recursive=True))
                        if _is_image(path)]
        for path, _ in self.samples:
            _header(path)
        empty = [name for label, name in enumerate(self.classes) if not any(lab == label for _, lab in self.samples)]
        if empty:
            raise UserInputError(f"{setting} {root!r}: no images in class folder(s) {', '.join(empty)}; "
                                 f"{CLASSIFICATION_LAYOUT}")


def segmentation_folder(root: str | None, setting: str) -> tuple[tuple[str, ...], list[tuple[str, str]], np.ndarray]:
    """The class names, the (image, label) file pairs, and the table that maps label values to
    class indices (255 for values at or above the class count)."""
    root = _root(root, setting, SEGMENTATION_LAYOUT)
    class_file = os.path.join(root, "classes.txt")
    if not os.path.isfile(class_file):
        raise UserInputError(f"{setting} {root!r} has no classes.txt; {SEGMENTATION_LAYOUT}")
    with open(class_file) as fh:
        classes = tuple(line.strip() for line in fh if line.strip())
    if not 1 < len(classes) < 255:
        raise UserInputError(f"{class_file} names {len(classes)} classes; it needs 2 to 254, one a line")
    images = sorted(p for p in glob.glob(os.path.join(root, "images", "*")) if _is_image(p))
    if not images:
        raise UserInputError(f"no images in {os.path.join(root, 'images')}; {SEGMENTATION_LAYOUT}")
    pairs = []
    for image in images:
        label = os.path.join(root, "labels", os.path.splitext(os.path.basename(image))[0] + ".png")
        if not os.path.isfile(label):
            raise UserInputError(f"image {image} has no label file {label}; {SEGMENTATION_LAYOUT}")
        (size, _), (label_size, mode) = _header(image), _header(label)
        if mode not in ("L", "P") or label_size != size:
            raise UserInputError(f"{label} is not a {size[0]}×{size[1]} single-channel map of label values")
        pairs.append((image, label))
    lut = np.full(256, 255, dtype=np.uint8)
    lut[: len(classes)] = np.arange(len(classes))
    return classes, pairs, lut
