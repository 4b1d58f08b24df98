"""Issue 12: for any input, one 'Error: ...' line and the documented exit status, in bounded time and memory,
nothing lost, and outputs others can read. Cases that could hang or eat memory run in a subprocess with a capped
address space and a timeout: a regression fails the test instead of the machine."""
import contextlib
import csv
import dataclasses
import gzip
import http.server
import io
import json
import math
import os
import re
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps

from digitlens import Classifier, ImageError, ModelError, images, infer, limits
from digitlens.files import atomic_path
from digitlens.limits import MAX_MODEL_BYTES
from digitlens.metadata import ModelInfo
from digitlens.text import one_line
from pipeline import common, datasets
from pipeline import download as data
from pipeline.common import PipelineError, Stopped, stops_deferred
from tests.conftest import ROOT, tiny_onnx

MB = 2**20
MEMORY_CAP = 1500 * MB  # address space of a subprocess that runs a hang or memory case
INFO = ModelInfo("mnist", "tiny", datasets.DATASETS["mnist"].classes, 0.1307, 0.3081, "digit")
OFFLINE = ("import dataclasses\nfrom pipeline import datasets\nfor name, info in list(datasets.DATASETS.items()):\n"
           "    datasets.DATASETS[name] = dataclasses.replace(info, urls=['http://127.0.0.1:9/'])\n")


def limited(code: str, *args, cap: int = MEMORY_CAP, limit: str = "RLIMIT_AS", env=None, timeout: float = 120,
            popen: bool = False, **kwargs):
    """Run Python `code` with `args` in a subprocess whose memory is capped at `cap` bytes."""
    setup = f"import resource\nresource.setrlimit(resource.{limit}, ({cap}, {cap}))\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8", "LC_ALL": "C.UTF-8", **(env or {})}
    cmd = [sys.executable, "-c", setup + code, *(os.fspath(a) if isinstance(a, os.PathLike) else a for a in args)]
    kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "env": env, **kwargs}
    return subprocess.Popen(cmd, **kwargs) if popen else subprocess.run(cmd, timeout=timeout, **kwargs)


def module(name: str) -> str:
    return f"import runpy\nrunpy.run_module({name!r}, run_name='__main__', alter_sys=True)\n"


def run_infer(*args, **kwargs) -> subprocess.CompletedProcess:
    """`python -m digitlens.infer ARGS` (the console script's code), memory-capped, on a UTF-8 stdout."""
    return limited(module("digitlens.infer"), *args, **kwargs)


def one_error(stderr: bytes | str, *parts: str) -> str:
    """The only line on stderr: valid UTF-8, 'Error: ...', holding each of `parts`."""
    text = stderr.decode("utf-8") if isinstance(stderr, bytes) else stderr
    lines = text.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in text, text
    assert all(p in lines[0] for p in parts), text
    return lines[0]


def model(path, weights=None, info: ModelInfo = INFO, batch1_reshape=False, metadata: dict | None = None):
    """The stand-in model with `info`'s metadata (and `metadata` over it)."""
    return tiny_onnx(path, metadata=info.to_metadata() | (metadata or {}), weights=weights, batch1_reshape=batch1_reshape)


