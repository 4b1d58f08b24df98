"""Data stage: one data set declared in params.yaml into a folder of IDX files and dataset.json (DataFacts): a
built-in one fetched and verified, a declared IDX one verified, a folder of images read once."""
from __future__ import annotations

import sys

import click

from pipeline.common import stage_command
from pipeline.dataprep import describe, prepare_dataset
from pipeline.download import DEFAULT_TIMEOUT
from pipeline.params import PARAMS_FILE, load_dataset


def log(msg: str) -> None:
    print(msg, file=sys.stderr)


@click.command(help="Read one data set declared in params.yaml into IDX files and dataset.json: a built-in one "
                    "fetched and verified (mirror in $DATASET_MIRROR, else official hosts; $DATASET_TIMEOUT seconds "
                    f"per file, default {DEFAULT_TIMEOUT}), declared IDX files verified against their checksums, a folder "
                    "of images decoded, converted and resized (docs/datasets.md).")
@click.option("--dataset", required=True, help="A data set's name in params.yaml.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option("--params", "params_file", default=PARAMS_FILE, show_default=True, type=click.Path(dir_okay=False))
@stage_command
def main(dataset: str, out_dir: str, params_file: str) -> None:
    facts = prepare_dataset(dataset, load_dataset(dataset, params_file), out_dir, log)
    for line in describe(facts):
        log(line)
    log(f"wrote {out_dir}")


if __name__ == "__main__":
    main()
