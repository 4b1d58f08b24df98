"""What the CUDA path does, checked on the CPU: precision choices, fused optimizers, evaluation batches, and
onnxruntime's CUDA session options (a GPU run is benchmarks/gpu-check.sh)."""
import pytest
import torch

from digitlens import runtime
from pipeline import training as tr
from pipeline.common import PipelineError
from pipeline.models import create_model
from pipeline.params import EVAL_BATCH, Recipe, parse_params
from pipeline.tensors import amp_dtype, full_fp32


def test_auto_precision_on_cuda_asks_for_native_bf16_only(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(
        including_emulation) or including_emulation)  # an emulating GPU (T4, V100) says yes only when asked so
    assert amp_dtype("auto", torch.device("cuda")) is None and asked == [False]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert amp_dtype("auto", torch.device("cuda")) is torch.bfloat16


def test_fp32_means_ieee_fp32_on_cuda():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    try:
        matmul.fp32_precision = conv.fp32_precision = "tf32"  # what cuDNN convolutions do by default
        full_fp32()
        assert matmul.fp32_precision == conv.fp32_precision == "ieee"
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_optimizers_are_fused_on_cuda_only(optimizer, monkeypatch):
    recipe = Recipe(optimizer=optimizer, lr=0.1, momentum=0.9 if optimizer == "sgd" else 0.0, batch_size=10, epochs=1,
                    weight_decay=0.001)
    model = create_model("simple_cnn")
    assert tr.make_optimizer(model, recipe).defaults["fused"] is None  # the CPU: torch's default implementation
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert tr.make_optimizer(model, recipe).defaults["fused"] is True


def test_evaluation_batches_are_sized_for_the_device(params):
    assert params.train.eval_batch_size == "auto"
    assert params.eval_batch("cpu") == EVAL_BATCH["cpu"] == 100 and params.eval_batch("cuda") == EVAL_BATCH["cuda"]
    fixed = params.model_copy(update={"train": params.train.model_copy(update={"eval_batch_size": 250})})
    assert fixed.eval_batch("cpu") == fixed.eval_batch("cuda") == 250
    raw = params.model_dump()
    for bad in (0, -3, "big", True):
        raw["train"]["eval_batch_size"] = bad
        with pytest.raises(PipelineError, match=r"train\.eval_batch_size"):
            parse_params(raw)


def test_onnxruntime_cuda_sessions_search_heuristically_and_never_fall_back(monkeypatch):
    import onnxruntime as ort

    made = []

    class Session:
        def __init__(self, source, options, providers):
            made.append(providers)
            self.fell_back = True

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

        def disable_fallback(self):
            self.fell_back = False

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", Session)
    session = runtime.onnx_session(b"model", "cuda")
    assert made == [[("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}), "CPUExecutionProvider"]]
    assert session.fell_back is False
