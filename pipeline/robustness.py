"""Robustness of `infer` to real files: MNIST test digits re-encoded as users save them, classified like originals?"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click
import numpy as np
from PIL import Image

from pipeline.classifier import Classifier, ModelError
from pipeline.common import BadUsage, table

CANVAS = 200  # pixels; the digit is drawn DRAWN_SIDE pixels tall or wide, off-centre
DRAWN_SIDE = (100, 140)
PAPER, BLUE_INK = (250, 247, 238), (25, 40, 130)
EXIF_ORIENTATION, ROTATED_90_CW = 0x0112, 6  # a photo taken with the camera held sideways


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
    exif[EXIF_ORIENTATION] = ROTATED_90_CW
    on_paper(ink).transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", exif=exif.tobytes())


VARIANTS = {  # name -> (suffix, writer(ink, path)); all dark on light except where the format says otherwise
    "grey": (".png", lambda ink, p: Image.fromarray(np.round(255 * (1 - ink)).astype(np.uint8), "L").save(p)),
    "rgb": (".png", lambda ink, p: on_paper(ink).save(p)),
    "rgba": (".png", lambda ink, p: Image.fromarray(np.dstack([np.zeros((*ink.shape, 3), np.uint8),
                                                               np.round(255 * ink).astype(np.uint8)]), "RGBA").save(p)),
    "palette": (".png", lambda ink, p: on_paper(ink).quantize(16).save(p)),
    "16-bit": (".png", lambda ink, p: Image.fromarray(np.round(65535 * (1 - ink)).astype(np.uint16)).save(p)),
    "jpeg": (".jpg", lambda ink, p: on_paper(ink).save(p, "JPEG", quality=75)),
    "exif-rotated": (".jpg", save_exif_rotated),
}


def write_variants(images: np.ndarray, folder: Path, seed: int = 0) -> dict[str, list[Path]]:
    """The originals as 28x28 PNGs ("original") and every variant of each, file names in image order."""
    rng = np.random.default_rng(seed)
    files = {name: [] for name in ["original", *VARIANTS]}
    for i, digit in enumerate(images):
        files["original"].append(folder / f"{i:05d}-original.png")
        Image.fromarray(digit, "L").save(files["original"][-1])
        ink = draw(digit, rng)
        for name, (suffix, write) in VARIANTS.items():
            files[name].append(folder / f"{i:05d}-{name}{suffix}")
            write(ink, files[name][-1])
    return files


def predictions(clf: Classifier, files: list[Path], raw: bool = False) -> np.ndarray:
    """Predicted class per file, -1 where the Classifier could not classify it."""
    return np.array([r.top.index if r.ok else -1 for r in clf.classify(files, raw=raw, batch_size=256)])


def measure(clf: Classifier, images: np.ndarray, labels: np.ndarray, seed: int = 0) -> list[dict]:
    """One row per variant (and overall): agreement with infer --raw on the originals, and accuracy."""
    with tempfile.TemporaryDirectory(prefix="robustness-") as tmp:
        files = write_variants(images, Path(tmp), seed)
        reference = predictions(clf, files.pop("original"), raw=True)
        rows = [{"variant": "original (--raw)", "images": len(images), "agree": len(images),
                 "accuracy": float((reference == labels).mean())}]
        for name, paths in files.items():
            predicted = predictions(clf, paths)
            rows.append({"variant": name, "images": len(paths), "agree": int((predicted == reference).sum()),
                         "failed": int((predicted < 0).sum()), "accuracy": float((predicted == labels).mean())})
    variants = rows[1:]
    rows.append({"variant": "overall", **{k: sum(r[k] for r in variants) for k in ("images", "agree", "failed")},
                 "accuracy": float(np.mean([r["accuracy"] for r in variants]))})
    for row in rows:
        row["agreement"] = 100 * row["agree"] / row["images"]
    return rows


def digit_classifier(path: Path) -> Classifier:
    """The Classifier of an MNIST model, or the one-line usage error these measurements exit with."""
    try:
        clf = Classifier(path)
    except ModelError as e:
        raise BadUsage(f"{path}: {e}") from None
    if clf.info.preprocess != "digit":
        raise BadUsage(f"{path}: a {clf.info.dataset} model; this measurement uses MNIST digits")
    return clf


def formatted(rows: list[dict]) -> str:
    return table([r | {"agreement": f"{r['agreement']:.1f}%", "accuracy": f"{100 * r['accuracy']:.1f}%",
                       "failed": r.get("failed", 0)} for r in rows],
                 ["variant", "images", "agree", "agreement", "failed", "accuracy"])


@click.command(help="Re-encode MNIST test digits as users' files (dark on white, off-centre on 200x200, RGB, RGBA, "
                    "palette, 16-bit, JPEG, EXIF-rotated), classify them as `infer` does, and compare with the "
                    "predictions on the original 28x28 images. Exit 1 if any variant agrees less than --threshold.")
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A fetched MNIST folder (its test split is used).")
@click.option("--count", default=1000, show_default=True, type=click.IntRange(min=1), help="Test images (the first N).")
@click.option("--seed", default=0, show_default=True, help="Placement and size of the drawn digits.")
@click.option("--threshold", default=98.0, show_default=True, type=click.FloatRange(0, 100), help="Agreement floor, %.")
def main(model_path, data_dir, count, seed, threshold) -> None:
    from pipeline.datasets import load_split

    clf = digit_classifier(model_path)
    images, labels = load_split(data_dir, "test")
    rows = measure(clf, images[:count], labels[:count], seed)
    print(f"{model_path} ({clf.info.architecture} on {clf.info.dataset}), first {len(images[:count])} "
          f"MNIST test images; agreement = same prediction as `infer --raw` on the original 28x28 image\n")
    print(formatted(rows), end="")
    low = [r["variant"] for r in rows[1:] if r["agreement"] < threshold]
    if low:
        print(f"\nbelow {threshold:g} %: {', '.join(low)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
