"""VisDA-17 classification, read from the layout of the official release.

::

    ROOT/
      train/image_list.txt        # synthetic renderings (source): "relpath label" per line
      train/<class>/<file>.png
      validation/image_list.txt   # real COCO crops (target, evaluation only)
      validation/<class>/<file>.jpg

Paths in ``image_list.txt`` are relative to the split's folder. Labels are 0-11.
"""

from __future__ import annotations

import os

from asg_env.errors import UserInputError
from asg_env.tasks.folders import LabelledImages

VISDA_CLASSES = (
    "aeroplane", "bicycle", "bus", "car", "horse", "knife",
    "motorcycle", "person", "plant", "skateboard", "train", "truck",
)
LAYOUT = (
    "expected ROOT/train/image_list.txt and ROOT/validation/image_list.txt, "
    "each line 'relative/path.png label' with labels 0-11"
)


def resolve_root(root: str | None) -> str:
    """The VisDA root from the argument or ``$ASG_DATA``, checked for the expected layout."""
    root = root or os.environ.get("ASG_DATA")
    if not root:
        raise UserInputError(f"VisDA-17 needs a data root (data_root=... or $ASG_DATA); {LAYOUT}")
    for split in ("train", "validation"):
        if not os.path.isfile(os.path.join(root, split, "image_list.txt")):
            raise UserInputError(f"VisDA-17 root {root!r} is missing {split}/image_list.txt; {LAYOUT}")
    return root


class VisDA17(LabelledImages):
    """One split of VisDA-17 as (image tensor, label) pairs."""

    def __init__(self, root: str | None, split: str, transform=None):
        if split not in ("train", "validation"):
            raise UserInputError(f"unknown VisDA-17 split {split!r}")
        self.root = resolve_root(root)
        self.folder = os.path.join(self.root, split)
        self.transform = transform
        self.samples = self._read_list(os.path.join(self.folder, "image_list.txt"))

    def _read_list(self, list_file: str) -> list[tuple[str, int]]:
        samples = []
        with open(list_file) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                parts = line.split()
                try:
                    rel, label = " ".join(parts[:-1]), int(parts[-1])
                except (ValueError, IndexError):
                    raise UserInputError(f"{list_file}:{lineno}: cannot parse {line.strip()!r}; {LAYOUT}")
                if not rel or not 0 <= label < len(VISDA_CLASSES):
                    raise UserInputError(f"{list_file}:{lineno}: bad entry {line.strip()!r}; {LAYOUT}")
                path = os.path.join(self.folder, rel)
                if not os.path.isfile(path):
                    raise UserInputError(f"{list_file}:{lineno}: image not found: {path}")
                samples.append((path, label))
        if not samples:
            raise UserInputError(f"{list_file} lists no images; {LAYOUT}")
        return samples

