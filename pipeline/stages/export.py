"""Export stage: TorchScript and ONNX files of one checkpoint, written only if they match PyTorch on the test set."""
from __future__ import annotations

import dataclasses

import click
import torch

from pipeline.common import stage_command, write_bytes, write_json
from pipeline.conversion import export, export_id
from pipeline.datasets import load_split
from pipeline.models import load_checkpoint
from pipeline.params import PARAMS_FILE, load_params
from pipeline.tensors import to_inputs


@click.command(help="Export a checkpoint to TorchScript and ONNX, each written only if it gives PyTorch's logits "
                    "(within 1e-4) and predictions on the whole test set.")
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False), help="Checkpoint (.pt).")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--onnx", "onnx_path", required=True, type=click.Path(dir_okay=False))
@click.option("--torchscript", "ts_path", required=True, type=click.Path(dir_okay=False))
@click.option("--parity", "parity_path", required=True, type=click.Path(dir_okay=False), help="JSON to write.")
@click.option("--params", "params_file", default=PARAMS_FILE, show_default=True, type=click.Path(dir_okay=False))
@stage_command
def main(model_path, data_dir, onnx_path, ts_path, parity_path, params_file) -> None:
    batch_size = load_params(params_file).eval_batch("cpu")  # onnxruntime and PyTorch, on the CPU
    model, ckpt = load_checkpoint(model_path)
    images, labels = load_split(data_dir, "test")
    x = to_inputs(images, ckpt.info.mean, ckpt.info.std, torch.device("cpu")).numpy()
    info = dataclasses.replace(ckpt.info, export_id=export_id(model_path))
    info, ts_bytes, onnx_bytes, report = export(model, info, x, labels, batch_size)
    write_bytes(ts_path, ts_bytes)
    write_bytes(onnx_path, onnx_bytes)
    write_json(parity_path, report)
    print(f"{info.architecture} on {info.dataset}: {report['images']} test images, "
          f"ONNX max |diff| {report['onnx']['max_abs_diff']:.2e}, TorchScript max |diff| "
          f"{report['torchscript']['max_abs_diff']:.2e}, 0 predictions differ -> {onnx_path}, {ts_path}")


if __name__ == "__main__":
    main()
