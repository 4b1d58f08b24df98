"""What an exported model says about itself: metadata written by export and read by `infer`.

Every value is JSON (parsed with json.loads, never evaluated). This module imports no torch,
so the inference tool stays light.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
IMAGE_SIZE = 28
# The tensor every exported model takes: float32 (batch, 1, 28, 28), pixels scaled to [0, 1]
# with light strokes on a dark background (as in MNIST), then standardised with mean/std.
INPUT_SPEC = {
    "shape": ["batch", 1, IMAGE_SIZE, IMAGE_SIZE],
    "dtype": "float32",
    "value_range": [0.0, 1.0],
    "polarity": "light-on-dark",
    "then": "(x - mean) / std",
}
PREPROCESS_RECIPES = ("digit", "fashion")


class MetadataError(ValueError):
    """A model file whose metadata is missing or not what this project writes."""


@dataclass(frozen=True)
class ModelCard:
    dataset: str
    architecture: str
    class_names: list[str]
    mean: float
    std: float
    preprocess: str  # one of PREPROCESS_RECIPES
    test_accuracy: float
    params: dict
    input: dict
    output: str = OUTPUT_NAME

    def to_metadata(self) -> dict[str, str]:
        """String -> JSON string, as ONNX metadata_props and TorchScript _extra_files hold them."""
        return {
            "dataset": json.dumps(self.dataset),
            "architecture": json.dumps(self.architecture),
            "class_names": json.dumps(self.class_names),
            "normalization": json.dumps({"mean": self.mean, "std": self.std}),
            "input": json.dumps(self.input),
            "output": json.dumps(self.output),
            "preprocess": json.dumps(self.preprocess),
            "test_accuracy": json.dumps(self.test_accuracy),
            "params": json.dumps(self.params, sort_keys=True),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> "ModelCard":
        missing = [k for k in ("dataset", "architecture", "class_names", "normalization", "preprocess") if k not in meta]
        if missing:
            raise MetadataError(f"model metadata lacks {', '.join(missing)} (not exported by this project?)")
        try:
            values = {k: json.loads(v) for k, v in meta.items()}
            norm = values["normalization"]
            card = cls(
                dataset=str(values["dataset"]),
                architecture=str(values["architecture"]),
                class_names=[str(c) for c in values["class_names"]],
                mean=float(norm["mean"]),
                std=float(norm["std"]),
                preprocess=str(values["preprocess"]),
                test_accuracy=float(values.get("test_accuracy", float("nan"))),
                params=dict(values.get("params", {})),
                input=dict(values.get("input", INPUT_SPEC)),
                output=str(values.get("output", OUTPUT_NAME)),
            )
        except (ValueError, TypeError, KeyError) as e:
            raise MetadataError(f"model metadata is malformed ({type(e).__name__}: {e})") from None
        if card.preprocess not in PREPROCESS_RECIPES:
            raise MetadataError(f"model metadata names unknown preprocessing {card.preprocess!r}")
        if card.std <= 0 or not card.class_names:
            raise MetadataError("model metadata has a non-positive std or no class names")
        return card

    @classmethod
    def from_checkpoint(cls, ckpt: dict, test_accuracy: float) -> "ModelCard":
        return cls(
            dataset=ckpt["dataset"],
            architecture=ckpt["arch"],
            class_names=list(ckpt["class_names"]),
            mean=float(ckpt["normalization"]["mean"]),
            std=float(ckpt["normalization"]["std"]),
            preprocess=ckpt["preprocess"],
            test_accuracy=float(test_accuracy),
            params=ckpt["params"] | {"model_args": ckpt["model_args"]},
            input=INPUT_SPEC,
        )
