"""The `infer` command: classify people's own images with an exported ONNX model, through onnxruntime."""
from __future__ import annotations

import contextlib
import csv
import glob
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import click
import numpy as np

from pipeline.images import ImageError, prepare
from pipeline.modelcard import IMAGE_SIZE, INPUT_SPEC, PREPROCESS_RECIPES, MetadataError, ModelCard

FORMATS = ("text", "json", "csv")
PROGRESS_MIN = 20  # files; fewer finish before a progress bar would tell anything
USAGE, FAILED = 2, 1  # exit statuses: a bad command line or model; some files not classified


class ModelError(ValueError):
    """A model file `infer` cannot use (a usage error: nothing can be classified with it)."""


class BadUsage(click.ClickException):
    """Reported as the one line 'Error: ...' (no usage text, unlike click.UsageError), exit status 2."""

    exit_code = USAGE


@dataclass(frozen=True)
class Model:
    session: Any  # onnxruntime.InferenceSession
    card: ModelCard
    input_name: str
    fixed_batch: int | None  # the batch size a model exported without a dynamic batch dimension takes


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def external_data_locations(proto) -> Iterator[str]:
    """The `location` of every tensor stored outside the model file, subgraphs and functions included."""
    from onnx import TensorProto

    def node_tensors(nodes):
        for node in nodes:
            for attr in node.attribute:
                yield from ([attr.t] if attr.HasField("t") else [])
                yield from attr.tensors
                for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from graph_tensors(graph)

    def graph_tensors(graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        yield from node_tensors(graph.node)

    tensors = [*graph_tensors(proto.graph), *(t for f in proto.functions for t in node_tensors(f.node))]
    for tensor in tensors:
        if tensor.data_location == TensorProto.EXTERNAL:
            yield {e.key: e.value for e in tensor.external_data}.get("location", "")


def check_external_data(proto, folder: Path) -> None:
    """Refuse external data outside the model's folder (absolute, `..`, or a link that leads out)."""
    folder = folder.resolve()
    for location in external_data_locations(proto):
        if not location or Path(location).is_absolute() or not (folder / location).resolve().is_relative_to(folder):
            raise ModelError(f"refers to external data {location!r} outside its own folder; refused")


def assumed_card(recipe: str, output: str, classes: int) -> ModelCard:
    """`--assume`: class names are the output indices, pixels in [0, 1] not standardised."""
    names = [str(i) for i in range(classes)]
    return ModelCard("unknown", "unknown", names, 0.0, 1.0, recipe, math.nan, {}, INPUT_SPEC, output)


def open_session(path: Path, device: str):
    """An onnxruntime session of a file checked to be ONNX with no external data outside its folder."""
    import onnx
    import onnxruntime as ort

    if not path.exists():
        raise ModelError("no such file")
    if path.is_dir():
        raise ModelError("is a directory, not an ONNX file")
    try:
        proto = onnx.load(path, load_external_data=False)
    except OSError as e:
        raise ModelError(f"cannot read it ({e.strerror})") from None
    except Exception as e:  # noqa: BLE001 - protobuf raises several types for files that are not ONNX
        raise ModelError(f"not an ONNX model ({first_line(e)})") from None
    if not proto.graph.node:
        raise ModelError("not an ONNX model (no graph)")
    check_external_data(proto, path.parent)
    available = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise BadUsage(f"--device cuda: this onnxruntime has no CUDA provider (it has {', '.join(available)}); "
                       "install onnxruntime-gpu or use --device cpu")
    providers = ["CUDAExecutionProvider"] * (device == "cuda") + ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
        raise ModelError(f"onnxruntime cannot load it ({first_line(e)})") from None
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise BadUsage("--device cuda: onnxruntime could not start CUDA (no GPU, or CUDA libraries missing)")
    return session


def load_model(path: Path, device: str = "cpu", assume: str | None = None) -> Model:
    """The session and the model's card, after checking that `infer` can feed the model."""
    session = open_session(path, device)
    inputs = session.get_inputs()
    shape = list(inputs[0].shape) if len(inputs) == 1 else []
    if len(shape) != 4 or shape[1:] != [1, IMAGE_SIZE, IMAGE_SIZE] or inputs[0].type != "tensor(float)":
        found = ", ".join(f"{i.type} {i.shape}" for i in inputs)
        raise ModelError(f"takes {found}; infer feeds one float tensor (batch, 1, {IMAGE_SIZE}, {IMAGE_SIZE})")
    fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    meta = session.get_modelmeta().custom_metadata_map
    try:
        card = ModelCard.from_metadata(meta)
    except MetadataError as e:
        if assume is None:
            raise ModelError(f"{e}; --assume digit|fashion uses defaults for a model without metadata") from None
        output = session.get_outputs()[0].name
        zeros = np.zeros((fixed_batch or 1, 1, IMAGE_SIZE, IMAGE_SIZE), np.float32)
        card = assumed_card(assume, output, session.run([output], {inputs[0].name: zeros})[0].shape[-1])
    if card.output not in {o.name for o in session.get_outputs()}:
        raise ModelError(f"has no output {card.output!r}, which its metadata names")
    return Model(session, card, inputs[0].name, fixed_batch)


def logits(model: Model, x: np.ndarray) -> np.ndarray:
    """(N, classes) raw outputs for images (N, 28, 28) in [0, 1], light on dark."""
    x = ((x - model.card.mean) / model.card.std).astype(np.float32)[:, None]  # (N, 1, 28, 28)
    step = model.fixed_batch or len(x)
    out = []
    for i in range(0, len(x), step):
        chunk = x[i:i + step]
        padded = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), np.float32)])
        out.append(model.session.run([model.card.output], {model.input_name: padded})[0][:len(chunk)])
    result = np.concatenate(out)
    if result.ndim != 2:
        raise ModelError(f"outputs shape {list(result.shape)}; infer expects (batch, classes)")
    return result


