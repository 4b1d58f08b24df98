"""A model's facts (ModelInfo): built once by training, saved in its checkpoint, written by the export stage
into the ONNX and TorchScript metadata, read by the Classifier.

Every value is JSON (parsed with json.loads, never evaluated) and checked for its type: a model whose
metadata is malformed is refused, not coerced.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from digitlens.text import first_line

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
IMAGE_SIZE = 28  # MNIST and Fashion-MNIST: 28x28 grey images
SIZES = (16, 64)  # the square sides, in pixels, every architecture takes (a declared data set's `size`)
CHANNELS = (1, 3)  # grey or RGB
# How users' images are brought to a data set's form (params.yaml `datasets.<name>.preprocess`): the keys of
# images.PREPROCESSORS, named here so that the training side need not import the image code. digit and fashion
# make grey light-on-dark images (MNIST's and Fashion-MNIST's recipes); plain only converts and resizes.
PREPROCESSING = ("digit", "fashion", "plain")
GREY_ONLY = ("digit", "fashion")
MIN_STD = 1e-3  # pixels in [0, 1] with a smaller spread are one colour


def input_spec(channels: int = 1, size: int = IMAGE_SIZE, preprocess: str = "digit") -> dict:
    """The tensor a model takes: float32 (batch, channels, size, size), pixels scaled to [0, 1] (light strokes on
    a dark background after the digit and fashion preprocessing, as in MNIST), then standardised with mean/std."""
    return {"shape": ["batch", channels, size, size], "dtype": "float32", "value_range": [0.0, 1.0],
            "polarity": "light-on-dark" if preprocess in GREY_ONLY else "as-is", "then": "(x - mean) / std"}


INPUT_SPEC = input_spec()  # MNIST's and Fashion-MNIST's
REQUIRED = ("dataset", "architecture", "class_names", "normalization", "preprocess")


class MetadataError(ValueError):
    """A model file whose metadata is missing or not what this project writes."""


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MetadataError(f"model metadata: {what} must be a finite number (got {value!r})")
    return float(value)


def _string(value, what: str) -> str:
    if not isinstance(value, str):
        raise MetadataError(f"model metadata: {what} must be a string (got {value!r})")
    return value


@dataclass(frozen=True)
class ModelInfo:
    """A model's facts: data set, architecture and the arguments that rebuild it, classes, normalisation,
    preprocessing, the training params; the test accuracy and export id once it is exported."""

    dataset: str
    architecture: str
    class_names: list[str]
    mean: float
    std: float
    preprocess: str  # one of PREPROCESSING
    model_args: dict = field(default_factory=dict)  # the architecture's constructor arguments, classes aside
    params: dict = field(default_factory=dict)  # what trained it: seed, device, recipe, augmentation, data, train
    # test-time views: the graph averages each image's logits with those of its mirror image (test_flip), of it
    # zoomed in and out by test_zoom (a fraction) and rotated by +-test_rotate degrees (and their mirror images)
    test_flip: bool = False
    test_zoom: float = 0.0
    test_rotate: float = 0.0
    test_accuracy: float | None = None
    input: dict = field(default_factory=lambda: dict(INPUT_SPEC))
    output: str = OUTPUT_NAME
    export_id: str = ""  # the same in an export's ONNX and TorchScript files and its model card

    @property
    def channels(self) -> int:
        return self.input["shape"][1]

    @property
    def size(self) -> int:
        return self.input["shape"][2]

    @property
    def forward_passes(self) -> int:
        """The model's passes per image: one per test-time view."""
        return (1 + 2 * bool(self.test_zoom) + 2 * bool(self.test_rotate)) * (2 if self.test_flip else 1)

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
            "model_args": json.dumps(self.model_args, sort_keys=True),
            "test_flip": json.dumps(self.test_flip),
            "test_zoom": json.dumps(self.test_zoom),
            "test_rotate": json.dumps(self.test_rotate),
            "test_accuracy": json.dumps(self.test_accuracy),
            "params": json.dumps(self.params, sort_keys=True),
            "export_id": json.dumps(self.export_id),
        }

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> ModelInfo:
        missing = [k for k in REQUIRED if k not in meta]
        if missing:
            raise MetadataError(f"model metadata lacks {', '.join(missing)} (not exported by this project?)")
        try:
            values = {k: json.loads(v, parse_constant=lambda c: c) for k, v in meta.items()}
        except (TypeError, ValueError, RecursionError) as e:
            raise MetadataError(f"model metadata is not JSON ({first_line(e)})") from None
        names, norm = values["class_names"], values["normalization"]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise MetadataError(f"model metadata: class_names must be a non-empty list of strings (got {names!r})")
        if not isinstance(norm, dict):
            raise MetadataError(f"model metadata: normalization must be {{\"mean\": ..., \"std\": ...}} (got {norm!r})")
        mean, std = _number(norm.get("mean"), "normalization.mean"), _number(norm.get("std"), "normalization.std")
        if std <= MIN_STD:
            raise MetadataError(f"model metadata: normalization.std must be above {MIN_STD:g} (got {std!r})")
        accuracy = values.get("test_accuracy")
        model_args, params = values.get("model_args", {}), values.get("params", {})
        spec = values.get("input", INPUT_SPEC)
        if not all(isinstance(v, dict) for v in (model_args, params, spec)):
            raise MetadataError("model metadata: model_args, params and input must be JSON objects")
        shape = spec.get("shape")
        if (not isinstance(shape, list) or len(shape) != 4 or type(shape[1]) is not int
                or shape[1] not in CHANNELS or type(shape[2]) is not int
                or not SIZES[0] <= shape[2] <= SIZES[1] or shape[3] != shape[2]):
            raise MetadataError(f"model metadata: input.shape must be [batch, 1 or 3, size, size] with a size from "
                                f"{SIZES[0]} to {SIZES[1]} (got {shape!r})")
        test_flip = values.get("test_flip", False)
        if not isinstance(test_flip, bool):
            raise MetadataError(f"model metadata: test_flip must be true or false (got {test_flip!r})")
        test_zoom, test_rotate = (_number(values.get(k, 0.0), k) for k in ("test_zoom", "test_rotate"))
        return cls(
            dataset=_string(values["dataset"], "dataset"),
            architecture=_string(values["architecture"], "architecture"),
            class_names=names,
            mean=mean,
            std=std,
            preprocess=_string(values["preprocess"], "preprocess"),
            model_args=model_args,
            test_flip=test_flip,
            test_zoom=test_zoom,
            test_rotate=test_rotate,
            test_accuracy=None if accuracy is None else _number(accuracy, "test_accuracy"),
            params=params,
            input=spec,
            output=_string(values.get("output", OUTPUT_NAME), "output"),
            export_id=_string(values.get("export_id", ""), "export_id"),
        )
