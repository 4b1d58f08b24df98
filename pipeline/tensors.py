"""What the torch side of every stage shares: device and precision choice, input tensors, batched logits, scores."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.common import PipelineError


def pick_device(choice: str, source: str) -> torch.device:
    """The torch device for `choice` (auto | cpu | cuda); `source` names where the choice was made."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"{source}: device: 'cuda' asked for, but torch sees no CUDA device; use 'auto' or 'cpu'")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    return str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)


def amp_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training on `device` (None = plain float32)."""
    if choice == "auto":  # native bf16 only: T4 and V100 emulate it, slower than float32
        native = (torch.cuda.is_bf16_supported(including_emulation=False) if device.type == "cuda" else
                  torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return torch.bfloat16 if native else None
    return torch.bfloat16 if choice == "bf16" else None


def full_fp32() -> None:
    """Float32 matrix products and convolutions in full IEEE precision on CUDA (its default for convolutions is
    TF32, 10-bit mantissas), so that a run labelled fp32 is fp32."""
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.conv.fp32_precision = "ieee"


def precision_label(amp: torch.dtype | None) -> str:
    return "fp32" if amp is None else "bf16 autocast"


def to_inputs(images: np.ndarray, mean: float, std: float, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W) grey or (N, H, W, 3) colour -> normalised float32 (N, C, H, W) on `device`, in one go."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    x = (x.float() / 255.0 - mean) / std
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


@torch.inference_mode()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def score(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in %)."""
    loss = F.cross_entropy(logits.float(), y).item()
    return loss, 100.0 * (logits.argmax(1) == y).double().mean().item()
