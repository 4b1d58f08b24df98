"""Train stage: one architecture on one data set with the recipe in params.yaml, logged live with DVCLive."""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import asdict

import click
from dvclive import Live

from pipeline import distributed
from pipeline.common import PipelineError, stage_command, stops_deferred, write_json
from pipeline.models import MODELS, save_checkpoint
from pipeline.params import PARAMS_FILE, load_params
from pipeline.training import EPOCH_METRICS, train


@click.command(help="Train one architecture on one data set with the recipe in params.yaml. With "
                    f"${distributed.PROCESSES_ENV}=N (N > 1), or started by torchrun, N data-parallel processes "
                    "train it (docs/scale.md); rank 0 writes.")
@click.option("--dataset", required=True, help="A data set's name in params.yaml.")
@click.option("--arch", required=True, type=click.Choice(list(MODELS)))
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder written by the data stage.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write (.pt).")
@click.option("--live", "live_dir", required=True, type=click.Path(file_okay=False),
              help="DVCLive folder: metrics.json (the latest epoch's figures) and plots/metrics/*.tsv (one row per "
                   "epoch), rewritten as each epoch ends.")
@click.option("--run-json", "run_path", required=True, type=click.Path(dir_okay=False),
              help="JSON to write: epochs, parameters, training time, device, precision, threads, torch version.")
@click.option("--params", "params_file", default=PARAMS_FILE, show_default=True, type=click.Path(dir_okay=False))
@stage_command
def main(dataset: str, arch: str, data_dir: str, out: str, live_dir: str, run_path: str, params_file: str) -> None:
    params = load_params(params_file)
    if dataset not in params.datasets:
        raise PipelineError(f"{params_file}: no data set {dataset!r}; declared: {', '.join(params.datasets)}")
    at, processes = distributed.ranks(), distributed.requested()
    if processes > 1 and at.world == 1:  # TRAIN_PROCESSES: this stage again, as that many processes under torchrun
        cmd = distributed.torchrun_command(processes, sys.argv[1:])
        os.execv(cmd[0], cmd)
    if not at.main:  # the other ranks train their shares and write nothing
        try:
            train(params, dataset, arch, data_dir, params_file=params_file)
        finally:
            distributed.stop()
        return
    # dvc.yaml declares the metrics and plots (dvcyaml=False); inside `dvc exp run`, DVCLive tells DVC, its VS Code
    # extension and Studio (when a token is set) about each epoch; outside DVC it only writes its files.
    live = Live(live_dir, dvcyaml=False, save_dvc_exp=False)
    live.step = 1  # DVCLive's step is the epoch

    def log_epoch(row: dict) -> None:
        for name in EPOCH_METRICS:
            live.log_metric(name, row[name])
        live.next_step()

    try:
        ckpt = train(params, dataset, arch, data_dir, params_file=params_file, on_epoch=log_epoch)
    except BaseException:
        # a failed training leaves no figures behind, even when a stop signal comes during the clean-up (torchrun
        # stops the other processes when one fails, as their collectives fail)
        with stops_deferred():
            live.end()
            shutil.rmtree(live_dir, ignore_errors=True)
        raise
    finally:
        distributed.stop()
    live.end()
    save_checkpoint(ckpt, out)
    write_json(run_path, asdict(ckpt.run))


if __name__ == "__main__":
    main()
