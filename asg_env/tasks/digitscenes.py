"""SynDigitScenes: scenes of several digits, for semantic segmentation on a CPU.

* Source (synthetic): two or three digits rendered from matplotlib's fonts, each in its own
  quadrant of one random background (flat, gradient or smoothed noise), with exact pixel
  labels: class ``d + 1`` where the glyph covers at least half a pixel, background (0)
  elsewhere.
* Target (real): real MNIST digits pasted the same way onto random backgrounds in a random
  colour, each digit's pixels blended by its own ink; the label is ``d + 1`` where the ink is
  above half its maximum (a threshold of the real pixels), background elsewhere.
* Both label sets can be dilated (:func:`dilate_labels`, the task's ``label_dilation``): a
  digit's class then covers its strokes and the pixels within ``radius`` of them, so the
  labels are regions an FCN-8s at stride 8 can draw, not 2-3 px strokes it cannot.

Every scene draws from ``numpy.random.default_rng([seed, index])``, so a set is a pure function
of ``(kind, seed, count, size)``; it is rendered once, with a progress bar, and cached as
``.npz``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from asg_env.tasks.syndigits import _background, cached_render, digit_fonts, load_mnist_target

RENDER_VERSION = 1
CLASSES = ("background", *(str(d) for d in range(10)))
# The real target set: as many scenes as use each of the 5,000 MNIST digits once on average
# (2.5 digits a scene); scene i is the same whatever the count, so a smaller set is a prefix.
REAL_SCENES = 2000


def _foreground(rng: np.random.Generator, lum: float) -> np.ndarray:
    """A colour at least 0.35 away from the background's luminance."""
    target = rng.uniform(0, max(lum - 0.35, 0.0)) if lum > 0.5 else rng.uniform(min(lum + 0.35, 1.0), 1.0)
    return np.clip(target * 255 + rng.normal(0, 30, 3), 0, 255)


def _glyph(digit: int, cell: int, rng: np.random.Generator) -> np.ndarray:
    """A font-rendered digit's coverage in [0, 1], (cell, cell), drawn at 4x and downsampled."""
    canvas = 4 * cell
    fonts = digit_fonts()
    font = ImageFont.truetype(fonts[rng.integers(len(fonts))], int(canvas * rng.uniform(0.6, 0.95)))
    layer = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(layer)
    left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font)
    draw.text((canvas / 2 - (right - left) / 2 - left, canvas / 2 - (bottom - top) / 2 - top), str(digit), fill=255, font=font)
    layer = layer.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR)
    return np.asarray(layer.resize((cell, cell), Image.LANCZOS), dtype=np.float32) / 255.0


def _scene(size: int, rng: np.random.Generator, glyph) -> tuple[np.ndarray, np.ndarray]:
    background, lum = _background(rng, size)
    image = np.asarray(background, dtype=np.float32).copy()
    label = np.zeros((size, size), dtype=np.uint8)
    half = size // 2
    for quadrant in rng.permutation(4)[: rng.integers(2, 4)]:
        cell = int(half * rng.uniform(0.75, 1.0))
        y0 = (quadrant // 2) * half + rng.integers(0, half - cell + 1)
        x0 = (quadrant % 2) * half + rng.integers(0, half - cell + 1)
        digit = int(rng.integers(10))
        alpha = glyph(digit, cell, rng)
        colour = _foreground(rng, lum)
        patch = image[y0 : y0 + cell, x0 : x0 + cell]
        patch[:] = patch * (1 - alpha[..., None]) + colour * alpha[..., None]
        label[y0 : y0 + cell, x0 : x0 + cell][alpha >= 0.5] = digit + 1
    return np.clip(image, 0, 255).astype(np.uint8), label


def render_scenes(kind: str, count: int, size: int, seed: int, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``count`` scenes of ``kind`` (``"synthetic"`` or ``"real"``): images (N, size, size, 3)
    uint8 and labels (N, size, size) uint8 in 0-10."""
    if kind == "synthetic":
        glyph = _glyph
    elif kind == "real":
        mnist, digits = load_mnist_target(28)
        by_digit = [np.flatnonzero(digits == d) for d in range(10)]

        def glyph(digit: int, cell: int, rng: np.random.Generator) -> np.ndarray:
            ink = mnist[rng.choice(by_digit[digit]), :, :, 0]
            ink = np.asarray(Image.fromarray(ink).resize((cell, cell), Image.BILINEAR), dtype=np.float32)
            return ink / max(float(ink.max()), 1.0)
    else:
        raise ValueError(kind)
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    labels = np.empty((count, size, size), dtype=np.uint8)
    for i in tqdm(range(count), desc=f"rendering {kind} digit scenes ({size}px)", disable=not progress, leave=False):
        images[i], labels[i] = _scene(size, np.random.default_rng([seed, i]), glyph)
    return images, labels


def load_digit_scenes(cache_dir: str, kind: str, count: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scenes from ``cache_dir``, rendering and caching them on first use."""
    path = os.path.join(cache_dir, f"digitscenes-{kind}-v{RENDER_VERSION}-n{count}-s{size}-seed{seed}.npz")
    return cached_render(path, lambda: render_scenes(kind, count, size, seed))


def dilate_labels(labels: np.ndarray, radius: int) -> np.ndarray:
    """Grow every digit class (1-10) over the background within ``radius`` pixels (a square
    window, Chebyshev distance). Digit pixels keep their class; where two digits' margins meet,
    the lower class wins. ``radius=0`` returns the labels unchanged."""
    if radius < 0:
        raise ValueError(f"radius must be 0 or more, not {radius}")
    if radius == 0:
        return labels
    out = labels.copy()
    y = torch.from_numpy(labels)
    for digit_class in range(len(CLASSES) - 1, 0, -1):  # descending, so the lowest class is written last
        grown = F.max_pool2d((y == digit_class).float()[:, None], 2 * radius + 1, 1, radius)[:, 0].bool().numpy()
        out[grown & (labels == 0)] = digit_class
    return out
