"""The one onnxruntime session builder, for the Classifier and for the export stage's parity check."""
from __future__ import annotations

import os

from pipeline.common import first_line

DEVICES = ("cpu", "cuda")


class ModelError(ValueError):
    """A model file that cannot be used: nothing can be classified with it. The message is one line."""


def onnx_session(source: bytes | str | os.PathLike, device: str = "cpu"):
    """An onnxruntime session on the CPU, or on CUDA (refused, never silently the CPU, without it)."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise ModelError(f"device cuda: this onnxruntime has no CUDA provider (it has {', '.join(available)}); "
                             "install onnxruntime-gpu instead of onnxruntime, or use the CPU")
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: errors come back as exceptions; a logged copy is a second line
    try:
        session = ort.InferenceSession(source if isinstance(source, bytes) else str(source), options,
                                       providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
        raise ModelError(f"onnxruntime cannot load it ({first_line(e)})") from None
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise ModelError("device cuda: onnxruntime could not start CUDA (no GPU, or CUDA libraries missing)")
    return session
