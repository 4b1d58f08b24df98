"""Export stage: TorchScript and ONNX files of one checkpoint, written only if they match PyTorch."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path

import click
import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from pipeline.common import PipelineError, stage_command, write_bytes, write_json
from pipeline.data import load_split
from pipeline.modelcard import IMAGE_SIZE, INPUT_NAME, OUTPUT_NAME, ModelCard
from pipeline.models import load_checkpoint
from pipeline.train import to_inputs

OPSET = 20
TOLERANCE = 1e-4  # largest absolute logit difference allowed between PyTorch and an export
METADATA_FILE = "metadata.json"  # the ModelCard inside a TorchScript archive (_extra_files)


@contextlib.contextmanager
def torchscript_deprecation_expected():
    """TorchScript is deprecated upstream and torch.jit.script/save/load warn on every call. Users still
    ask for the format, so that one warning is expected and silenced here, and only here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def to_torchscript(model: nn.Module) -> torch.jit.ScriptModule:
    with torchscript_deprecation_expected():
        return torch.jit.script(model)


def torchscript_bytes(scripted: torch.jit.ScriptModule, card: ModelCard) -> bytes:
    buf = io.BytesIO()
    extra = {METADATA_FILE: json.dumps(card.to_metadata(), sort_keys=True)}
    with torchscript_deprecation_expected():
        torch.jit.save(scripted, buf, _extra_files=extra)
    return buf.getvalue()


def load_torchscript(path: str | os.PathLike) -> tuple[torch.jit.ScriptModule, ModelCard]:
    extra = {METADATA_FILE: ""}
    try:
        with torchscript_deprecation_expected():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        card = ModelCard.from_metadata(json.loads(extra[METADATA_FILE] or "{}"))
    except Exception as e:  # noqa: BLE001 - missing, corrupt, truncated or foreign files
        raise PipelineError(f"{path}: not a TorchScript model of this project ({type(e).__name__}: {e})".splitlines()[0]) from None
    return module.eval(), card


def to_onnx(model: nn.Module, card: ModelCard) -> onnx.ModelProto:
    """A self-contained ONNX model with a dynamic batch dimension and the card in metadata_props."""
    example = torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE)
    logging.getLogger("torch.onnx").setLevel(logging.WARNING)
    program = torch.onnx.export(
        model, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, external_data=False, verbose=False,
    )
    proto = program.model_proto
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    del proto.metadata_props[:]
    for key, value in card.to_metadata().items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = f"{card.architecture} trained on {card.dataset}; outputs logits over {len(card.class_names)} classes"
    onnx.checker.check_model(proto, full_check=True)
    return proto


def onnx_session(model: bytes | str | os.PathLike) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_batched(fn, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    return np.concatenate([fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def compare(reference: np.ndarray, other: np.ndarray) -> dict:
    return {
        "max_abs_diff": float(np.abs(reference - other).max()),
        "argmax_mismatches": int((reference.argmax(1) != other.argmax(1)).sum()),
    }


def parity(model: nn.Module, scripted: torch.jit.ScriptModule, session: ort.InferenceSession,
           x: np.ndarray, batch_size: int = 1000) -> dict:
    """Largest logit difference and differing predictions of ONNX and TorchScript against eager PyTorch."""
    with torch.inference_mode():
        eager = run_batched(lambda b: model(torch.from_numpy(b)).numpy(), x, batch_size)
        script = run_batched(lambda b: scripted(torch.from_numpy(b)).numpy(), x, batch_size)
    onnx_out = run_batched(lambda b: session.run([OUTPUT_NAME], {INPUT_NAME: b})[0], x, batch_size)
    return {"images": len(x), "onnx": compare(eager, onnx_out), "torchscript": compare(eager, script)}


def check_parity(report: dict, tolerance: float = TOLERANCE) -> None:
    for fmt in ("onnx", "torchscript"):
        r = report[fmt]
        if r["max_abs_diff"] > tolerance or r["argmax_mismatches"]:
            raise PipelineError(f"{fmt} export disagrees with PyTorch: max |diff| {r['max_abs_diff']:.3g} "
                                f"(limit {tolerance:g}), {r['argmax_mismatches']} predictions differ; nothing written")


def export(model: nn.Module, card: ModelCard, x: np.ndarray) -> tuple[bytes, bytes, dict]:
    """(TorchScript bytes, ONNX bytes, parity report); raises PipelineError when parity fails."""
    model = model.eval().to(memory_format=torch.contiguous_format)
    scripted = to_torchscript(model)
    ts_bytes = torchscript_bytes(scripted, card)
    onnx_bytes = to_onnx(model, card).SerializeToString()
    report = parity(model, scripted, onnx_session(onnx_bytes), x)
    check_parity(report)
    return ts_bytes, onnx_bytes, report


@click.command(help="Export a checkpoint to TorchScript and ONNX after checking both against PyTorch on the test set.")
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False), help="Checkpoint (.pt).")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--metrics", "metrics_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The evaluate stage's metrics (test accuracy goes into the metadata).")
@click.option("--onnx", "onnx_path", required=True, type=click.Path(dir_okay=False))
@click.option("--torchscript", "ts_path", required=True, type=click.Path(dir_okay=False))
@click.option("--parity", "parity_path", required=True, type=click.Path(dir_okay=False), help="JSON to write.")
@stage_command
def main(model_path, data_dir, metrics_path, onnx_path, ts_path, parity_path) -> None:
    model, ckpt = load_checkpoint(model_path)
    card = ModelCard.from_checkpoint(ckpt, json.loads(Path(metrics_path).read_text())["accuracy"])
    images, _ = load_split(data_dir, "test")
    x = to_inputs(images, card.mean, card.std, torch.device("cpu")).numpy()
    ts_bytes, onnx_bytes, report = export(model, card, x)
    write_bytes(ts_path, ts_bytes)
    write_bytes(onnx_path, onnx_bytes)
    write_json(parity_path, report)
    print(f"{card.architecture} on {card.dataset}: {report['images']} test images, "
          f"ONNX max |diff| {report['onnx']['max_abs_diff']:.2e}, TorchScript max |diff| "
          f"{report['torchscript']['max_abs_diff']:.2e}, 0 predictions differ -> {onnx_path}, {ts_path}")


if __name__ == "__main__":
    main()
