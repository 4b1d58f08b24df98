"""The limits on what users send: model files (size, external data, ONNX at all) and encoded images (bytes,
pixels). Each refusal is a ModelError or an ImageError of one line, raised before the expensive work."""
from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from digitlens.errors import ImageError, ModelError
from digitlens.text import first_line

MAX_MODEL_BYTES = 256 * 2**20  # an .onnx file and its external data together
MAX_IMAGE_BYTES = 50 * 2**20  # an encoded image (file, bytes or stream) larger than this is refused unread
MAX_PIXELS = 20_000_000  # width x height after JPEG draft-mode decoding; keeps one image to about 300 MB
MAX_ASPECT = 50  # longer side / shorter side: a strip thinner than this holds no digit, and shrinking one
                 # of 20 million x 1 pixels took 1.2 GB and 7 s


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


def external_data_size(proto, folder: Path) -> int:
    """Bytes of external data; refuses data outside the model's folder (absolute, `..`, a link leading out)."""
    folder, total = folder.resolve(), 0
    for location in set(external_data_locations(proto)):
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(folder):
            raise ModelError(f"refers to external data {location!r} outside its own folder; refused")
        if not target.is_file():
            raise ModelError(f"its external data {location!r} is missing or not a regular file")
        total += target.stat().st_size
    return total


def check_model_file(path: Path):
    """The parsed ONNX graph of a regular file within MAX_MODEL_BYTES (external data included)."""
    import onnx

    try:
        st = path.stat()
    except FileNotFoundError:
        raise ModelError("no such file") from None
    except OSError as e:
        raise ModelError(f"cannot read it ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelError("is a directory, not an ONNX file")
    if not stat.S_ISREG(st.st_mode):
        raise ModelError("is not a regular file (a pipe or a device?); give an .onnx file")
    if st.st_size > MAX_MODEL_BYTES:
        raise ModelError(f"is larger than {MAX_MODEL_BYTES // 2**20} MB; refused")
    try:
        proto = onnx.load(path, load_external_data=False)
    except OSError as e:
        raise ModelError(f"cannot read it ({e.strerror})") from None
    except Exception as e:  # noqa: BLE001 - protobuf raises several types for files that are not ONNX
        hint = "; give the exported .onnx file (artifacts/<name>.onnx)" if path.suffix.lower() != ".onnx" else ""
        raise ModelError(f"not an ONNX model ({first_line(e)}){hint}") from None
    if not proto.graph.node:
        raise ModelError("not an ONNX model (no graph)")
    if st.st_size + external_data_size(proto, path.parent) > MAX_MODEL_BYTES:
        raise ModelError(f"with its external data is larger than {MAX_MODEL_BYTES // 2**20} MB; refused")
    return proto


def read_encoded(source: str | os.PathLike | bytes | bytearray | memoryview | BinaryIO) -> bytes:
    """The encoded bytes of a path, a bytes-like object or a binary file object, size-checked."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            if not path.is_file():
                raise ImageError("not a regular file" if path.exists() else "no such file")
            if path.stat().st_size > MAX_IMAGE_BYTES:
                raise ImageError(f"larger than {MAX_IMAGE_BYTES // 2**20} MB; refused")
            data = path.read_bytes()
        except OSError as e:
            raise ImageError(f"cannot read it ({e.strerror or e})") from None
    elif hasattr(source, "read"):
        try:
            data = source.read(MAX_IMAGE_BYTES + 1)
        except (OSError, ValueError) as e:
            raise ImageError(f"cannot read the file object ({e})") from None
        if isinstance(data, str):
            raise ImageError("a text file object; open the image in binary mode ('rb')")
        if not isinstance(data, (bytes, bytearray)):
            raise ImageError(f"file object's read() returned {type(data).__name__}, not bytes")
    else:
        raise ImageError(f"unsupported input type {type(source).__name__}; give a path, bytes, a binary file, "
                         "a PIL image or a numpy array")
    if not data:
        raise ImageError("empty file")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"larger than {MAX_IMAGE_BYTES // 2**20} MB; refused")
    return data


def check_size(w: int, h: int) -> None:
    """Refuse an image of w x h pixels before the work it would cost: too many pixels, none, or a strip."""
    if w * h > MAX_PIXELS:
        raise ImageError(f"{w}x{h} pixels is more than the {MAX_PIXELS:,} this tool decodes; resize it first")
    if not w or not h:
        raise ImageError("has no pixels")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ImageError(f"{w}x{h} pixels is more than {MAX_ASPECT} times longer than wide; crop it to the content")


