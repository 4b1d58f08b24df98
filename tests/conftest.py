"""Shared fixtures and helpers: the local data mirror, fetched data sets, briefly trained and exported models,
a stand-in ONNX model, files that are no usable image, a real `serve` process, a pseudo-terminal, and copies of
the DVC project with the `dvc` and `git` commands that drive them."""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import pty
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core: one torch thread each, or they spin against each other
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Absolute, so that subprocesses working in another folder (dvc exp run) find it too
MIRROR = Path(os.environ.get("DATASET_MIRROR", ROOT.parent / "shared" / "datasets")).resolve()


@pytest.fixture(scope="session")
def mirror() -> Path:
    if not (MIRROR / "mnist").is_dir():
        pytest.fail(f"dataset mirror not found at {MIRROR}; set DATASET_MIRROR")
    return MIRROR


@pytest.fixture(scope="session")
def data_root(tmp_path_factory, mirror) -> Path:
    """Both data sets fetched (and verified) from the mirror by the data stage's code."""
    from pipeline.dataprep import prepare_dataset
    from pipeline.datasets import DATASETS
    from pipeline.params import load_params

    root = tmp_path_factory.mktemp("data")
    os.environ["DATASET_MIRROR"] = str(mirror)
    declared = load_params(ROOT / "params.yaml").datasets
    for name in DATASETS:
        prepare_dataset(name, declared[name], root / name, log=lambda msg: None)
    return root


@pytest.fixture(scope="session")
def params():
    from pipeline.params import load_params

    return load_params(ROOT / "params.yaml")


MONITOR = 1000  # test images the tests' trainings score after each epoch (the pipeline scores all 10,000)


def quick_params(params, epochs: int = 1, train_limit: int = 3000):
    return params.model_copy(update={
        "device": "cpu",
        "train": params.train.model_copy(update={"epochs": epochs}),
        "data": params.data.model_copy(update={"train_limit": train_limit}),
    })


@pytest.fixture(scope="session")
def exported(tmp_path_factory, data_root, params):
    """export(dataset, arch) -> (onnx path, torchscript path, checkpoint): a briefly trained model, exported."""
    import torch

    from pipeline.conversion import export
    from pipeline.datasets import load_split
    from pipeline.models import load_checkpoint, save_checkpoint
    from pipeline.tensors import to_inputs
    from pipeline.training import train

    cache: dict = {}
    out = tmp_path_factory.mktemp("exported")

    def get(dataset: str = "mnist", arch: str = "cnn"):
        if (dataset, arch) not in cache:
            # 6,000 images: enough for the tests that need every digit recognised (one epoch on 3,000 left `cnn`
            # at 82 %, hardly ever answering 8)
            ckpt = train(quick_params(params, train_limit=6000), dataset, arch, data_root / dataset, log=lambda msg: None,
                         monitor=MONITOR)
            save_checkpoint(ckpt, out / f"{dataset}-{arch}.ckpt")
            model, ckpt = load_checkpoint(out / f"{dataset}-{arch}.ckpt")
            images, labels = load_split(data_root / dataset, "test")
            info = dataclasses.replace(ckpt.info, export_id=f"test-{dataset}-{arch}")
            x = to_inputs(images[:500], info.mean, info.std, torch.device("cpu"))
            _, ts_bytes, onnx_bytes, _ = export(model, info, x.numpy(), labels[:500], batch_size=250)
            paths = out / f"{dataset}-{arch}.onnx", out / f"{dataset}-{arch}.pt"
            paths[0].write_bytes(onnx_bytes)
            paths[1].write_bytes(ts_bytes)
            cache[dataset, arch] = (*paths, ckpt)
        return cache[dataset, arch]

    return get


def site_packages_mb(env_dir: Path) -> float:
    (site,) = (env_dir / "lib").glob("python3*/site-packages")
    return sum(f.stat().st_size for f in site.rglob("*") if f.is_file()) / 2**20


