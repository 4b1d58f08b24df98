"""Users' images -> the arrays the models were trained on (Pillow and numpy, no torch): 28x28 light on dark for
the digit and fashion recipes, or any declared size, grey or colour, resized as they are (plain).

An image arrives as a path, bytes, a binary file object, a PIL image, a numpy array or nested lists of
numbers (rows of pixels, as JSON has them); every kind goes
through the same decoding checks and the same preprocessing, and every problem is an ImageError.
"""
from __future__ import annotations

import io
import os
import warnings
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from digitlens.errors import ImageError
from digitlens.limits import check_size, read_encoded
from digitlens.metadata import IMAGE_SIZE
from digitlens.text import first_line

FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")  # the only decoders Pillow may use
DIGIT_BOX = 20  # MNIST digits are scaled to fit 20x20, then centred by mass in 28x28
WORK_SIDE = 1024  # larger images are shrunk to this first; the result is 28 pixels anyway
MIN_CONTRAST = 0.1  # ink (or item) must differ from the background by this much of the full range
DIGIT_INK = 0.05  # after stretching ink to 1: what counts as a stroke when cropping
FASHION_TRIM = 0.05  # Fashion-MNIST trims edges within 5 % of the background colour
NO_CONTENT = "no content (a blank image, or too little contrast)"

ImageInput = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | Image.Image | np.ndarray | list


def image_extensions() -> set[str]:
    """File suffixes ('.png', ...) of the formats decode accepts: how folders are told to hold images."""
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in FORMATS}


def decode(data: bytes) -> Image.Image:
    """The decoded image, upright (EXIF orientation applied), from an allowed format within MAX_PIXELS."""
    kind = "image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # Pillow's notes on odd EXIF/ICC data
            with Image.open(io.BytesIO(data), formats=FORMATS) as img:
                kind = f"{img.format} image"
                if img.format == "JPEG":
                    img.draft(None, (WORK_SIDE, WORK_SIDE))  # let the decoder skip detail we would discard
                check_size(*img.size)
                img.load()
                return upright(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"refused as a possible decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"not an image in a supported format ({', '.join(FORMATS)})") from None
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, TypeError, KeyError, IndexError,
            OverflowError) as e:
        raise ImageError(f"truncated or corrupt {kind} ({first_line(e)})") from None


def upright(img: Image.Image) -> Image.Image:
    """`img` turned as its EXIF orientation says; itself, not a copy, when it needs no turning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pillow's notes on odd EXIF data
        turned = img.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9)
        return ImageOps.exif_transpose(img) if turned else img


def array_to_image(a: np.ndarray) -> Image.Image:
    """A numpy image (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), uint8 or float in [0, 1], as a PIL image."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageError(f"array of shape {a.shape}; give (H, W) grey or (H, W, 3|4) RGB/RGBA")
    check_size(a.shape[1], a.shape[0])  # before any copy
    if a.dtype == np.uint8:
        pixels = a
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ImageError("array holds NaN or infinite values")
        if a.min() < 0 or a.max() > 1:
            raise ImageError(f"float array values must lie in [0, 1] (found {a.min():g} to {a.max():g})")
        pixels = np.round(a.astype(np.float32) * 255).astype(np.uint8)
    else:
        raise ImageError(f"array of dtype {a.dtype}; give uint8 (0-255) or float (0-1)")
    mode = "L" if pixels.ndim == 2 else "RGB" if pixels.shape[2] == 3 else "RGBA"
    return Image.fromarray(np.ascontiguousarray(pixels), mode)


def nested_array(rows: list) -> np.ndarray:
    """Nested lists of numbers (rows of pixels, or of [r, g, b] values) as a float array."""
    try:
        return np.asarray(rows, dtype=np.float64)
    except (TypeError, ValueError):
        raise ImageError("not an array of numbers (rows of equal length, numbers only)") from None


def load(source: ImageInput) -> Image.Image:
    """Any accepted input as an upright PIL image."""
    if isinstance(source, list):
        source = nested_array(source)
    if isinstance(source, np.ndarray):
        return array_to_image(source)
    if isinstance(source, Image.Image):
        check_size(*source.size)
        try:
            return upright(source)
        except (OSError, ValueError, TypeError) as e:
            raise ImageError(f"cannot use this PIL image ({first_line(e)})") from None
    return decode(read_encoded(source))


