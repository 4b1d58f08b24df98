"""The Python API: classify images with an exported ONNX model through onnxruntime (no torch).

    from digitlens import Classifier
    clf = Classifier("artifacts/cnn.onnx")
    clf.predict("digit.png").top.label            # '7 - seven'
    clf.predict([img1, img2], top_k=3)            # a list in, a list of results out

`infer` and `serve` are thin layers over this module: loading, preprocessing and errors live here only.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from digitlens.errors import ImageError, ModelError
from digitlens.images import PREPROCESSORS, ImageInput, prepare
from digitlens.limits import check_model_file
from digitlens.metadata import CHANNELS, GREY_ONLY, SIZES, MetadataError, ModelInfo, input_spec
from digitlens.runtime import DEVICES, onnx_session
from digitlens.text import first_line, shown

LOGITS_TYPES = ("tensor(float)", "tensor(double)", "tensor(float16)")
BATCH_SIZE = 64  # images per onnxruntime call


@dataclass(frozen=True)
class Prediction:
    label: str  # the class name, e.g. '7 - seven' or 'Sneaker'
    index: int  # the model's output index
    probability: float

    def to_dict(self) -> dict:
        return {"class": self.label, "index": self.index, "probability": round(self.probability, 6)}


@dataclass(frozen=True)
class Result:
    """What one input came to: its predictions (most probable first) or, for a bad input, the error."""

    source: str  # a file name, or '<bytes>', '<file>', '<image>', '<array>', '<stdin>'
    predictions: tuple[Prediction, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def top(self) -> Prediction:
        if self.error is not None:
            raise ImageError(f"{self.source}: {self.error}")
        return self.predictions[0]

    def to_dict(self) -> dict:
        """The JSON record; a file name's bytes that are not UTF-8 appear escaped, e.g. '\\xff'."""
        if self.error is not None:
            return {"file": shown(self.source), "error": self.error}
        return {"file": shown(self.source), "predictions": [p.to_dict() for p in self.predictions]}


