"""Robustness of `infer` to real files: MNIST test digits re-encoded as users save them, classified like originals?"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click
import numpy as np

from digitlens.classifier import Classifier, ModelError
from digitlens.text import BadUsage
from pipeline.common import table
from pipeline.drawings import write_saved_as


def predictions(clf: Classifier, files: list[Path], raw: bool = False) -> np.ndarray:
    """Predicted class per file, -1 where the Classifier could not classify it."""
    return np.array([r.top.index if r.ok else -1 for r in clf.classify(files, raw=raw, batch_size=256)])


def agreement_by_format(clf: Classifier, images: np.ndarray, labels: np.ndarray, seed: int = 0) -> list[dict]:
    """One row per variant (and overall): agreement with infer --raw on the originals, and accuracy."""
    with tempfile.TemporaryDirectory(prefix="robustness-") as tmp:
        files = write_saved_as(images, Path(tmp), seed)
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


def agreement_table(rows: list[dict]) -> str:
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
    rows = agreement_by_format(clf, images[:count], labels[:count], seed)
    print(f"{model_path} ({clf.info.architecture} on {clf.info.dataset}), first {len(images[:count])} "
          f"MNIST test images; agreement = same prediction as `infer --raw` on the original 28x28 image\n")
    print(agreement_table(rows), end="")
    low = [r["variant"] for r in rows[1:] if r["agreement"] < threshold]
    if low:
        print(f"\nbelow {threshold:g} %: {', '.join(low)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
