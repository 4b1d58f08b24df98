"""Conversion of a trained model to TorchScript and ONNX, and the parity check of both against PyTorch."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from tqdm import tqdm

from digitlens.metadata import INPUT_NAME, OUTPUT_NAME, ModelInfo
from digitlens.runtime import onnx_session
from pipeline.common import PipelineError
from pipeline.scoring import accuracy

OPSET = 20
TOLERANCE = 1e-4  # largest absolute logit difference allowed between PyTorch and an export
METADATA_FILE = "metadata.json"  # the ModelInfo inside a TorchScript archive (_extra_files)


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


def torchscript_bytes(scripted: torch.jit.ScriptModule, info: ModelInfo) -> bytes:
    buf = io.BytesIO()
    extra = {METADATA_FILE: json.dumps(info.to_metadata(), sort_keys=True)}
    with torchscript_deprecation_expected():
        torch.jit.save(scripted, buf, _extra_files=extra)
    return buf.getvalue()


def to_onnx(model: nn.Module, info: ModelInfo) -> onnx.ModelProto:
    """A self-contained ONNX model with a dynamic batch dimension and the model's facts in metadata_props."""
    example = torch.zeros(2, info.channels, info.size, info.size)
    logging.getLogger("torch.onnx").setLevel(logging.WARNING)
    program = torch.onnx.export(
        model, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, external_data=False, verbose=False,
    )
    proto = program.model_proto
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    del proto.metadata_props[:]
    for key, value in info.to_metadata().items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = f"{info.architecture} trained on {info.dataset}; outputs logits over {len(info.class_names)} classes"
    onnx.checker.check_model(proto, full_check=True)
    return proto


def run_batched(fn, x: np.ndarray, batch_size: int, progress: tqdm) -> np.ndarray:
    out = []
    for i in range(0, len(x), batch_size):
        out.append(fn(x[i:i + batch_size]))
        progress.update()
    return np.concatenate(out)


def compare(reference: np.ndarray, other: np.ndarray) -> dict:
    return {
        "max_abs_diff": float(np.abs(reference - other).max()),
        "argmax_mismatches": int((reference.argmax(1) != other.argmax(1)).sum()),
    }


def parity(eager: np.ndarray, ts_bytes: bytes, onnx_bytes: bytes, x: np.ndarray, batch_size: int,
           progress: tqdm) -> dict:
    """Largest logit difference and differing predictions of the saved ONNX and TorchScript files (read back
    from their bytes) against eager PyTorch's logits `eager` on `x`."""
    with torchscript_deprecation_expected():
        scripted = torch.jit.load(io.BytesIO(ts_bytes))
    with torch.inference_mode():
        script = run_batched(lambda b: scripted(torch.from_numpy(b)).numpy(), x, batch_size, progress)
    session = onnx_session(onnx_bytes)
    onnx_out = run_batched(lambda b: session.run([OUTPUT_NAME], {INPUT_NAME: b})[0], x, batch_size, progress)
    return {"images": len(x), "onnx": compare(eager, onnx_out), "torchscript": compare(eager, script)}


def check_parity(report: dict, tolerance: float = TOLERANCE) -> None:
    for fmt in ("onnx", "torchscript"):
        r = report[fmt]
        if r["max_abs_diff"] > tolerance or r["argmax_mismatches"]:
            raise PipelineError(f"{fmt} export disagrees with PyTorch: max |diff| {r['max_abs_diff']:.3g} "
                                f"(limit {tolerance:g}), {r['argmax_mismatches']} predictions differ; nothing written")


def export(model: nn.Module, info: ModelInfo, x: np.ndarray, labels: np.ndarray,
           batch_size: int) -> tuple[ModelInfo, bytes, bytes, dict]:
    """(the facts with the test accuracy, TorchScript bytes, ONNX bytes, parity report) of a model and its test
    split `x` (inputs as the model takes them), `labels`; raises PipelineError when parity fails. The test accuracy
    is eager PyTorch's, which the parity gate makes every format's: no prediction may differ."""
    batches = -(-len(x) // batch_size)
    with tqdm(total=3 * batches, desc="parity", unit="batch", leave=False, disable=None) as progress:
        # The reference in channels-last memory: the same arithmetic, 2-3x faster for convolutions on the CPU.
        fast = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
        with torch.inference_mode():
            eager = run_batched(lambda b: fast(torch.from_numpy(b)).numpy(), x, batch_size, progress)
        info = dataclasses.replace(info, test_accuracy=accuracy(eager.argmax(1), labels))
        model = model.eval().to(memory_format=torch.contiguous_format)
        ts_bytes = torchscript_bytes(to_torchscript(model), info)
        onnx_bytes = to_onnx(model, info).SerializeToString()
        report = parity(eager, ts_bytes, onnx_bytes, x, batch_size, progress)
    check_parity(report)
    return info, ts_bytes, onnx_bytes, report


def export_id(checkpoint: str | os.PathLike) -> str:
    """The id both exports of one checkpoint carry (and its model card): the checkpoint's SHA-256, shortened."""
    return hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()[:16]