def source_name(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fsdecode(source)
    for kind, name in ((bytes, "<bytes>"), (bytearray, "<bytes>"), (memoryview, "<bytes>"), (np.ndarray, "<array>")):
        if isinstance(source, kind):
            return name
    if hasattr(source, "read"):
        return str(getattr(source, "name", "<file>"))
    return "<image>" if type(source).__module__.startswith("PIL.") else f"<{type(source).__name__}>"


class Classifier:
    """One exported model and its onnxruntime session, shared by every call (thread-safe: onnxruntime's
    `run` may be called from several threads at once)."""

    def __init__(self, model: str | os.PathLike, device: str = "cpu", assume: str | None = None,
                 threads: int | None = None):
        """`assume` ('digit', 'fashion' or 'plain'): for a model without this project's metadata, that preprocessing,
        pixels in [0, 1] without standardisation, and the output indices as class names. `threads`: onnxruntime's
        intra-op threads (default: one per core; a server running requests in parallel wants 1)."""
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)} (got {device!r})")
        if assume is not None and assume not in PREPROCESSORS:
            raise ValueError(f"assume must be one of {', '.join(PREPROCESSORS)} (got {assume!r})")
        self.path = Path(model)
        self.name = self.path.stem
        check_model_file(self.path)
        self.session = onnx_session(self.path, device, threads)
        inputs = self.session.get_inputs()
        shape = list(inputs[0].shape) if len(inputs) == 1 else []
        if len(shape) != 4 or inputs[0].type != "tensor(float)":
            found = ", ".join(f"{i.type} {i.shape}" for i in inputs)
            raise ModelError(f"takes {found}; expected one float tensor (batch, channels, height, width)")
        self.input_name = inputs[0].name
        self.outputs = {o.name: o.type for o in self.session.get_outputs()}
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        try:
            self.info = ModelInfo.from_metadata(self.metadata())
        except MetadataError as e:
            if assume is None:
                raise ModelError(f"{e}; for a model without this project's metadata, assume 'digit', 'fashion' "
                                 "or 'plain' preprocessing (infer --assume)") from None
            self.info = self._assumed(assume, shape)
        if self.info.preprocess not in PREPROCESSORS:
            raise ModelError(f"model metadata names unknown preprocessing {self.info.preprocess!r}")
        if self.info.preprocess in GREY_ONLY and self.info.channels != 1:
            raise ModelError(f"takes {self.info.channels} channels; {self.info.preprocess} preprocessing makes grey "
                             "images" + (" (assume 'plain')" if assume else ""))
        expected = [self.info.channels, self.info.size, self.info.size]
        if shape[1:] != expected:
            raise ModelError(f"takes {shape}; its metadata says (batch, {', '.join(map(str, expected))})")
        self._check_output(self.info.output)

    def metadata(self) -> dict[str, str]:
        try:
            return self.session.get_modelmeta().custom_metadata_map
        except UnicodeDecodeError:
            raise ModelError("its metadata is not valid UTF-8 (a damaged or foreign file?)") from None

    def _check_output(self, name: str) -> None:
        if name not in self.outputs:
            raise ModelError(f"has no output {name!r}, which its metadata names")
        if self.outputs[name] not in LOGITS_TYPES:
            raise ModelError(f"its output {name!r} is {self.outputs[name]}; expected a float tensor (batch, classes)")

    def _assumed(self, preprocess: str, shape: list) -> ModelInfo:
        """Facts for a model without this project's metadata: its input's channels and size (square, as this project
        makes them), pixels in [0, 1] without standardisation, output indices as class names."""
        output = next(iter(self.outputs))
        self._check_output(output)
        channels, size = shape[1], shape[2]
        if (channels not in CHANNELS or not isinstance(size, int) or shape[3] != size
                or not SIZES[0] <= size <= SIZES[1]):
            raise ModelError(f"takes {shape}; expected (batch, 1 or 3, size, size) with a size from {SIZES[0]} to "
                             f"{SIZES[1]}")
        zeros = np.zeros((self.fixed_batch or 1, channels, size, size), np.float32)
        z = self._run(zeros, output)
        if z.ndim != 2:
            raise ModelError(f"outputs shape {list(z.shape)}; expected (batch, classes)")
        classes = z.shape[1]
        return ModelInfo("unknown", "unknown", [str(i) for i in range(classes)], 0.0, 1.0, preprocess,
                         input=input_spec(channels, size, preprocess), output=output)

    def __repr__(self) -> str:
        return f"Classifier({str(self.path)!r}: {self.info.architecture} on {self.info.dataset})"

    @property
    def classes(self) -> list[str]:
        return list(self.info.class_names)

    def _run(self, x: np.ndarray, output: str) -> np.ndarray:
        try:
            return self.session.run([output], {self.input_name: x})[0]
        except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
            raise ModelError(f"onnxruntime failed running it ({first_line(e)})") from None

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Softmax (N, classes) for images (N, size, size) or (N, size, size, 3) in [0, 1], as `prepare` gives them."""
        x = ((x - self.info.mean) / self.info.std).astype(np.float32)
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # (N, channels, size, size)
        step = self.fixed_batch or len(x)
        out = []
        for i in range(0, len(x), step):
            chunk = x[i:i + step]
            padded = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), np.float32)])
            out.append(np.asarray(self._run(padded, self.info.output))[:len(chunk)])
        z = np.concatenate(out).astype(np.float64)
        if z.ndim != 2 or z.shape[1] != len(self.info.class_names):
            raise ModelError(f"outputs shape {list(z.shape)}; its metadata names {len(self.info.class_names)} "
                             "classes, so (batch, classes) was expected")
        z[~np.isfinite(z).all(1)] = np.nan  # a single -inf logit would still give finite probabilities
        with np.errstate(all="ignore"):
            z = np.exp(z - z.max(1, keepdims=True))
            return z / z.sum(1, keepdims=True)

    def _results(self, sources: Sequence, names: Sequence[str], top_k: int, raw: bool) -> list[Result]:
        preprocess = None if raw else self.info.preprocess
        arrays, errors = [], {}
        for i, source in enumerate(sources):
            try:
                arrays.append(prepare(source, preprocess, self.info.size, self.info.channels))
            except ImageError as e:
                errors[i] = str(e)
            except Exception as e:  # noqa: BLE001 - one odd input must not stop the others
                errors[i] = f"cannot be read as an image ({type(e).__name__}: {first_line(e)})"
        probs = iter(self.probabilities(np.stack(arrays)) if arrays else [])
        results = []
        for i, name in enumerate(names):
            if i in errors:
                results.append(Result(name, error=errors[i]))
                continue
            p = next(probs)
            if not np.isfinite(p).all():
                results.append(Result(name, error="the model's output is not finite (NaN or infinity)"))
                continue
            best = np.argsort(-p, kind="stable")[:top_k]
            results.append(Result(name, tuple(Prediction(self.info.class_names[j], int(j), float(p[j])) for j in best)))
        return results

    def classify(self, images: Iterable[ImageInput], top_k: int = 1, raw: bool = False, batch_size: int = BATCH_SIZE,
                 names: Iterable[str] | None = None) -> Iterator[Result]:
        """A Result per input, in order, `batch_size` inputs per onnxruntime call; a bad input gets its
        error in its Result and the others go on. `raw`: inputs already in the model's form (28x28 light on
        dark for MNIST models; the model's size otherwise), only converted to grey or RGB. Raises ModelError
        if the model itself fails."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer (got {top_k!r})")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer (got {batch_size!r})")
        images = list(images)
        names = [source_name(s) for s in images] if names is None else list(names)
        if len(names) != len(images):
            raise ValueError(f"{len(names)} names for {len(images)} images")
        for start in range(0, len(images), batch_size):
            yield from self._results(images[start:start + batch_size], names[start:start + batch_size],
                                     top_k, raw)

    def predict(self, images: ImageInput | Sequence[ImageInput], top_k: int = 1, raw: bool = False):
        """One input -> its Result; a list -> a list of Results (batched). Raises ImageError for a bad input
        (naming it), ModelError if the model fails."""
        many = isinstance(images, (list, tuple))
        results = list(self.classify(images if many else [images], top_k, raw))
        for r in results:
            if r.error is not None:
                raise ImageError(f"{r.source}: {r.error}")
        return results if many else results[0]