def probabilities(model: Model, x: np.ndarray) -> np.ndarray:
    z = logits(model, x)
    if z.shape[1] != len(model.card.class_names):
        raise ModelError(f"outputs {z.shape[1]} scores, but its metadata names {len(model.card.class_names)} classes")
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def image_extensions() -> set[str]:
    from PIL import Image

    return set(Image.registered_extensions())


def expand(args: tuple[str, ...]) -> tuple[list[Path], list[tuple[str, str]]]:
    """(image files, (argument, problem) pairs): a folder gives the images in it, a pattern its matches."""
    files, problems = [], []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            extensions = image_extensions()
            found = sorted(p for p in path.iterdir()
                           if p.suffix.lower() in extensions and not p.name.startswith(".") and p.is_file())
            problem = "folder holds no images"
        elif path.exists():
            found, problem = [path], ""
        elif glob.has_magic(arg):
            found = sorted(Path(p) for p in glob.glob(arg) if Path(p).is_file())
            problem = "no file matches this pattern"
        else:
            found, problem = [], "no such file or directory"
        files += found
        if not found:
            problems.append((arg, problem))
    return files, problems


def classify(model: Model, files: list[Path], raw: bool = False, batch_size: int = 64) -> Iterator[list[tuple]]:
    """Per batch of files, in order: (file, probabilities or None, error or None)."""
    recipe = None if raw else model.card.preprocess
    for start in range(0, len(files), batch_size):
        batch, arrays = [], []
        for path in files[start:start + batch_size]:
            try:
                arrays.append(prepare(path, recipe))
                batch.append((path, None))
            except ImageError as e:
                batch.append((path, str(e)))
            except Exception as e:  # noqa: BLE001 - one odd file must not stop the others
                batch.append((path, f"cannot be read as an image ({type(e).__name__}: {first_line(e)})"))
        probs = iter(probabilities(model, np.stack(arrays)) if arrays else [])
        yield [(path, None if error else next(probs), error) for path, error in batch]