def composite(luma: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Flatten onto the background the content implies: transparent pixels are background, so it is
    white under dark (opaque) content and black under light content. Works in place on both arrays."""
    weight = float(alpha.sum())
    content_luma = float(np.dot(luma.ravel(), alpha.ravel())) / weight if weight else 0.0
    luma *= alpha
    if content_luma < 0.5:  # white background: add 1 - alpha
        alpha -= 1
        luma -= alpha
    return luma


def to_grey(img: Image.Image) -> np.ndarray:
    """float32 (H, W) in [0, 1], 0 = black, from any mode: palette, 16-bit, with or without alpha.
    Scaled in place: at 20 megapixels each float copy is 80 MB."""
    if img.mode.startswith("I;16"):
        a = np.asarray(img, np.float32)
        a /= 65535
        return a
    if img.mode == "I":
        a = np.asarray(img, np.float32)
        a /= 65535 if a.max() > 255 else 255
        return np.clip(a, 0, 1, out=a)
    if img.mode == "F":
        a = np.nan_to_num(np.array(img, np.float32), copy=False)
        if a.max() > 1:
            a /= 255
        return np.clip(a, 0, 1, out=a)
    try:
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
            rgba = img if img.mode in ("RGBA", "LA") else img.convert("RGBA")
            luma, alpha = np.asarray(rgba.convert("L"), np.float32), rgba.getchannel("A")
            del rgba  # a converted copy is freed before the second float array
            alpha = np.asarray(alpha, np.float32)
            luma /= 255
            alpha /= 255
            return composite(luma, alpha)
        grey = np.asarray(img.convert("L"), np.float32)
        grey /= 255
        return grey
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


def scale_to_fit(a: np.ndarray, side: int) -> np.ndarray:
    """Resized so that its longer side is `side`, keeping the aspect ratio."""
    h, w = a.shape
    scale = side / max(h, w)
    return np.clip(resize(a, max(1, round(w * scale)), max(1, round(h * scale))), 0, 1)


def paste(patch: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    out = np.zeros((size, size), np.float32)
    h, w = patch.shape
    out[top:top + h, left:left + w] = patch
    return out


def digit(grey: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """The MNIST recipe: light ink on black, cropped to the strokes, fitted to 20x20, centred by mass (at
    another size, the same proportions)."""
    x, background = light_on_dark(shrink(grey))
    ink = float(np.percentile(x, 99.9))
    if ink - background < MIN_CONTRAST:
        raise ImageError(NO_CONTENT)
    x = without_background(x, background, ink - background)
    patch = scale_to_fit(x[content_box(x > DIGIT_INK)], round(DIGIT_BOX * size / IMAGE_SIZE))
    h, w = patch.shape
    ys, xs = np.indices(patch.shape)
    mass = patch.sum()
    # MNIST's centre of mass sits at pixel (14, 14), not at the geometric centre 13.5
    top = int(np.clip(round(size / 2 - (ys * patch).sum() / mass), 0, size - h))
    left = int(np.clip(round(size / 2 - (xs * patch).sum() / mass), 0, size - w))
    return paste(patch, top, left, size)


def fashion(grey: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """The Fashion-MNIST recipe: item light on black, trimmed to the item, longer side 28 (or `size`), centred."""
    x, background = light_on_dark(shrink(grey))
    if float(np.percentile(x, 99.9)) - background < MIN_CONTRAST:
        raise ImageError(NO_CONTENT)
    x = without_background(x, background, 1 - background)
    patch = scale_to_fit(x[content_box(x > FASHION_TRIM)], size)
    h, w = patch.shape
    # an odd margin leaves its extra pixel above and to the left, as in Fashion-MNIST
    return paste(patch, (size - h + 1) // 2, (size - w + 1) // 2, size)


MODES = {1: "L", 3: "RGB"}  # channels -> the Pillow mode


def pixels(img: Image.Image, size: int, channels: int) -> np.ndarray:
    """uint8 (size, size) grey or (size, size, 3) RGB of `img`: transparent pixels on white, then resized with
    Lanczos to size x size (the aspect ratio is not kept). Folder data sets are stored so, and `plain`
    preprocessing brings users' images to the same form."""
    mode = MODES[channels]
    try:
        if img.mode.startswith("I") or img.mode == "F":  # 16- and 32-bit integers, floats: scaled, not clipped
            img = Image.fromarray(np.round(to_grey(img) * 255).astype(np.uint8), "L")
        if img.mode != mode:
            if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
                img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
            img = img.convert(mode)
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.LANCZOS)
        return np.asarray(img, np.uint8)
    except (ValueError, OSError) as e:
        raise ImageError(f"cannot convert {img.mode} pixels to {mode} ({first_line(e)})") from None


def plain(img: Image.Image, size: int, channels: int) -> np.ndarray:
    return pixels(img, size, channels).astype(np.float32) / 255


PREPROCESSORS = {"digit": digit, "fashion": fashion, "plain": plain}  # by the names in metadata.PREPROCESSING


def prepare(source: ImageInput, preprocess: str | None, size: int = IMAGE_SIZE, channels: int = 1) -> np.ndarray:
    """float32 (size, size), or (size, size, 3) for colour models, in [0, 1] of one input: brought to the model's
    form by `preprocess`; None (raw) only converts to grey or RGB and wants size x size already."""
    img = load(source)
    if preprocess is None and img.size != (size, size):
        raise ImageError(f"is {img.size[0]}x{img.size[1]} pixels; raw input must be {size}x{size}")
    if preprocess == "plain" or channels == 3:
        return plain(img, size, channels)
    grey = to_grey(img)
    return grey if preprocess is None else PREPROCESSORS[preprocess](grey, size)