def digit_png(path, side: int = 60):
    """A dark bar on white, which every preprocessing finds content in; `path` may be bytes."""
    a = np.full((side, side), 255, np.uint8)
    a[side // 6:-side // 6, side * 2 // 5:side * 3 // 5] = 0
    Image.fromarray(a).save(path, "PNG")
    return path


def not_an_image(path):
    with open(path, "wb") as f:
        f.write(b"not an image\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return model(tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    return digit_png(tmp_path_factory.mktemp("img") / "bar.png")


# ---------------------------------------------------------------------------- infer: names

@pytest.mark.parametrize("fmt", infer.OUTPUT_FORMATS)
def test_undecodable_file_names_are_escaped_alike_in_every_format(tmp_path, tiny, fmt):
    folder = os.fsencode(tmp_path)
    digit_png(folder + b"/seven\xff.png")
    not_an_image(folder + b"/notes\xfe.png")
    result = run_infer(tmp_path, "--model", tiny, "--format", fmt)
    assert result.returncode == 1
    one_error(result.stderr, f"{tmp_path}/notes\\xfe.png: not an image")
    out = result.stdout.decode("utf-8")  # strict: valid UTF-8
    name = f"{tmp_path}/seven\\xff.png"
    if fmt == "json":
        assert [r["file"] for r in json.loads(out)] == [name] and "\\ud" not in out  # no lone surrogates
    elif fmt == "csv":
        assert [row[0] for row in csv.reader(io.StringIO(out, newline=""))] == ["file", name]
    else:
        assert [line.split(": ")[0] for line in out.splitlines()] == [name]


def test_undecodable_file_name_in_the_api_gives_valid_json(tmp_path, tiny):
    path = os.fsdecode(digit_png(os.fsencode(tmp_path) + b"/seven\xff.png"))
    (result,) = Classifier(tiny).classify([path])
    assert result.ok and result.source == path  # the name as given, so that it still opens the file
    record = json.dumps(result.to_dict(), ensure_ascii=False).encode("utf-8")  # strict: fails on a lone surrogate
    assert json.loads(record)["file"] == f"{tmp_path}/seven\\xff.png"


NAMES = ["cr\rname.png", "lf\nname.png", "crlf\r\nname.png", 'comma,"quote".png', "escape\x1b[31m.png", "tab\t.png"]


@pytest.mark.parametrize("fmt", infer.OUTPUT_FORMATS)
def test_names_with_line_breaks_keep_every_record_whole(tmp_path, tiny, fmt):
    files = [digit_png(tmp_path / n) for n in NAMES]
    bad = not_an_image(tmp_path / "bad\nname.png")
    result = run_infer(*files, bad, "--model", tiny, "--format", fmt)
    assert result.returncode == 1
    one_error(result.stderr, f"{tmp_path}/bad\\nname.png: not an image")
    out = result.stdout.decode("utf-8")
    if fmt == "csv":  # RFC 4180 quoting: Python's csv reader gives every name back
        assert [row[0] for row in csv.reader(io.StringIO(out, newline=""))] == ["file", *map(str, files)]
    elif fmt == "json":
        assert [r["file"] for r in json.loads(out)] == list(map(str, files))
    else:  # one line per record, the line-breaking characters escaped
        assert [line.rsplit(": ", 1)[0] for line in out.splitlines()] == [one_line(str(f)) for f in files]


# ---------------------------------------------------------------------------- infer: models

@pytest.mark.parametrize("fmt", infer.OUTPUT_FORMATS)
def test_model_failing_inside_onnxruntime_is_a_model_error_after_a_complete_document(tmp_path, fmt):
    batch1 = model(tmp_path / "batch1.onnx", batch1_reshape=True)
    notes = not_an_image(tmp_path / "notes.png")
    goods = [digit_png(tmp_path / f"{i}.png") for i in range(3)]
    # batches of two: [notes, 0.png] runs at batch 1 and works; [1.png, 2.png] fails inside onnxruntime
    result = run_infer(notes, *goods, "--model", batch1, "--format", fmt, "--batch-size", "2")
    assert result.returncode == 2
    lines = result.stderr.decode("utf-8").splitlines()
    assert len(lines) == 2 and "Traceback" not in result.stderr.decode(), lines
    assert lines[0].startswith(f"Error: {notes}: not an image")
    assert lines[1].startswith(f"Error: {batch1}: onnxruntime failed running it (")
    out = result.stdout.decode("utf-8")
    if fmt == "json":
        assert [r["file"] for r in json.loads(out)] == [str(goods[0])]
    elif fmt == "csv":
        rows = list(csv.reader(io.StringIO(out, newline="")))
        assert [r[0] for r in rows] == ["file", str(goods[0])] and out.endswith("\r\n")
    else:
        assert [line.split(": ")[0] for line in out.splitlines()] == [str(goods[0])] and out.endswith("\n")


def test_model_failing_inside_onnxruntime_raises_model_error_in_the_api(tmp_path, png):
    clf = Classifier(model(tmp_path / "batch1.onnx", batch1_reshape=True))
    assert clf.predict(png).ok
    with pytest.raises(ModelError, match="onnxruntime failed running it"):
        clf.predict([png, png])


def normalization(mean, std) -> str:
    return json.dumps({"mean": mean, "std": std})


BAD_METADATA = {  # id -> (metadata entries replaced, what the error says)
    "nan-mean": ({"normalization": normalization(math.nan, 0.3)}, "normalization.mean must be a finite number"),
    "inf-std": ({"normalization": normalization(0.1, math.inf)}, "normalization.std must be a finite number"),
    "tiny-std": ({"normalization": normalization(0.1, 1e-7)}, "normalization.std must be above 0.001"),
    "zero-std": ({"normalization": normalization(0.1, 0)}, "normalization.std must be above 0.001"),
    "negative-std": ({"normalization": normalization(0.1, -0.3)}, "normalization.std must be above 0.001"),
    "string-mean": ({"normalization": normalization("0.1", 0.3)}, "normalization.mean must be a finite number (got '0.1')"),
    "bool-std": ({"normalization": normalization(0.1, True)}, "normalization.std must be a finite number (got True)"),
    "names-in-a-string": ({"class_names": json.dumps("0123456789")}, "class_names must be a non-empty list of strings"),
    "numbers-as-names": ({"class_names": json.dumps(list(range(10)))}, "class_names must be a non-empty list of strings"),
    "preprocess-number": ({"preprocess": "1"}, "preprocess must be a string (got 1)"),
    "accuracy-string": ({"test_accuracy": '"99"'}, "test_accuracy must be a finite number"),
    "deeply-nested": ({"params": "[" * 100_000 + "]" * 100_000}, "model metadata is not JSON"),
}


@pytest.mark.parametrize("case", list(BAD_METADATA))
def test_bad_metadata_is_refused_not_coerced(tmp_path, png, case):
    replaced, reason = BAD_METADATA[case]
    path = model(tmp_path / "m.onnx", metadata=replaced)
    result = CliRunner().invoke(infer.main, [str(png), "--model", str(path)])
    assert result.exit_code == 2 and result.stdout == ""
    one_error(result.stderr, f"Error: {path}: model metadata", reason)
    with pytest.raises(ModelError, match=re.escape(reason)):
        Classifier(path)


@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf])
def test_non_finite_logits_are_an_error_for_that_image(tmp_path, png, poison):
    weights = np.full((784, 10), 0.01, np.float32)
    weights[:, 3] = poison
    # mean -1: every model input is at least 1, so the poisoned logit is exactly `poison`, never 0 * inf
    path = model(tmp_path / "m.onnx", weights, dataclasses.replace(INFO, mean=-1.0, std=1.0))
    result = run_infer(png, "--model", path, "--format", "json")
    assert result.returncode == 1 and json.loads(result.stdout) == []
    one_error(result.stderr, f"Error: {png}: the model's output is not finite")
    (outcome,) = Classifier(path).classify([png])
    assert outcome.error == "the model's output is not finite (NaN or infinity)"
    with pytest.raises(ImageError, match="not finite"):
        Classifier(path).predict(png)


