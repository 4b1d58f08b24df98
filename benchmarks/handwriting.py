"""People's handwriting is not MNIST: test digits redrawn thicker, thinner, rotated, slanted, narrower and wider,
saved as users' files and classified through the same code as `infer`, for one or more models side by side."""
from __future__ import annotations

import tempfile
from pathlib import Path

import click
import numpy as np

from benchmarks.robustness import digit_classifier, predictions
from digitlens.classifier import Classifier
from digitlens.text import BadUsage
from pipeline.common import table
from pipeline.drawings import write_styles


def errors_by_style(classifiers: dict[str, Classifier], images: np.ndarray, labels: np.ndarray, seed: int = 0) -> list[dict]:
    """One row per variant and a total over the changed ones: errors and accuracy of each model."""
    with tempfile.TemporaryDirectory(prefix="handwriting-") as tmp:
        files = write_styles(images, Path(tmp), seed)
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


def errors_table(rows: list[dict], names: list[str]) -> str:
    cells = [{"variant": r["variant"], "images": r["images"],
              **{f"{n} errors": f"{r[n]} ({100 * r[n] / r['images']:.1f}%)" for n in names}} for r in rows]
    return table(cells, ["variant", "images", *(f"{n} errors" for n in names)])


@click.command(help="Redraw the first --count MNIST test digits (or, with --split val, validation digits) as people "
                    "write them (thicker, thinner, rotated +-15 degrees, slanted 20 degrees, narrower, wider), save "
                    "each as a PNG a user could send, classify the files as `infer` does with every --model, and "
                    "print each model's errors per change. With several models, also how many fewer errors each "
                    "makes than the first.")
@click.option("--model", "model_paths", required=True, multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path), help="An MNIST .onnx model; repeat to compare.")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A fetched MNIST folder (its test split is used, unless --split val).")
@click.option("--split", default="test", show_default=True, type=click.Choice(["test", "val"]),
              help="Which digits: the test images, or the validation images carved from the training images as the "
                   "train stage carves them (params.yaml's data.val_fraction), for comparing recipes without the "
                   "test set.")
@click.option("--count", default=1000, show_default=True, type=click.IntRange(min=1), help="Images (the first N).")
@click.option("--seed", default=0, show_default=True, help="Size and placement of the drawn digits.")
def main(model_paths, data_dir, split, count, seed) -> None:
    from pipeline.datasets import load_split, training_splits
    from pipeline.params import load_params

    classifiers = {path.stem: digit_classifier(path) for path in model_paths}
    if len(classifiers) < len(model_paths):
        raise BadUsage("--model: give each model once (and models with different file names)")
    if split == "test":
        images, labels = load_split(data_dir, "test")
    else:
        _, (images, labels) = training_splits(data_dir, load_params().data.val_fraction)
    rows = errors_by_style(classifiers, images[:count], labels[:count], seed)
    names = list(classifiers)
    which = "test" if split == "test" else "validation"
    print(f"the first {rows[0]['images']} MNIST {which} digits, redrawn and saved as PNGs, classified as `infer` does; "
          f"errors per model\n")
    print(errors_table(rows, names), end="")
    for name in names[1:]:
        print(f"\n{name} makes {fewer_errors(rows, names[0], name):.0f} % fewer errors than {names[0]} over the "
              f"changed digits ({rows[-1][name]} against {rows[-1][names[0]]})")


if __name__ == "__main__":
    main()
