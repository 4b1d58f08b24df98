"""The two data sets as plain data (classes, official hosts, checksums) and their IDX files (numpy, no torch)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.common import PipelineError

SPLITS = {"train": "train", "test": "t10k"}  # split -> the prefix of its files
SPLIT_SIZES = {"train": 60_000, "test": 10_000}  # images per split, the same in both data sets
VALIDATION_SEED = 0  # the validation split is the same whatever params.yaml's `seed`: seeds vary training, not data


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


@dataclass(frozen=True)
class DatasetInfo:
    classes: list[str]  # in label order
    short_classes: list[str]  # the same, short enough to label a plot's axis
    urls: list[str]  # the official hosts, as torchvision lists them
    sha256: dict[str, str]  # decompressed IDX file name -> SHA-256 of its content
    torchvision_class: str  # torchvision.datasets class of the same data (the benchmark's reference loop)


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        classes=["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven",
                 "8 - eight", "9 - nine"],
        short_classes=[str(i) for i in range(10)],
        urls=["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
        sha256={
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        torchvision_class="MNIST",
    ),
    "fashion-mnist": DatasetInfo(
        classes=FASHION_CLASSES,
        short_classes=FASHION_CLASSES,
        urls=["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        sha256={
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        torchvision_class="FashionMNIST",
    ),
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise PipelineError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


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


def split_validation(images: np.ndarray, labels: np.ndarray, fraction: float
                     ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train images, labels), (validation images, labels)): `fraction` of the training images, drawn with the
    fixed VALIDATION_SEED, held out for every choice made during and about training; both parts keep file order."""
    n_val = round(len(images) * fraction)
    held = np.zeros(len(images), bool)
    held[np.random.default_rng(VALIDATION_SEED).permutation(len(images))[:n_val]] = True
    return (images[~held], labels[~held]), (images[held], labels[held])
