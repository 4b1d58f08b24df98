"""Users' images -> the 28x28 light-on-dark arrays the models were trained on (Pillow and numpy, no torch)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.modelcard import IMAGE_SIZE

DIGIT_BOX = 20  # MNIST digits are scaled to fit 20x20, then centred by mass in 28x28
WORK_SIDE = 1024  # larger images are shrunk to this first; the result is 28 pixels anyway
MIN_CONTRAST = 0.1  # ink (or item) must differ from the background by this much of the full range
DIGIT_INK = 0.05  # after stretching ink to 1: what counts as a stroke when cropping
FASHION_TRIM = 0.05  # Fashion-MNIST trims edges within 5 % of the background colour
NO_CONTENT = "no content (a blank image, or too little contrast)"


class ImageError(ValueError):
    """A file that cannot be turned into a model input; the message says why, in a few words."""


def open_image(path: str | os.PathLike) -> Image.Image:
    """The decoded image, upright (EXIF orientation applied); Pillow's decompression-bomb limit enforced."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise ImageError("empty file")
    kind = "image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                kind = f"{img.format} image"
                if img.format == "JPEG":
                    img.draft(None, (WORK_SIDE, WORK_SIDE))  # let the decoder skip detail we would discard
                img.load()
                return ImageOps.exif_transpose(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"refused as a possible decompression bomb ({e})") from None
    except (PermissionError, IsADirectoryError) as e:
        raise ImageError(f"cannot read it ({e.strerror})") from None
    except UnidentifiedImageError:
        raise ImageError("not an image (Pillow cannot identify its format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise ImageError(f"truncated or corrupt {kind} ({e})") from None


def composite(luma: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Flatten onto the background the content implies: transparent pixels are background, so it is
    white under dark (opaque) content and black under light content."""
    weight = alpha.sum()
    content_luma = (luma * alpha).sum() / weight if weight else 0.0
    background = 1.0 if content_luma < 0.5 else 0.0
    return luma * alpha + background * (1 - alpha)


def to_grey(img: Image.Image) -> np.ndarray:
    """float32 (H, W) in [0, 1], 0 = black, from any mode: palette, 16-bit, with or without alpha."""
    if img.mode.startswith("I;16"):
        return np.asarray(img, np.float32) / 65535
    if img.mode == "I":
        a = np.asarray(img, np.float32)
        return np.clip(a / (65535 if a.max() > 255 else 255), 0, 1)
    if img.mode == "F":
        a = np.nan_to_num(np.asarray(img, np.float32))
        return np.clip(a if a.max() <= 1 else a / 255, 0, 1)
    try:
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
            la = np.asarray(img.convert("RGBA").convert("LA"), np.float32) / 255
            return composite(la[..., 0], la[..., 1])
        return np.asarray(img.convert("L"), np.float32) / 255
    except (ValueError, OSError) as e:
        raise ImageError(f"cannot convert {img.mode} pixels to greyscale ({e})") from None


def resize(a: np.ndarray, width: int, height: int) -> np.ndarray:
    img = Image.fromarray(np.ascontiguousarray(a, np.float32), "F")
    return np.asarray(img.resize((width, height), Image.Resampling.LANCZOS), np.float32)


def shrink(grey: np.ndarray) -> np.ndarray:
    h, w = grey.shape
    scale = WORK_SIDE / max(h, w)
    return resize(grey, max(1, round(w * scale)), max(1, round(h * scale))) if scale < 1 else grey


def border(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])


def light_on_dark(grey: np.ndarray) -> tuple[np.ndarray, float]:
    """Inverted when the background (median of the border pixels) is light; returns (image, background)."""
    background = float(np.median(border(grey)))
    if background > 0.5:
        return 1 - grey, 1 - background
    return grey, background


def without_background(x: np.ndarray, background: float, scale: float) -> np.ndarray:
    """(x - background) / scale in [0, 1], less the paper's noise (3 robust sigmas, measured on the border)."""
    x = (x - background) / scale
    floor = min(0.5, 3 * 1.4826 * float(np.median(np.abs(border(x)))))
    return np.clip((x - floor) / (1 - floor), 0, 1)


def content_box(mask: np.ndarray) -> tuple[slice, slice]:
    """Bounding box of `mask`, counting only 2x2 solid blocks when there are any: specks are not content."""
    if not mask.any():
        raise ImageError(NO_CONTENT)
    solid = mask[:-1, :-1] & mask[1:, :-1] & mask[:-1, 1:] & mask[1:, 1:]
    grow = 2 if solid.any() else 1
    mask = solid if solid.any() else mask
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return slice(rows[0], rows[-1] + grow), slice(cols[0], cols[-1] + grow)


def fit(a: np.ndarray, side: int) -> np.ndarray:
    """Resized so that its longer side is `side`, keeping the aspect ratio."""
    h, w = a.shape
    scale = side / max(h, w)
    return np.clip(resize(a, max(1, round(w * scale)), max(1, round(h * scale))), 0, 1)


def paste(patch: np.ndarray, top: int, left: int) -> np.ndarray:
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    h, w = patch.shape
    out[top:top + h, left:left + w] = patch
    return out


def digit(grey: np.ndarray) -> np.ndarray:
    """The MNIST recipe: light ink on black, cropped to the strokes, fitted to 20x20, centred by mass."""
    x, background = light_on_dark(shrink(grey))
    ink = float(np.percentile(x, 99.9))
    if ink - background < MIN_CONTRAST:
        raise ImageError(NO_CONTENT)
    x = without_background(x, background, ink - background)
    patch = fit(x[content_box(x > DIGIT_INK)], DIGIT_BOX)
    h, w = patch.shape
    ys, xs = np.indices(patch.shape)
    mass = patch.sum()
    # MNIST's centre of mass sits at pixel (14, 14), not at the geometric centre 13.5
    top = int(np.clip(round(IMAGE_SIZE / 2 - (ys * patch).sum() / mass), 0, IMAGE_SIZE - h))
    left = int(np.clip(round(IMAGE_SIZE / 2 - (xs * patch).sum() / mass), 0, IMAGE_SIZE - w))
    return paste(patch, top, left)


def fashion(grey: np.ndarray) -> np.ndarray:
    """The Fashion-MNIST recipe: item light on black, trimmed to the item, longer side 28, centred."""
    x, background = light_on_dark(shrink(grey))
    if float(np.percentile(x, 99.9)) - background < MIN_CONTRAST:
        raise ImageError(NO_CONTENT)
    x = without_background(x, background, 1 - background)
    patch = fit(x[content_box(x > FASHION_TRIM)], IMAGE_SIZE)
    h, w = patch.shape
    # an odd margin leaves its extra pixel above and to the left, as in Fashion-MNIST
    return paste(patch, (IMAGE_SIZE - h + 1) // 2, (IMAGE_SIZE - w + 1) // 2)


RECIPES = {"digit": digit, "fashion": fashion}  # keyed by modelcard.PREPROCESS_RECIPES


def prepare(path: str | os.PathLike, recipe: str | None) -> np.ndarray:
    """float32 (28, 28) in [0, 1], light on dark, of one file; recipe None (`--raw`) only converts to grey."""
    grey = to_grey(open_image(path))
    if recipe is not None:
        return RECIPES[recipe](grey)
    if grey.shape != (IMAGE_SIZE, IMAGE_SIZE):
        h, w = grey.shape
        raise ImageError(f"is {w}x{h} pixels; --raw takes {IMAGE_SIZE}x{IMAGE_SIZE} images only")
    return grey
