"""MNIST test digits redrawn as people send them: enlarged and placed off-centre on paper, saved in each file
format users have (SAVED_AS), and written in other hands (STYLES: thicker, thinner, rotated, slanted, narrower,
wider). The measurements in benchmarks/ and the tests draw their images here."""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

from digitlens.images import DIGIT_BOX

CANVAS = 200  # pixels; the digit is drawn DRAWN_SIDE pixels tall or wide, off-centre
DRAWN_SIDE = (100, 140)
PAPER, BLUE_INK = (250, 247, 238), (25, 40, 130)
ROTATED_90_CW = 6  # EXIF orientation of a photo taken with the camera held sideways


def off_centre(slack: int, rng: np.random.Generator) -> int:
    """An offset within a quarter of the slack from one edge or the other, never the centred one."""
    near = int(rng.integers(0, slack // 4 + 1))
    return near if rng.random() < 0.5 else slack - near


def enlarge(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Ink coverage in [0, 1] of the digit's strokes (its bounding box), enlarged to DRAWN_SIDE pixels."""
    rows, cols = np.flatnonzero(digit.any(1)), np.flatnonzero(digit.any(0))
    strokes = Image.fromarray(digit[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.float32) / 255, "F")
    scale = rng.integers(*DRAWN_SIDE, endpoint=True) / max(strokes.size)
    w, h = max(1, round(strokes.width * scale)), max(1, round(strokes.height * scale))
    return np.clip(np.asarray(strokes.resize((w, h), Image.Resampling.BICUBIC)), 0, 1)


def place(big: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Ink coverage (CANVAS, CANVAS): `big` placed off-centre on an empty canvas."""
    h, w = big.shape
    top, left = off_centre(CANVAS - h, rng), off_centre(CANVAS - w, rng)
    ink = np.zeros((CANVAS, CANVAS), np.float32)
    ink[top:top + h, left:left + w] = big
    return ink


def draw(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Ink coverage (CANVAS, CANVAS) in [0, 1]: the digit's strokes enlarged and placed off-centre."""
    return place(enlarge(digit, rng), rng)


def on_paper(ink: np.ndarray) -> Image.Image:
    """Blue ballpoint on off-white paper, RGB."""
    a = ink[..., None]
    return Image.fromarray(np.round(np.array(PAPER) * (1 - a) + np.array(BLUE_INK) * a).astype(np.uint8), "RGB")


def save_exif_rotated(ink: np.ndarray, path: Path) -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = ROTATED_90_CW
    on_paper(ink).transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", exif=exif.tobytes())


SAVED_AS = {  # name -> (suffix, writer(ink, path)); all dark on light except where the format says otherwise
    "grey": (".png", lambda ink, p: Image.fromarray(np.round(255 * (1 - ink)).astype(np.uint8), "L").save(p)),
    "rgb": (".png", lambda ink, p: on_paper(ink).save(p)),
    "rgba": (".png", lambda ink, p: Image.fromarray(np.dstack([np.zeros((*ink.shape, 3), np.uint8),
                                                               np.round(255 * ink).astype(np.uint8)]), "RGBA").save(p)),
    "palette": (".png", lambda ink, p: on_paper(ink).quantize(16).save(p)),
    "16-bit": (".png", lambda ink, p: Image.fromarray(np.round(65535 * (1 - ink)).astype(np.uint16)).save(p)),
    "jpeg": (".jpg", lambda ink, p: on_paper(ink).save(p, "JPEG", quality=75)),
    "exif-rotated": (".jpg", save_exif_rotated),
}


def write_saved_as(images: np.ndarray, folder: Path, seed: int = 0) -> dict[str, list[Path]]:
    """The originals as 28x28 PNGs ("original") and each drawn and saved in every way of SAVED_AS, file names
    in image order."""
    rng = np.random.default_rng(seed)
    files = {name: [] for name in ["original", *SAVED_AS]}
    for i, digit in enumerate(images):
        files["original"].append(folder / f"{i:05d}-original.png")
        Image.fromarray(digit, "L").save(files["original"][-1])
        ink = draw(digit, rng)
        for name, (suffix, write) in SAVED_AS.items():
            files[name].append(folder / f"{i:05d}-{name}{suffix}")
            write(ink, files[name][-1])
    return files



def stroke(big: np.ndarray, mnist_px: float) -> np.ndarray:
    """Strokes made thicker (mnist_px > 0) or thinner (< 0) by about |mnist_px| MNIST pixels in all: a max (or
    min) filter over a disc of radius mnist_px / 2 at the drawn digit's scale, the canvas grown by the radius."""
    # MNIST digits fill a DIGIT_BOX square: one MNIST pixel is max(side) / DIGIT_BOX pixels of the drawn digit
    radius = max(1, round(abs(mnist_px) / 2 * max(big.shape) / DIGIT_BOX))
    padded = np.pad(big, 2 * radius)  # the radius to grow into, and the filter's reach beyond it
    h, w = big.shape[0] + 2 * radius, big.shape[1] + 2 * radius
    op = np.maximum if mnist_px > 0 else np.minimum
    out = padded[radius:radius + h, radius:radius + w]
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dx * dx + dy * dy <= radius * radius:
                out = op(out, padded[radius + dy:radius + dy + h, radius + dx:radius + dx + w])
    return out


def redraw(big: np.ndarray, change: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    """`change` applied to the digit as a float image (bicubic resampling overshoots: clipped back to [0, 1])."""
    return np.clip(np.asarray(change(Image.fromarray(big, "F"))), 0, 1)


def rotate(big: np.ndarray, degrees: float) -> np.ndarray:
    """Turned counter-clockwise by `degrees` (clockwise when negative), the canvas grown to hold it."""
    return redraw(big, lambda im: im.rotate(degrees, Image.Resampling.BICUBIC, expand=True))


def slant(big: np.ndarray, degrees: float) -> np.ndarray:
    """Sheared horizontally: the top leans right by `degrees` (left when negative), as in italic writing."""
    h, w = big.shape
    k = math.tan(math.radians(degrees))
    out_w = w + math.ceil(abs(k) * h)
    # output (x, y) reads input (x + k * y + c, y); c keeps the sheared digit inside the wider canvas
    data = (1, k, -k * h if k > 0 else 0, 0, 1, 0)
    return redraw(big, lambda im: im.transform((out_w, h), Image.Transform.AFFINE, data, Image.Resampling.BICUBIC))


def stretch(big: np.ndarray, factor: float) -> np.ndarray:
    """Width times `factor`, height unchanged."""
    h, w = big.shape
    return redraw(big, lambda im: im.resize((max(1, round(w * factor)), h), Image.Resampling.BICUBIC))


STYLES: dict[str, Callable[[np.ndarray], np.ndarray]] = {  # how people write differently from MNIST
    "as drawn": lambda big: big,
    "thicker (+1 px)": lambda big: stroke(big, 1.0),
    "thinner (-1 px)": lambda big: stroke(big, -1.0),
    "rotated -15°": lambda big: rotate(big, -15),
    "rotated +15°": lambda big: rotate(big, 15),
    "slanted left 20°": lambda big: slant(big, -20),
    "slanted right 20°": lambda big: slant(big, 20),
    "narrower (x0.7)": lambda big: stretch(big, 0.7),
    "wider (x1.4)": lambda big: stretch(big, 1.4),
}


def fit_canvas(big: np.ndarray) -> np.ndarray:
    """Scaled down to fit the canvas when a style made it larger."""
    h, w = big.shape
    if max(h, w) <= CANVAS:
        return big
    s = CANVAS / max(h, w)
    return redraw(big, lambda im: im.resize((max(1, int(w * s)), max(1, int(h * s))), Image.Resampling.BICUBIC))


def write_styles(images: np.ndarray, folder: Path, seed: int = 0) -> dict[str, list[Path]]:
    """Each digit enlarged once, then redrawn in every style of STYLES, placed off-centre and saved as a grey
    PNG, dark on light (as a scan or a drawing app saves it)."""
    rng = np.random.default_rng(seed)
    files = {name: [] for name in STYLES}
    for i, digit in enumerate(images):
        big = enlarge(digit, rng)
        for n, (name, change) in enumerate(STYLES.items()):
            ink = place(fit_canvas(change(big).astype(np.float32)), rng)
            files[name].append(folder / f"{i:05d}-{n}.png")
            Image.fromarray(np.round(255 * (1 - ink)).astype(np.uint8), "L").save(files[name][-1])
    return files