class Report:
    """One record per classified image on `out`: text lines, a JSON array, or CSV rows (one per rank)."""

    def __init__(self, fmt: str, class_names: list[str], top_k: int, out=None):
        self.fmt, self.names, self.top_k, self.out, self.count = fmt, class_names, top_k, out or sys.stdout, 0
        if fmt == "csv":
            self.csv = csv.writer(self.out, lineterminator="\n")
            self.csv.writerow(["file", "rank", "index", "class", "probability"])
        elif fmt == "json":
            self.out.write("[")

    def add(self, path: Path, probs: np.ndarray) -> None:
        best = [(int(i), float(probs[i])) for i in np.argsort(-probs, kind="stable")[:self.top_k]]
        if self.fmt == "text":
            self.out.write(f"{path}: " + ", ".join(f"{self.names[i]} ({p:.3f})" for i, p in best) + "\n")
        elif self.fmt == "json":
            record = {"file": str(path), "predictions": [
                {"class": self.names[i], "index": i, "probability": round(p, 6)} for i, p in best]}
            self.out.write(("," if self.count else "") + "\n  " + json.dumps(record))
        else:
            for rank, (i, p) in enumerate(best, 1):
                self.csv.writerow([str(path), rank, i, self.names[i], round(p, 6)])
        self.count += 1
        self.out.flush()

    def close(self) -> None:
        if self.fmt == "json":
            self.out.write("\n]\n" if self.count else "]\n")


def error(name: Any, problem: str) -> None:
    click.echo(f"Error: {name}: {problem}", err=True)


def progress(total: int):
    """A progress bar on stderr when there are many files and stderr is a terminal, else nothing."""
    if total < PROGRESS_MIN or not sys.stderr.isatty():
        return contextlib.nullcontext()
    return click.progressbar(length=total, label="classifying", file=sys.stderr, show_pos=True)


@click.command(help="Classify images (files, folders of images, or glob patterns) with an exported ONNX model. "
                    "Everything about the model (class names, normalisation, preprocessing) comes from its metadata.",
               epilog="Exit status: 0 all classified; 1 some files could not be classified (the others are reported); "
                      "2 usage error: a bad option or model, or a path that names no image.")
@click.argument("images", nargs=-1, required=True)
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path), help="An exported .onnx file.")
@click.option("--top-k", default=1, show_default=True, type=click.IntRange(min=1), help="Classes to report per image.")
@click.option("--format", "fmt", default="text", show_default=True, type=click.Choice(FORMATS),
              help="text: 'file: class (probability)'; json: an array of records; csv: one row per file and rank.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Images per onnxruntime call.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]),
              help="cuda needs onnxruntime-gpu; refused, not silently run on the CPU, when it is missing.")
@click.option("--raw", is_flag=True, help="The images are already 28x28, light on dark (MNIST-style): "
                                          "only convert them to grey, no inversion, cropping or centring.")
@click.option("--assume", type=click.Choice(PREPROCESS_RECIPES),
              help="For a model without this project's metadata: use this preprocessing, pixels in [0, 1] "
                   "without standardisation, and the output indices as class names.")
def main(images, model_path, top_k, fmt, batch_size, device, raw, assume) -> None:
    try:
        model = load_model(model_path, device, assume)
    except ModelError as e:
        raise BadUsage(f"{model_path}: {e}") from None
    files, problems = expand(images)
    for arg, problem in problems:
        error(arg, problem)
    report = Report(fmt, model.card.class_names, top_k)
    failed = 0
    with progress(len(files)) as bar:
        try:
            for batch in classify(model, files, raw, batch_size):
                if bar:
                    click.echo("\r\033[K", err=True, nl=False)  # clear the bar's line before writing under it
                for path, probs, problem in batch:
                    if problem:
                        error(path, problem)
                        failed += 1
                    else:
                        report.add(path, probs)
                if bar:
                    bar.update(len(batch))
        except ModelError as e:
            raise BadUsage(f"{model_path}: {e}") from None
    report.close()
    sys.exit(USAGE if problems else FAILED if failed else 0)


if __name__ == "__main__":
    main()