def sparse_file(path, size: int):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def big_external_data(folder):
    """A model whose weights are stored beside it in w.bin, that file grown to 256 MB (sparse)."""
    import onnx

    onnx.save_model(onnx.load(model(folder / "m.onnx")), folder / "m.onnx", save_as_external_data=True,
                    location="w.bin", size_threshold=0)
    sparse_file(folder / "w.bin", MAX_MODEL_BYTES)
    return folder / "m.onnx"


MODEL_FILES = {  # id -> (writer(folder) -> model path, what the error says)
    "fifo": (lambda d: os.mkfifo(d / "m.onnx") or d / "m.onnx", "is not a regular file"),
    "dev-zero": (lambda d: "/dev/zero", "is not a regular file"),
    "over-256-mb": (lambda d: sparse_file(d / "m.onnx", MAX_MODEL_BYTES + 1), "is larger than 256 MB"),
    "external-data-over-256-mb": (big_external_data, "with its external data is larger than 256 MB"),
}


@pytest.mark.parametrize("case", list(MODEL_FILES))
def test_model_file_that_is_not_regular_or_too_large_is_refused_unread(tmp_path, png, case):
    write, reason = MODEL_FILES[case]
    path = write(tmp_path)
    result = run_infer(png, "--model", path, timeout=60)  # a read of the fifo would wait for ever
    assert result.returncode == 2 and result.stdout == b""
    one_error(result.stderr, f"Error: {path}: {reason}")
    with pytest.raises(ModelError, match=reason):
        Classifier(path)


