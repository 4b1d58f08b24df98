"""Train stage: one architecture on one data set with the recipe in params.yaml."""
from __future__ import annotations

import click

from pipeline.common import stage_command, write_text
from pipeline.datasets import DATASETS
from pipeline.models import MODELS, save_checkpoint
from pipeline.params import PARAMS_FILE, load_params
from pipeline.training import history_csv, train


@click.command(help="Train one architecture on one data set with the recipe in params.yaml.")
@click.option("--dataset", required=True, type=click.Choice(list(DATASETS)))
@click.option("--arch", required=True, type=click.Choice(list(MODELS)))
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder written by the data stage.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write (.pt).")
@click.option("--history", required=True, type=click.Path(dir_okay=False), help="Per-epoch CSV to write.")
@click.option("--params", "params_file", default=PARAMS_FILE, show_default=True, type=click.Path(dir_okay=False))
@stage_command
def main(dataset: str, arch: str, data_dir: str, out: str, history: str, params_file: str) -> None:
    params = load_params(params_file)
    ckpt = train(params, dataset, arch, data_dir, params_file=params_file)
    save_checkpoint(ckpt, out)
    write_text(history, history_csv(ckpt.history))


if __name__ == "__main__":
    main()