@pytest.fixture(scope="session")
def light_venv(tmp_path_factory) -> Path:
    """A fresh venv with only `pip install .` from this checkout (built as a wheel, not editable)."""
    import subprocess
    import venv

    env_dir = tmp_path_factory.mktemp("light") / "venv"
    venv.create(env_dir, with_pip=True)
    result = subprocess.run([env_dir / "bin" / "pip", "install", "-q", str(ROOT)], cwd=tmp_path_factory.mktemp("build"),
                            capture_output=True, text=True, env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return env_dir


# ---------------------------------------------------------------------------- a stand-in ONNX model

def tiny_onnx(path: Path, shape=("batch", 1, 28, 28), metadata: dict[str, str] | None = None, external: str | None = None,
              weights: np.ndarray | None = None, batch1_reshape: bool = False) -> Path:
    """Flatten + MatMul -> (batch, 10) logits, with `metadata` (none: a foreign model). `external` stores the
    weights in that (relative) file; `batch1_reshape` flattens with a Reshape to [1, -1] instead, which fails
    inside onnxruntime for any batch but 1."""
    from onnx import TensorProto, helper, numpy_helper

    from digitlens.metadata import INPUT_NAME, OUTPUT_NAME

    size = int(np.prod(shape[1:]))
    w = np.random.default_rng(0).normal(size=(size, 10)).astype(np.float32) if weights is None else weights
    initializers = [numpy_helper.from_array(w, "w")]
    flatten = helper.make_node("Flatten", [INPUT_NAME], ["flat"])
    if batch1_reshape:
        initializers.append(numpy_helper.from_array(np.array([1, size], np.int64), "shape"))
        flatten = helper.make_node("Reshape", [INPUT_NAME, "shape"], ["flat"])
    graph = helper.make_graph(
        [flatten, helper.make_node("MatMul", ["flat", "w"], [OUTPUT_NAME])], "tiny",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [shape[0], 10])], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    if external:
        target = path.parent / external
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(w.tobytes())
        stored = model.graph.initializer[0]
        stored.ClearField("raw_data")
        stored.data_location = TensorProto.EXTERNAL
        for key, value in (("location", external), ("offset", "0"), ("length", str(w.nbytes))):
            stored.external_data.add(key=key, value=value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


# ---------------------------------------------------------------------------- files that are no usable image

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size without the pixels to match (Pillow checks the size on open)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def truncated_png(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


BAD_FILES = {  # name -> (writer, what the error says)
    "empty.png": (lambda p: p.write_bytes(b""), "empty file"),
    "notes.png": (lambda p: p.write_text("not an image\n"), "not an image"),
    "truncated.png": (truncated_png, "truncated or corrupt PNG image"),
    "bomb.png": (lambda p: p.write_bytes(png_header_only(20000, 20000)), "decompression bomb"),
    # over Image.MAX_IMAGE_PIXELS but under twice it: Pillow only warns, prepare refuses
    "bomb-warning.png": (lambda p: p.write_bytes(png_header_only(10000, 10000)), "decompression bomb"),
    "blank.png": (lambda p: Image.new("L", (300, 200), 255).save(p), "no content"),
    "blank.jpg": (lambda p: Image.fromarray(np.random.default_rng(0).normal(240, 3, (200, 300)).astype(np.uint8))
                  .save(p, quality=70), "no content"),
    "transparent.png": (lambda p: Image.new("RGBA", (50, 50), (0, 0, 0, 0)).save(p), "no content"),
}


# ---------------------------------------------------------------------------- a real `serve` process

def get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post(url: str, files: list[tuple[str, bytes]] | None = None, json: object = None,
         timeout: float = 60) -> tuple[int, object]:
    """(status, parsed JSON answer) of a POST of image files (multipart, field 'files') or of a JSON body."""
    import httpx2

    r = httpx2.post(url, files=[("files", f) for f in files] if files else None, json=json, timeout=timeout)
    return r.status_code, r.json()


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it."""
    import psutil

    return [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]


@contextlib.contextmanager
def serve_process(models: Sequence[str | os.PathLike], args: Sequence[str] = (),
                  log: Path | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """(base URL, process) of `python -m digitlens.serve` on a free port, once /readyz answers; stopped (its
    workers with it) on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "digitlens.serve", "--port", str(port), *args,
               *(a for m in models for a in ("--model", str(m)))]
    with open(log or os.devnull, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):  # two minutes to load the models
            assert proc.poll() is None, f"serve exited with status {proc.returncode}"
            with contextlib.suppress(OSError):
                if get(f"{url}/readyz", timeout=1)[0] == 200:
                    break
            time.sleep(0.1)
        else:
            raise AssertionError("serve did not answer /readyz")
        yield url, proc
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def stderr_on_terminal(cmd, **kwargs) -> tuple[subprocess.CompletedProcess, str]:
    """Run with stderr on a pseudo-terminal of 24x80 characters; (result with stdout, what the terminal received)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a new pty is 0x0: no room for a bar
    try:
        result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=follower, text=True, **kwargs)
        os.close(follower)
        terminal = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal has no writer left
                break
            if not chunk:
                break
            terminal += chunk
    finally:
        os.close(leader)
    return result, terminal.decode()


PROJECT_FILES = ["pipeline", "digitlens", "params.yaml", "dvc.yaml", ".dvc/config", ".dvcignore", ".gitignore"]


def project_copy(root: Path, mirror: Path) -> dict:
    """The project's code, params and DVC files copied into `root` and committed to a new Git repository, without
    outputs or dvc.lock; returns the environment its DVC commands run in (the data mirror, this Python's tools)."""
    for name in PROJECT_FILES:
        src, dst = ROOT / name, root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    env = dict(os.environ, DATASET_MIRROR=str(mirror), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(root), GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.org",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.org")
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "project"]):
        git(*args, cwd=root, env=env)
    return env


DVC = str(Path(sys.executable).with_name("dvc"))  # this environment's DVC


def dvc(*args, cwd, env) -> subprocess.CompletedProcess:
    return subprocess.run([DVC, *args], cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)


def git(*args, cwd, env) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True)


def run_queue(root: Path, env: dict, workers: int = 1, timeout: float = 600) -> str:
    """`dvc queue start -j workers` (one torch thread each) and wait until nothing is queued or running; returns
    the last `dvc queue status`."""
    # the workers it starts are daemons that keep its stdout open: captured, the call would wait for them
    started = subprocess.run([DVC, "queue", "start", "-j", str(workers)],
                             cwd=root, env=dict(env, OMP_NUM_THREADS="1"), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    assert started.returncode == 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = dvc("queue", "status", cwd=root, env=env).stdout
        if not any(word in status for word in ("Queued", "Running")):
            break
        time.sleep(2)
    return status


def experiments(shown: list) -> list[dict]:
    """Every experiment row (name, params.yaml, metrics) in `dvc exp show --json` output."""
    rows = []

    def walk(node):
        if isinstance(node, dict):
            data = node.get("data")
            if isinstance(data, dict) and "params" in data and node.get("name"):
                rows.append({"name": node["name"], "params": data["params"]["params.yaml"]["data"],
                             "metrics": {f: m.get("data", {}) for f, m in (data.get("metrics") or {}).items()}})
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(shown)
    return rows
