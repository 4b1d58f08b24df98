"""The built-in data sets as plain data (classes, official hosts, checksums), and what the data stage writes for
every data set: IDX files (numpy, no torch) and dataset.json, the facts the later stages read (DataFacts)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.common import PipelineError, write_json

SPLITS = {"train": "train", "val": "val", "test": "t10k"}  # split -> the prefix of its files ("val": optional)
SPLIT_SIZES = {"train": 60_000, "test": 10_000}  # images per split, the same in both built-in data sets
# Held-out splits (validation, and a one-folder data set's test split) are the same whatever params.yaml's `seed`:
# seeds vary training, not data
VALIDATION_SEED = 0
FACTS_FILE = "dataset.json"
REGISTRY_FILE = "pipeline/datasets.py"  # this file: a built-in data set's `path`, which its data stage depends on
STATS_CHUNK = 2**24  # bytes of pixels summed at a time: the statistics of any split in bounded memory


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


def label_counts(data_dir: str | os.PathLike, classes: list[str]) -> dict[str, dict[str, int]]:
    """split -> class -> images, of the splits the data stage wrote."""
    counts = {}
    for split in SPLITS:
        label_file = split_files(data_dir, split)[1]
        if label_file.exists():
            found = np.bincount(read_idx(label_file), minlength=len(classes))
            counts[split] = {name: int(n) for name, n in zip(classes, found)}
    return counts


IDX_FILES = tuple(f"{SPLITS[split]}-{kind}" for split in ("train", "test")
                  for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))  # a data set's four files, MNIST's names


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


def split_files(data_dir: str | os.PathLike, split: str) -> tuple[Path, Path]:
    prefix = Path(data_dir) / SPLITS[split]
    return Path(f"{prefix}-images-idx3-ubyte"), Path(f"{prefix}-labels-idx1-ubyte")


def load_split(data_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W) grey or (N, H, W, 3) colour, labels int64 (N,)) of one split the data stage wrote."""
    image_file, label_file = split_files(data_dir, split)
    images = read_idx(image_file)
    labels = read_idx(label_file).astype(np.int64)
    if images.ndim not in (3, 4) or labels.shape != images.shape[:1]:
        raise PipelineError(f"{image_file.parent}: {split} images {images.shape} and labels {labels.shape} do not "
                            "match")
    return images, labels


def held_out(n: int, fraction: float, seed: int = VALIDATION_SEED) -> np.ndarray:
    """Boolean mask of `fraction` of n items, drawn with `seed`."""
    held = np.zeros(n, bool)
    held[np.random.default_rng(seed).permutation(n)[:round(n * fraction)]] = True
    return held


def split_validation(images: np.ndarray, labels: np.ndarray, fraction: float
                     ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train images, labels), (validation images, labels)): `fraction` of the training images, drawn with the
    fixed VALIDATION_SEED, held out for every choice made during and about training; both parts keep file order."""
    held = held_out(len(images), fraction)
    return (images[~held], labels[~held]), (images[held], labels[held])


def training_splits(data_dir: str | os.PathLike, fraction: float
                    ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train images, labels), (validation images, labels)) of a data set: its own validation split when the data
    stage wrote one (a folder's val/), else `fraction` of the training images (split_validation)."""
    train = load_split(data_dir, "train")
    if split_files(data_dir, "val")[0].exists():
        return train, load_split(data_dir, "val")
    return split_validation(*train, fraction)


@dataclass(frozen=True)
class DataFacts:
    """What the data stage found and every later stage reads (dataset.json): classes in label order, image shape,
    the training images' pixel statistics, images per split and class, and what reading a folder changed."""

    name: str
    classes: list[str]
    short_classes: list[str]  # the same, short enough to label a plot's axis
    size: int
    channels: int
    mean: float  # of every training pixel (all channels), in [0, 1]
    std: float
    counts: dict[str, dict[str, int]]  # split -> class -> images
    sha256: dict[str, str] = field(default_factory=dict)  # IDX file -> SHA-256 of its content
    converted: dict[str, int] = field(default_factory=dict)  # "size" / "mode" -> images brought to the declared form
    skipped: list[list[str]] = field(default_factory=list)  # [file, why] of files skipped (skip_bad)
    ignored: int = 0  # files that are not images by their suffix

    @property
    def stats(self) -> tuple[float, float]:
        """The training pixels' (mean, std)."""
        return self.mean, self.std


def pixel_stats(data_dir: str | os.PathLike) -> tuple[float, float]:
    """(mean, std) in [0, 1] of every pixel of the training images, summed STATS_CHUNK bytes at a time."""
    image_file = split_files(data_dir, "train")[0]
    header = read_idx_header(image_file)
    pixels = np.memmap(image_file, np.uint8, "r", offset=header)
    total = squares = 0.0
    for start in range(0, len(pixels), STATS_CHUNK):
        chunk = pixels[start:start + STATS_CHUNK].astype(np.float64)
        total += chunk.sum()
        squares += np.dot(chunk, chunk)
    n = max(len(pixels), 1)
    mean = total / n
    return mean / 255, float(np.sqrt(max(squares / n - mean * mean, 0.0))) / 255


def read_idx_header(path: Path) -> int:
    """The header's length in bytes of an IDX file."""
    with open(path, "rb") as f:
        return 4 + 4 * f.read(4)[3]


def write_facts(facts: DataFacts, data_dir: str | os.PathLike) -> None:
    write_json(Path(data_dir) / FACTS_FILE, asdict(facts))


def read_facts(data_dir: str | os.PathLike) -> DataFacts:
    path = Path(data_dir) / FACTS_FILE
    try:
        return DataFacts(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise PipelineError(f"{path}: missing; run the data stage (dvc repro data@<name>) first") from None
    except (ValueError, TypeError) as e:
        raise PipelineError(f"{path}: not what the data stage writes ({e})") from None
