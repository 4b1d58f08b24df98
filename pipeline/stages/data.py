"""Data stage: fetch and verify one data set (MNIST or Fashion-MNIST) into a folder of IDX files."""
from __future__ import annotations

import signal
import sys

import click

from pipeline.common import stage_command
from pipeline.datasets import DATASETS
from pipeline.download import DEFAULT_TIMEOUT, fetch


class Stopped(BaseException):
    """SIGTERM or SIGINT, raised where the stage is, so that its clean-ups run (no `except Exception` takes it)."""


def stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


@click.command(help="Fetch and verify one data set (mirror in $DATASET_MIRROR, else official hosts; "
                    f"$DATASET_TIMEOUT seconds per file, default {DEFAULT_TIMEOUT}).")
@click.option("--dataset", required=True, type=click.Choice(list(DATASETS)))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@stage_command
def main(dataset: str, out_dir: str) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    try:
        fetch(dataset, out_dir, log=lambda msg: print(msg, file=sys.stderr))
    except Stopped as e:
        click.echo(f"Error: stopped by {e}; nothing written", err=True)
        sys.exit(128 + signal.Signals[str(e)])


if __name__ == "__main__":
    main()
