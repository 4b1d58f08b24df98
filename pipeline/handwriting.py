"""People's handwriting is not MNIST: test digits redrawn thicker, thinner, rotated, slanted, narrower and wider,
saved as users' files and classified through the same code as `infer`, for one or more models side by side."""
from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np
from PIL import Image

from pipeline.classifier import Classifier
from pipeline.common import BadUsage, table
from pipeline.robustness import CANVAS, digit_classifier, enlarge, place, predictions

MNIST_BOX = 20  # MNIST digits fill a 20x20 box: one MNIST pixel is max(side) / 20 pixels of the drawn digit


def stroke(big: np.ndarray, mnist_px: float) -> np.ndarray:
    """Strokes made thicker (mnist_px > 0) or thinner (< 0) by about |mnist_px| MNIST pixels in all: a max (or
    min) filter over a disc of radius mnist_px / 2 at the drawn digit's scale, the canvas grown by the radius."""
    radius = max(1, round(abs(mnist_px) / 2 * max(big.shape) / MNIST_BOX))
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


VARIANTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
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
    """Scaled down to fit the canvas when a variant made it larger."""
    h, w = big.shape
    if max(h, w) <= CANVAS:
        return big
    s = CANVAS / max(h, w)
    return redraw(big, lambda im: im.resize((max(1, int(w * s)), max(1, int(h * s))), Image.Resampling.BICUBIC))


def write_variants(images: np.ndarray, folder: Path, seed: int = 0) -> dict[str, list[Path]]:
    """Each digit enlarged once, then every variant of it placed off-centre and saved as a grey PNG, dark on
    light (as a scan or a drawing app saves it)."""
    rng = np.random.default_rng(seed)
    files = {name: [] for name in VARIANTS}
    for i, digit in enumerate(images):
        big = enlarge(digit, rng)
        for n, (name, change) in enumerate(VARIANTS.items()):
            ink = place(fit_canvas(change(big).astype(np.float32)), rng)
            files[name].append(folder / f"{i:05d}-{n}.png")
            Image.fromarray(np.round(255 * (1 - ink)).astype(np.uint8), "L").save(files[name][-1])
    return files


def measure(classifiers: dict[str, Classifier], images: np.ndarray, labels: np.ndarray, seed: int = 0) -> list[dict]:
    """One row per variant and a total over the changed ones: errors and accuracy of each model."""
    with tempfile.TemporaryDirectory(prefix="handwriting-") as tmp:
        files = write_variants(images, Path(tmp), seed)
        rows = []
        for variant, paths in files.items():
            row = {"variant": variant, "images": len(paths)}
            for name, clf in classifiers.items():
                row[name] = int((predictions(clf, paths) != labels).sum())
            rows.append(row)
    changed = rows[1:]
    rows.append({"variant": "all changed", "images": sum(r["images"] for r in changed),
                 **{name: sum(r[name] for r in changed) for name in classifiers}})
    return rows


def fewer_errors(rows: list[dict], baseline: str, model: str) -> float:
    """How many fewer errors `model` makes than `baseline` over the changed variants, in %."""
    total = rows[-1]
    return 100 * (1 - total[model] / total[baseline]) if total[baseline] else 0.0


def formatted(rows: list[dict], names: list[str]) -> str:
    cells = [{"variant": r["variant"], "images": r["images"],
              **{f"{n} errors": f"{r[n]} ({100 * r[n] / r['images']:.1f}%)" for n in names}} for r in rows]
    return table(cells, ["variant", "images", *(f"{n} errors" for n in names)])


@click.command(help="Redraw the first --count MNIST test digits as people write them (thicker, thinner, rotated "
                    "+-15 degrees, slanted 20 degrees, narrower, wider), save each as a PNG a user could send, "
                    "classify the files as `infer` does with every --model, and print each model's errors per "
                    "change. With several models, also how many fewer errors each makes than the first.")
@click.option("--model", "model_paths", required=True, multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path), help="An MNIST .onnx model; repeat to compare.")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A fetched MNIST folder (its test split is used).")
@click.option("--count", default=1000, show_default=True, type=click.IntRange(min=1), help="Test images (the first N).")
@click.option("--seed", default=0, show_default=True, help="Size and placement of the drawn digits.")
def main(model_paths, data_dir, count, seed) -> None:
    from pipeline.datasets import load_split

    classifiers = {path.stem: digit_classifier(path) for path in model_paths}
    if len(classifiers) < len(model_paths):
        raise BadUsage("--model: give each model once (and models with different file names)")
    images, labels = load_split(data_dir, "test")
    rows = measure(classifiers, images[:count], labels[:count], seed)
    names = list(classifiers)
    print(f"the first {rows[0]['images']} MNIST test digits, redrawn and saved as PNGs, classified as `infer` does; "
          f"errors per model\n")
    print(formatted(rows, names), end="")
    for name in names[1:]:
        print(f"\n{name} makes {fewer_errors(rows, names[0], name):.0f} % fewer errors than {names[0]} over the "
              f"changed digits ({rows[-1][name]} against {rows[-1][names[0]]})")


if __name__ == "__main__":
    main()
