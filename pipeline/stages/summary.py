"""Summary stage: one Markdown table of every model's test metrics and export parity."""
from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline.common import stage_command, table, write_text
from pipeline.datasets import DATASETS
from pipeline.models import MODELS

COLUMNS = ["dataset", "model", "test accuracy", "test loss", "parameters", "epochs", "training time",
           "device", "precision", "ONNX max abs diff", "TorchScript max abs diff"]


def row(dataset: str, arch: str, metrics: dict, run: dict, parity: dict | None) -> dict:
    diff = (lambda fmt: f"{parity[fmt]['max_abs_diff']:.1e}") if parity else (lambda fmt: "not exported")
    return dict(zip(COLUMNS, [
        dataset, arch, f"{metrics['accuracy']:.2f} %", f"{metrics['loss']:.4f}", f"{metrics['params']:,}",
        str(metrics["epochs"]), f"{metrics['train_time_s']:.0f} s", run.get("device", "?"), run.get("precision", "?"),
        diff("onnx"), diff("torchscript")]))


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def summary_table(reports_dir: str | Path, tuned: bool) -> str:
    """One row per reports/<dataset>/<arch>/metrics.json of the tuned or of the reference recipes, in data set
    order (the built-in ones first) and registry order ("" when there is none)."""
    rows = []
    declared = sorted(p.name for p in Path(reports_dir).iterdir() if p.is_dir() and p.name not in DATASETS)
    for dataset in [*DATASETS, *declared]:
        for arch, cls in MODELS.items():
            folder = Path(reports_dir) / dataset / arch
            if getattr(cls, "tuned", False) != tuned or not (folder / "metrics.json").exists():
                continue
            rows.append(row(dataset, arch, read_json(folder / "metrics.json"), read_json(folder / "run.json") or {},
                            read_json(folder / "parity.json")))
    return table(rows, COLUMNS, markdown=True) if rows else ""


def summary(reports_dir: str | Path) -> str:
    parts = [("Tuned recipes", summary_table(reports_dir, tuned=True)),
             ("Reference recipes", summary_table(reports_dir, tuned=False))]
    return "".join(f"## {title}\n\n{text}\n" for title, text in parts if text)


@click.command(help="Write the Markdown summary of every evaluated model.")
@click.option("--reports", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False))
@stage_command
def main(reports: str, out: str) -> None:
    text = summary(reports)
    write_text(out, "# Models\n\nTest-set figures on each data set's test images, written by `dvc repro` "
                    "(pipeline/stages/summary.py).\n\n" + text)
    print(text, end="")


if __name__ == "__main__":
    main()
