"""Data stage: fetch MNIST / Fashion-MNIST from a mirror or the official hosts, verify, decode IDX."""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import sys
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
from torchvision import datasets as tvd

from pipeline.common import PipelineError, stage_command

MIRROR_ENV = "DATASET_MIRROR"
SPLITS = {"train": "train", "test": "t10k"}


@dataclass(frozen=True)
class DatasetInfo:
    tv_class: type  # torchvision's dataset class: official hosts and class names
    sha256: dict[str, str]  # decompressed IDX file name -> SHA-256 of its content

    @property
    def classes(self) -> list[str]:
        return list(self.tv_class.classes)

    @property
    def urls(self) -> list[str]:
        return list(self.tv_class.mirrors)


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(tvd.MNIST, {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    }),
    "fashion-mnist": DatasetInfo(tvd.FashionMNIST, {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    }),
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise PipelineError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


# ---------------------------------------------------------------------------- fetching

def sources(dataset: str) -> list[str]:
    """Where to look, in order: $DATASET_MIRROR/<dataset>/ (folder or URL), then the official hosts."""
    found = []
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        found.append(mirror.rstrip("/") + "/" + dataset + "/")
    return found + dataset_info(dataset).urls


def read_source(source: str, filename: str, timeout: float = 60) -> bytes:
    if "://" not in source:
        return (Path(source) / filename).read_bytes()
    with urllib.request.urlopen(source + filename, timeout=timeout) as response:
        return response.read()


def verified_content(raw: bytes, name: str, expected_sha256: str) -> bytes:
    """Decompress a downloaded .gz and check the SHA-256 of its content."""
    try:
        content = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"not a valid gzip file ({e})") from None
    digest = hashlib.sha256(content).hexdigest()
    if digest != expected_sha256:
        raise ValueError(f"SHA-256 of {name} is {digest}, expected {expected_sha256}")
    return content


def fetch_file(dataset: str, name: str) -> bytes:
    """The verified, decompressed content of one IDX file, from the first source that has it."""
    expected = dataset_info(dataset).sha256[name]
    tried = []
    for source in sources(dataset):
        try:
            return verified_content(read_source(source, name + ".gz"), name, expected)
        except Exception as e:  # noqa: BLE001 - every failure moves on to the next source
            tried.append(f"{source}{name}.gz ({str(e) or type(e).__name__})")
    raise PipelineError(f"{dataset}/{name}: no source worked; tried " + "; ".join(tried))


def fetch(dataset: str, out_dir: str | os.PathLike, log=print) -> None:
    """Fetch all four files of `dataset` into `out_dir`, which appears whole or not at all."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for name in dataset_info(dataset).sha256:
            (staging / name).write_bytes(fetch_file(dataset, name))
            log(f"{dataset}/{name}: verified")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------- IDX decoding

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Decode an (uncompressed) IDX file, refusing a wrong magic number or a wrong length."""
    data = bytearray(Path(path).read_bytes())  # writable, so torch.from_numpy can share it
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise PipelineError(f"{path}: not an IDX file (bad magic number {bytes(data[:4]).hex() or 'none'})")
    dtype, ndim = np.dtype(IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise PipelineError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise PipelineError(f"{path}: IDX file of shape {shape} should be {expected} bytes, is {len(data)}")
    return np.frombuffer(data, dtype, offset=header).reshape(shape)


def load_split(data_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of one split of a fetched data set."""
    prefix = Path(data_dir) / SPLITS[split]
    images = read_idx(f"{prefix}-images-idx3-ubyte")
    labels = read_idx(f"{prefix}-labels-idx1-ubyte").astype(np.int64)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise PipelineError(f"{prefix}: images {images.shape} and labels {labels.shape} do not match")
    return images, labels


@click.command(help="Fetch and verify one data set (mirror in $DATASET_MIRROR, else official hosts).")
@click.option("--dataset", required=True, type=click.Choice(list(DATASETS)))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@stage_command
def main(dataset: str, out_dir: str) -> None:
    fetch(dataset, out_dir, log=lambda msg: print(msg, file=sys.stderr))


if __name__ == "__main__":
    main()
