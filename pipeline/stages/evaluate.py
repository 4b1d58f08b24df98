"""Evaluate stage: test-set metrics, confusion matrix, most confident mistakes, plots and model card of one exported
model, scored through digitlens, the torch-free core that `infer`, the API and `serve` use (no torch here)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import click

from digitlens import Classifier
from pipeline.common import stage_command, write_json, write_text
from pipeline.datasets import load_split, read_facts
from pipeline.modelcard import model_card
from pipeline.reports import evaluate, plot_mistakes, plot_report, predictions_csv, read_history


@click.command(help="Evaluate an exported ONNX model on the test split of its data set and write its model card.")
@click.option("--onnx", "onnx_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The export stage's ONNX file.")
@click.option("--torchscript", "ts_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The export stage's TorchScript file (its SHA-256 goes into the card).")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--live", "live_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="The train stage's DVCLive folder (per-epoch curves).")
@click.option("--run-json", "run_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The train stage's run.json (epochs, parameters, training time).")
@click.option("--parity", "parity_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The export stage's parity.json (for the card).")
@click.option("--metrics", "metrics_path", required=True, type=click.Path(dir_okay=False), help="JSON to write.")
@click.option("--classes", "classes_path", required=True, type=click.Path(dir_okay=False),
              help="JSON to write: per-class accuracy and confusion matrix.")
@click.option("--predictions", required=True, type=click.Path(dir_okay=False), help="CSV (actual, predicted) to write.")
@click.option("--plot", required=True, type=click.Path(dir_okay=False), help="PNG to write: curves and confusion matrix.")
@click.option("--mistakes", required=True, type=click.Path(dir_okay=False),
              help="PNG to write: the most confident mistakes on the test set.")
@click.option("--card", "card_path", required=True, type=click.Path(dir_okay=False), help="Markdown model card to write.")
@stage_command
def main(onnx_path: str, ts_path: str, data_dir: str, live_dir: str, run_path: str, parity_path: str,
         metrics_path: str, classes_path: str, predictions: str, plot: str, mistakes: str, card_path: str) -> None:
    clf = Classifier(onnx_path)
    info = clf.info
    images, labels = load_split(data_dir, "test")
    short = read_facts(data_dir).short_classes
    metrics, per_class, probs = evaluate(clf, images, labels, json.loads(Path(run_path).read_text()))
    write_text(predictions, predictions_csv(labels, probs.argmax(1), info.class_names))
    plot_report(info, short, read_history(live_dir), metrics, per_class["confusion_matrix"], plot)
    plot_mistakes(info, short, images, labels, probs, mistakes)
    sha256 = {Path(p).name: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in (onnx_path, ts_path)}
    write_text(card_path, model_card(Path(onnx_path).stem, info, per_class["accuracy"],
                                     json.loads(Path(parity_path).read_text()), sha256))
    write_json(classes_path, per_class)
    write_json(metrics_path, metrics)
    print(f"{info.architecture} on {info.dataset}: accuracy {metrics['accuracy']:.2f}%  loss {metrics['loss']:.4f}")


if __name__ == "__main__":
    main()
