"""Evaluate stage: test-set metrics, confusion matrix, its most confident mistakes and plots of one trained model."""
from __future__ import annotations

import click
import numpy as np

from pipeline.common import stage_command, write_json, write_text
from pipeline.datasets import load_split
from pipeline.models import load_checkpoint
from pipeline.params import PARAMS_FILE, load_params
from pipeline.reports import evaluate, plot_mistakes, plot_report, predictions_csv, run_facts


@click.command(help="Evaluate a trained checkpoint on the test split of its data set.")
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False), help="Checkpoint (.pt).")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--metrics", "metrics_path", required=True, type=click.Path(dir_okay=False), help="JSON to write.")
@click.option("--classes", "classes_path", required=True, type=click.Path(dir_okay=False),
              help="JSON to write: per-class accuracy and confusion matrix.")
@click.option("--predictions", required=True, type=click.Path(dir_okay=False), help="CSV (actual, predicted) to write.")
@click.option("--run", "run_path", required=True, type=click.Path(dir_okay=False),
              help="JSON to write: device, precision, threads and torch version of the training run.")
@click.option("--plot", required=True, type=click.Path(dir_okay=False), help="PNG to write: curves and confusion matrix.")
@click.option("--mistakes", required=True, type=click.Path(dir_okay=False),
              help="PNG to write: the most confident mistakes on the test set.")
@click.option("--params", "params_file", default=PARAMS_FILE, show_default=True, type=click.Path(dir_okay=False))
@stage_command
def main(model_path: str, data_dir: str, metrics_path: str, classes_path: str, predictions: str, run_path: str,
         plot: str, mistakes: str, params_file: str) -> None:
    batch_size = load_params(params_file).eval_batch("cpu")
    model, ckpt = load_checkpoint(model_path)
    images, labels = load_split(data_dir, "test")
    metrics, per_class, probs = evaluate(model, ckpt, images, labels, batch_size)
    write_text(predictions, predictions_csv(labels, probs.argmax(1), ckpt.info.class_names))
    plot_report(ckpt, metrics, np.array(per_class["confusion_matrix"]), plot)
    plot_mistakes(ckpt, images, labels, probs, mistakes)
    write_json(run_path, run_facts(ckpt))
    write_json(classes_path, per_class)
    write_json(metrics_path, metrics)
    print(f"{ckpt.info.architecture} on {ckpt.info.dataset}: accuracy {metrics['accuracy']:.2f}%  loss {metrics['loss']:.4f}")


if __name__ == "__main__":
    main()