# ---------------------------------------------------------------------------- infer: images

def transparent_png(path, side: int):
    """A valid RGBA PNG of side x side transparent pixels, written without ever holding them."""
    row, deflate = bytes(1 + 4 * side), zlib.compressobj(1)  # each row: filter 0, then its pixels
    idat = b"".join(deflate.compress(row * 64) for _ in range(side // 64)) + deflate.compress(row * (side % 64))
    idat += deflate.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0)  # 8 bits, RGBA
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_small_png_of_too_many_pixels_is_refused_before_decoding(tmp_path, tiny, png):
    """9400x9400 RGBA in 1.5 MB: under Pillow's own bomb limit, over the project's pixel limit."""
    huge = transparent_png(tmp_path / "huge.png", 9400)
    assert huge.stat().st_size < 2 * MB and 9400**2 < Image.MAX_IMAGE_PIXELS
    result = run_infer(huge, png, "--model", tiny)
    assert result.returncode == 1 and result.stdout.decode().startswith(f"{png}: ")
    one_error(result.stderr, f"Error: {huge}: 9400x9400 pixels is more than the 20,000,000 this tool decodes")
    api = limited("import sys\nfrom digitlens import Classifier, ImageError\ntry:\n"
                  "    Classifier(sys.argv[1]).predict(sys.argv[2])\nexcept ImageError as e:\n    print(e)\n", tiny, huge)
    assert api.returncode == 0 and "9400x9400 pixels is more than" in api.stdout.decode(), api.stderr.decode()


MEASURE = """import resource, sys
from digitlens import images
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    images.prepare(sys.argv[1], "digit")
except images.ImageError:
    pass
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_memory_per_image_stays_near_the_documented_bound(tmp_path):
    """The largest accepted image in the costliest mode (RGBA: composited) takes about 300 MB, not gigabytes."""
    side = math.isqrt(limits.MAX_PIXELS)
    path = transparent_png(tmp_path / "largest.png", side)
    result = limited(MEASURE, path)
    assert result.returncode == 0, result.stderr.decode()
    assert int(result.stdout) < 350 * MB


def corrupt_exif_images(folder):
    """A JPEG and a PNG whose EXIF data make Pillow warn when it reads them."""
    bar = Image.open(digit_png(folder / "plain.png"))
    buf = io.BytesIO()
    bar.save(buf, "JPEG")
    jpeg = buf.getvalue()
    payload = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff" + bytes(20)  # 65535 entries announced, 20 bytes given
    (folder / "exif.jpg").write_bytes(jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:])
    buf = io.BytesIO()
    bar.save(buf, "PNG")
    body = b"MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\xff\xff\xff\xff\x00\x00\x00\x00"  # orientation, huge count
    exif = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    (folder / "exif.png").write_bytes(buf.getvalue()[:33] + exif + buf.getvalue()[33:])  # after IHDR
    return [folder / "exif.jpg", folder / "exif.png"]


def test_pillow_exif_warnings_do_not_reach_stderr(tmp_path, tiny):
    files = corrupt_exif_images(tmp_path)
    for f in files:
        with pytest.warns(UserWarning):  # the inputs do make Pillow warn
            ImageOps.exif_transpose(Image.open(f))
    result = run_infer(*files, "--model", tiny)
    assert result.returncode == 0 and result.stderr == b""
    assert len(result.stdout.decode().splitlines()) == len(files)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # opening the JPEG is the caller's business, and warns
        opened = [Image.open(f) for f in files]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for f, img in zip(files, opened):
            images.prepare(f, "digit")
            images.prepare(img, "digit")
    assert caught == []


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\n%%EndComments\n"
       b"newpath 4 4 moveto 24 24 lineto stroke\nshowpage\n%%EOF\n")
OTHER_FORMATS = {  # Pillow opens these; the project does not
    "drawing.eps": lambda p: p.write_bytes(EPS),
    "grey.pgm": lambda p: Image.new("L", (28, 28)).save(p),
    "icon.ico": lambda p: Image.new("RGB", (32, 32)).save(p),
}


@pytest.mark.parametrize("name", list(OTHER_FORMATS))
def test_only_the_documented_formats_are_opened(tmp_path, tiny, name):
    path = tmp_path / name
    OTHER_FORMATS[name](path)
    assert Image.open(path).format not in images.FORMATS  # Pillow alone would take it (EPS: to Ghostscript)
    result = run_infer(path, "--model", tiny)
    assert result.returncode == 1 and result.stdout == b""
    one_error(result.stderr, f"Error: {path}: not an image in a supported format (PNG, JPEG, GIF, BMP, TIFF, WEBP)")
    with pytest.raises(ImageError, match="not an image in a supported format"):
        Classifier(tiny).predict(path)


# ---------------------------------------------------------------------------- infer: output

def test_closed_pipe_ends_quietly(tmp_path, tiny):
    for i in range(300):  # 3,000 CSV rows: more than a pipe holds, so the writes meet the closed end
        Image.fromarray(np.full((28, 28), i % 256, np.uint8)).save(tmp_path / f"{i:03d}.png")
    proc = limited(module("digitlens.infer"), tmp_path, "--model", tiny, "--raw", "--top-k", "10", "--format", "csv",
                   popen=True)
    assert proc.stdout.readline() == b"file,rank,index,class,probability\r\n"
    proc.stdout.close()  # as `| head -1` does
    try:
        stderr = proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert stderr == b"" and proc.returncode != 0


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
@pytest.mark.parametrize("fmt", infer.OUTPUT_FORMATS)
def test_full_disk_is_one_error_line(tiny, png, fmt):
    with open("/dev/full", "wb") as full:
        result = run_infer(png, "--model", tiny, "--format", fmt, stdout=full)
    assert result.returncode == 1
    assert result.stderr == b"Error: cannot write the output (No space left on device)\n"


# ---------------------------------------------------------------------------- data stage

@pytest.fixture
def http_mirror():
    """start(respond) -> (URL, event set on the first request): a local mirror answering every GET with
    respond(handler, stopping); stopped after the test."""
    stopping, servers = threading.Event(), []

    def start(respond):
        requested = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                requested.set()
                with contextlib.suppress(OSError):  # the client gave up
                    respond(self, stopping)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}", requested

    yield start
    stopping.set()
    for server in servers:
        server.shutdown()
        server.server_close()


def drip(handler, stopping):
    """A valid .gz one byte every 0.2 s: each read gets something, the file takes hours."""
    content = gzip.compress(np.random.default_rng(0).bytes(64 * 1024))
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(content)))
    handler.end_headers()
    for byte in content:
        if stopping.wait(0.2):
            break
        handler.wfile.write(bytes([byte]))


def endless(handler, stopping):
    """A gzip stream that never ends and never expands: empty deflate blocks, for ever."""
    handler.send_response(200)
    handler.end_headers()
    handler.wfile.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")
    block = b"\x00\x00\x00\xff\xff" * 10_000  # a stored block of no bytes, not the last one
    while not stopping.is_set():
        handler.wfile.write(block)


def gzip_bomb(root):
    """mnist/train-images-idx3-ubyte.gz of 2 GB of zeros in about 2 MB (128 gzip members of 16 MB each)."""
    folder = root / "mnist"
    folder.mkdir(parents=True)
    member = gzip.compress(bytes(16 * MB), compresslevel=9)
    with open(folder / "train-images-idx3-ubyte.gz", "wb") as f:
        for _ in range(128):
            f.write(member)
    return str(root)


IMAGES_CAP = data.idx_size("train-images-idx3-ubyte")
MIRRORS = {  # id -> (mirror(tmp_path, http_mirror), extra environment, what the error says)
    "slow-drip": (lambda tmp, http: http(drip)[0], {data.TIMEOUT_ENV: "1"}, "(not complete after 1 s ($DATASET_TIMEOUT))"),
    "endless": (lambda tmp, http: http(endless)[0], {}, f"(more than {IMAGES_CAP + data.GZIP_OVERHEAD:,} bytes; refused)"),
    "gzip-bomb": (lambda tmp, http: gzip_bomb(tmp / "mirror"), {},
                  f"(expands to more than the {IMAGES_CAP:,} bytes of train-images-idx3-ubyte; refused)"),
}


@pytest.mark.parametrize("case", list(MIRRORS))
def test_bad_mirror_is_cut_off_in_bounded_time_and_memory(tmp_path, http_mirror, case):
    mirror, env, reason = MIRRORS[case]
    env = {data.MIRROR_ENV: mirror(tmp_path, http_mirror), **env}
    out = tmp_path / "data" / "mnist"
    # a bound, not a speed test: the deadline is 1 s and the caps ~50 MB; a stage that hung would time out here
    result = limited(OFFLINE + module("pipeline.stages.data"), "--dataset", "mnist", "--out", out, env=env, timeout=60)
    assert result.returncode == 1
    one_error(result.stderr, "Error: mnist/train-images-idx3-ubyte: no source worked", reason)
    assert list((tmp_path / "data").iterdir()) == []  # nothing written, no staging folder left


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stopped_data_stage_leaves_no_staging_folder(tmp_path, http_mirror, signum):
    url, requested = http_mirror(drip)
    out = tmp_path / "data" / "mnist"
    proc = limited(OFFLINE + module("pipeline.stages.data"), "--dataset", "mnist", "--out", out,
                   env={data.MIRROR_ENV: url, data.TIMEOUT_ENV: "60"}, popen=True)
    try:
        assert requested.wait(60), "the stage never asked the mirror"
        time.sleep(0.5)
        assert [p.name.startswith(".mnist.") for p in (tmp_path / "data").iterdir()] == [True]  # it is staging
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum
    one_error(stderr, f"Error: stopped by {signum.name}; nothing written")
    assert list((tmp_path / "data").iterdir()) == []


@pytest.fixture
def offline_hosts(monkeypatch):
    for name, info in datasets.DATASETS.items():
        monkeypatch.setitem(datasets.DATASETS, name, dataclasses.replace(info, urls=["http://127.0.0.1:9/"]))


def test_download_timeout_must_be_a_positive_number(monkeypatch):
    for value in ("0", "-1", "soon", "inf", "nan"):
        monkeypatch.setenv(data.TIMEOUT_ENV, value)
        with pytest.raises(PipelineError, match=f"DATASET_TIMEOUT={value}: give a number of seconds above 0"):
            data.download_timeout()
    monkeypatch.delenv(data.TIMEOUT_ENV)
    assert data.download_timeout() == data.DEFAULT_TIMEOUT


def test_mirror_file_that_is_not_regular_is_not_read(tmp_path, monkeypatch, offline_hosts):
    (tmp_path / "mnist").mkdir()
    os.mkfifo(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz")
    monkeypatch.setenv(data.MIRROR_ENV, str(tmp_path))
    with pytest.raises(PipelineError, match=r"train-labels-idx1-ubyte.gz \(not a regular file\)"):
        data.fetch_file("mnist", "train-labels-idx1-ubyte")


# ---------------------------------------------------------------------------- outputs others can read

@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_written_files_and_folders_get_the_mode_the_umask_gives(tmp_path, monkeypatch, offline_hosts, mirror, mask):
    monkeypatch.setenv(data.MIRROR_ENV, str(mirror))
    previous = os.umask(mask)
    try:
        common.write_json(tmp_path / "reports" / "metrics.json", {"accuracy": 99.0})
        with atomic_path(tmp_path / "model.pt") as tmp:
            tmp.write_bytes(b"weights")
        data.fetch("mnist", tmp_path / "data" / "mnist", log=lambda msg: None)
    finally:
        os.umask(previous)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    files = [tmp_path / "reports" / "metrics.json", tmp_path / "model.pt", *(tmp_path / "data" / "mnist").iterdir()]
    assert len(files) == 6 and {mode(f) for f in files} == {0o666 & ~mask}
    assert mode(tmp_path / "data" / "mnist") == 0o777 & ~mask


# ---------------------------------------------------------------------------- params.yaml

BILLION_LAUGHS = "lol0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10))


def params_text(old: str = "", new: str = "") -> str:
    text = (ROOT / "params.yaml").read_text()
    assert old in text
    return text.replace(old, new, 1)


def line_of(text: str, line: str) -> int:
    return text.splitlines().index(line) + 1


DUPLICATE = params_text("seed: 0\n", "seed: 0\nseed: 1\n")
NESTED_DUPLICATE = params_text("    lr: 0.001\n", "    lr: 0.001\n    lr: 0.002\n")
BAD_PARAMS = {  # id -> (params.yaml's text, what the one line says after 'Error: FILE: ')
    "deep-nesting": ("seed: " + "[" * 100_000, "cannot read params: line 1, column 26: nested more than 20 deep"),
    "duplicate-key": (DUPLICATE, f"line {line_of(DUPLICATE, 'seed: 1')}, column 1: duplicate key 'seed'"),
    "nested-duplicate-key": (NESTED_DUPLICATE, f"line {line_of(NESTED_DUPLICATE, '    lr: 0.002')}, column 5: "
                                               "duplicate key 'lr'"),
    "huge-seed": (params_text("seed: 0", "seed: 1180591620717411303424"),
                  "seed: Input should be less than or equal to 9223372036854775807 (got 1180591620717411303424)"),
    "negative-seed": (params_text("seed: 0", "seed: -1"), "seed: Input should be greater than or equal to 0"),
    "infinite-lr": (params_text("lr: 0.001", "lr: .inf"), "recipes.cnn.lr: Input should be a finite number (got inf)"),
    **{f"dataset-{case}": (params_text("datasets:\n", "datasets:\n" + entry), reason) for case, entry, reason in [
        ("size-8", "  parts: {source: folder, path: raw/parts, image_size: 8}\n",
         "datasets.parts.image_size: Input should be greater than or equal to 16 (got 8)"),
        ("size-65", "  parts: {source: folder, path: raw/parts, image_size: 65}\n",
         "datasets.parts.image_size: Input should be less than or equal to 64 (got 65)"),
        ("channels-2", "  parts: {source: folder, path: raw/parts, channels: 2}\n",
         "datasets.parts.channels: Input should be 1 or 3 (got 2)"),
        ("digit-in-colour", "  parts: {source: folder, path: raw/parts, channels: 3, preprocess: digit}\n",
         "datasets.parts: Value error, preprocess: digit makes grey images; with channels 3 use plain"),
        ("unknown-preprocessing", "  parts: {source: folder, path: raw/parts, preprocess: sharpen}\n",
         "datasets.parts.preprocess: Value error, unknown preprocessing 'sharpen'; allowed: digit, fashion, plain"),
        ("path-outside", "  parts: {source: folder, path: ../parts}\n",
         "datasets.parts.path: Value error, '../parts': give a path inside the project"),
        ("unknown-builtin", "  parts: {source: builtin, path: pipeline/datasets.py}\n",
         "datasets: Value error, parts: source builtin is one of mnist, fashion-mnist"),
        ("bad-name", "  My Parts: {source: folder, path: raw/parts}\n",
         "datasets: Value error, 'My Parts': a data set's name is 1-64 lower-case letters"),
        ("same-artifact-names", "  fashion: {source: folder, path: raw/fashion}\n",
         "Value error, datasets: fashion and fashion-mnist would both name a model 'fashion-softmax'"),
    ]},
    "model-misnamed": (params_text("models:\n", "models:\n  parts-cnn: {dataset: mnist, arch: cnn}\n"),
                       "Value error, models.parts-cnn: name it cnn (its data set's prefix and its architecture)"),
    "model-of-unknown-data-set": (params_text("models:\n", "models:\n  parts-cnn: {dataset: parts, arch: cnn}\n"),
                                  "Value error, models.parts-cnn: unknown data set 'parts'; declared: mnist, "
                                  "fashion-mnist"),
    "batch-over-training-set": (params_text("batch_size: 100\n    drop_last: true\n    epochs: 20",
                                            "batch_size: 60001\n    drop_last: true\n    epochs: 20"),
                                "recipes.cnn.batch_size: 60001 is more than the 54,000 training images left beside the "
                                "validation split, and recipes.cnn.drop_last drops incomplete batches"),
    "batch-over-train-limit": (params_text("train_limit: null", "train_limit: 99"),
                               "data.train_limit: 99 is smaller than recipes.softmax.batch_size (100)"),
    "rotation-over-180": (params_text("rotate: 10 ", "rotate: 200 "),
                          "recipes.tuned_cnn.augment.rotate: Input should be less than or equal to 180 (got 200)"),
    "nesterov-without-momentum": (params_text("momentum: 0.9\n    nesterov: true", "momentum: 0.0\n    nesterov: true"),
                                  "recipes.tuned_cnn: Value error, nesterov: needs optimizer sgd or muon with a momentum "
                                  "above 0"),
    "not-utf-8": ("seed: \udcff\n", "cannot read params ("),
    "over-1-mb": ("#" * (MB + 1) + "\n" + params_text(), "cannot read params (not a regular file of at most 1 MB)"),
}


def train_args(folder, params_file) -> list[str]:
    return ["--dataset", "mnist", "--arch", "cnn", "--data", str(folder), "--out", str(folder / "m.pt"),
            "--live", str(folder / "live"), "--run-json", str(folder / "run.json"), "--params", str(params_file)]


@pytest.mark.parametrize("case", list(BAD_PARAMS))
def test_bad_params_file_is_refused_in_one_line(tmp_path, case):
    from pipeline.stages import train

    text, reason = BAD_PARAMS[case]
    path = tmp_path / "params.yaml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    result = CliRunner().invoke(train.main, train_args(tmp_path, path))
    assert result.exit_code == 1 and not result.stdout  # refused before any work: training logs to stdout
    one_error(result.stderr, f"Error: {path}: ", reason)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_billion_laughs_is_refused_in_one_line_within_bounded_memory(tmp_path):
    """In a memory-capped subprocess: before the fix it took minutes and gigabytes."""
    path = tmp_path / "params.yaml"
    path.write_text(BILLION_LAUGHS + params_text())
    # RLIMIT_DATA, not RLIMIT_AS: importing torch maps more than 1.5 GB of address space
    result = limited(module("pipeline.stages.train"), *train_args(tmp_path, path), limit="RLIMIT_DATA", timeout=120)
    assert result.returncode == 1
    one_error(result.stderr, f"Error: {path}: cannot read params: line 1, column 7: anchors and aliases (&name, *name) "
                             "are not allowed")


def test_a_stop_signal_during_a_clean_up_waits_for_its_end():
    previous = signal.getsignal(signal.SIGTERM)
    done = []
    with pytest.raises(Stopped, match="SIGTERM"):
        with stops_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs here: it only notes the signal
            done.append("cleaned up")
    assert done == ["cleaned up"] and signal.getsignal(signal.SIGTERM) is previous
    with stops_deferred():  # no signal: nothing raised
        pass
