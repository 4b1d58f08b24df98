"""Data stage: fetch and verify one data set (MNIST or Fashion-MNIST) into a folder of IDX files."""
from __future__ import annotations

import sys

import click

from pipeline.common import stage_command
from pipeline.datasets import DATASETS
from pipeline.download import DEFAULT_TIMEOUT, fetch


@click.command(help="Fetch and verify one data set (mirror in $DATASET_MIRROR, else official hosts; "
                    f"$DATASET_TIMEOUT seconds per file, default {DEFAULT_TIMEOUT}).")
@click.option("--dataset", required=True, type=click.Choice(list(DATASETS)))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@stage_command
def main(dataset: str, out_dir: str) -> None:
    fetch(dataset, out_dir, log=lambda msg: print(msg, file=sys.stderr))


if __name__ == "__main__":
    main()
