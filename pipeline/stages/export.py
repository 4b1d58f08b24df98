"""Export stage: TorchScript and ONNX files of one checkpoint, written only if they match PyTorch, and its model card."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import click
import torch

from pipeline.common import stage_command, write_bytes, write_json, write_text
from pipeline.conversion import export, export_id
from pipeline.datasets import load_split
from pipeline.modelcard import model_card
from pipeline.models import load_checkpoint
from pipeline.params import PARAMS_FILE, load_params
from pipeline.tensors import to_inputs


@click.command(help="Export a checkpoint to TorchScript and ONNX after checking both against PyTorch on the test set, "
                    "and write its model card.")
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False), help="Checkpoint (.pt).")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--metrics", "metrics_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The evaluate stage's metrics (test accuracy goes into the metadata).")
@click.option("--classes", "classes_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The evaluate stage's per-class figures (for the model card).")
@click.option("--onnx", "onnx_path", required=True, type=click.Path(dir_okay=False))
@click.option("--torchscript", "ts_path", required=True, type=click.Path(dir_okay=False))
@click.option("--parity", "parity_path", required=True, type=click.Path(dir_okay=False), help="JSON to write.")
@click.option("--card", "card_path", required=True, type=click.Path(dir_okay=False), help="Markdown model card to write.")
@click.option("--params", "params_file", default=PARAMS_FILE, show_default=True, type=click.Path(dir_okay=False))
@stage_command
def main(model_path, data_dir, metrics_path, classes_path, onnx_path, ts_path, parity_path, card_path,
         params_file) -> None:
    batch_size = load_params(params_file).eval_batch("cpu")  # onnxruntime and PyTorch, on the CPU
    model, ckpt = load_checkpoint(model_path)
    info = dataclasses.replace(ckpt.info, test_accuracy=float(json.loads(Path(metrics_path).read_text())["accuracy"]),
                               export_id=export_id(model_path))
    images, _ = load_split(data_dir, "test")
    x = to_inputs(images, info.mean, info.std, torch.device("cpu")).numpy()
    ts_bytes, onnx_bytes, report = export(model, info, x, batch_size)
    per_class = json.loads(Path(classes_path).read_text())["accuracy"]
    write_bytes(ts_path, ts_bytes)
    write_bytes(onnx_path, onnx_bytes)
    sha256 = {Path(path).name: hashlib.sha256(data).hexdigest() for path, data in ((onnx_path, onnx_bytes),
                                                                                    (ts_path, ts_bytes))}
    write_text(card_path, model_card(Path(onnx_path).stem, info, per_class, report, sha256))
    write_json(parity_path, report)
    print(f"{info.architecture} on {info.dataset}: {report['images']} test images, "
          f"ONNX max |diff| {report['onnx']['max_abs_diff']:.2e}, TorchScript max |diff| "
          f"{report['torchscript']['max_abs_diff']:.2e}, 0 predictions differ -> {onnx_path}, {ts_path}")


if __name__ == "__main__":
    main()
