"""The one onnxruntime session builder, for the Classifier and for the export stage's parity check."""
from __future__ import annotations

import os

from digitlens.errors import ModelError
from digitlens.text import first_line

DEVICES = ("cpu", "cuda")
# cuDNN's exhaustive search would time every convolution algorithm again for each new batch shape (each new
# request size in `serve`); its heuristic picks one at once
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}


def onnx_session(source: bytes | str | os.PathLike, device: str = "cpu", threads: int | None = None):
    """An onnxruntime session on the CPU, or on CUDA (refused, never silently the CPU, without it), with
    `threads` intra-op threads (None: onnxruntime's default, one per core, spinning while they wait)."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise ModelError(f"device cuda: this onnxruntime has no CUDA provider (it has {', '.join(available)}); "
                             "install onnxruntime-gpu instead of onnxruntime, or use the CPU")
        providers.insert(0, ("CUDAExecutionProvider", CUDA_OPTIONS))
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: errors come back as exceptions; a logged copy is a second line
    if threads is not None:
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(source if isinstance(source, bytes) else str(source), options,
                                       providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
        raise ModelError(f"onnxruntime cannot load it ({first_line(e)})") from None
    if device == "cuda":
        if "CUDAExecutionProvider" not in session.get_providers():
            raise ModelError("device cuda: onnxruntime could not start CUDA (no GPU, or CUDA libraries missing)")
        # a CUDA failure inside a run would otherwise be retried on the CPU, with a notice on stdout that
        # corrupts `infer --format json/csv`: it is a ModelError instead
        session.disable_fallback()
    return session
