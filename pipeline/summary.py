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


def row(dataset: str, arch: str, metrics: dict, parity: dict | None) -> dict:
    diff = (lambda fmt: f"{parity[fmt]['max_abs_diff']:.1e}") if parity else (lambda fmt: "not exported")
    return dict(zip(COLUMNS, [
        dataset, arch, f"{metrics['accuracy']:.2f} %", f"{metrics['loss']:.4f}", f"{metrics['params']:,}",
        str(metrics["epochs"]), f"{metrics['train_time_s']:.0f} s", metrics["device"], metrics["precision"],
        diff("onnx"), diff("torchscript")]))


def summary_table(reports_dir: str | Path) -> str:
    """One row per reports/<dataset>/<arch>/metrics.json, in data set and registry order."""
    rows = []
    for dataset in DATASETS:
        for arch in MODELS:
            folder = Path(reports_dir) / dataset / arch
            if not (folder / "metrics.json").exists():
                continue
            parity = json.loads((folder / "parity.json").read_text()) if (folder / "parity.json").exists() else None
            rows.append(row(dataset, arch, json.loads((folder / "metrics.json").read_text()), parity))
    return table(rows, COLUMNS, markdown=True)


@click.command(help="Write the Markdown summary of every evaluated model.")
@click.option("--reports", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False))
@stage_command
def main(reports: str, out: str) -> None:
    text = summary_table(reports)
    write_text(out, "# Models\n\nTest-set figures on the 10,000 test images, written by `dvc repro` "
                    "(pipeline/summary.py).\n\n" + text)
    print(text, end="")


if __name__ == "__main__":
    main()
