"""Fetching a data set's IDX files from a mirror or the official hosts: streamed, size-capped, deadline-bound,
checksummed, and written whole or not at all."""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import time
import urllib.request
import zlib
from pathlib import Path

from tqdm import tqdm

from digitlens.files import atomic_dir
from digitlens.metadata import IMAGE_SIZE
from pipeline.common import PipelineError
from pipeline.datasets import SPLIT_SIZES, SPLITS, dataset_info

MIRROR_ENV = "DATASET_MIRROR"
TIMEOUT_ENV = "DATASET_TIMEOUT"
DEFAULT_TIMEOUT = 300  # seconds for one file from one source, however slowly its bytes arrive
READ_TIMEOUT = 60  # seconds one read may wait
CHUNK = 2**20
GZIP_OVERHEAD = 2**20  # a .gz is never much larger than its content: stored blocks add 5 bytes per 64 KB
MAX_DECLARED_IDX = 2**31  # bytes a declared IDX data set's file may hold (EMNIST's largest: 0.7 GB)


def mirror_source(mirror: str, dataset: str) -> str:
    """$DATASET_MIRROR/<dataset>/, a relative folder made absolute (a missing one is an error: `dvc exp run`
    may run the stage in another folder, where the relative path means something else)."""
    if "://" in mirror:
        return mirror.rstrip("/") + "/" + dataset + "/"
    folder = Path(mirror)
    if not folder.is_absolute():
        if not folder.is_dir():
            raise PipelineError(f"{MIRROR_ENV}={mirror}: no such folder from {Path.cwd()}; give an absolute path "
                                "(dvc exp run and queued experiments run stages in another folder)")
        folder = folder.resolve()
    return str(folder / dataset) + "/"


def sources(dataset: str) -> list[str]:
    """Where to look, in order: $DATASET_MIRROR/<dataset>/ (folder or URL), then the official hosts."""
    mirror = os.environ.get(MIRROR_ENV)
    return ([mirror_source(mirror, dataset)] if mirror else []) + dataset_info(dataset).urls


def download_timeout() -> float:
    """$DATASET_TIMEOUT: seconds one file may take from one source (DEFAULT_TIMEOUT when unset)."""
    value = os.environ.get(TIMEOUT_ENV) or str(DEFAULT_TIMEOUT)
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise PipelineError(f"{TIMEOUT_ENV}={value}: give a number of seconds above 0")
    return seconds


def idx_size(name: str) -> int:
    """Bytes of one of the data sets' IDX files: its header, then a byte per label or 28x28 per image."""
    split = next(s for s, prefix in SPLITS.items() if name.startswith(prefix + "-"))
    count = SPLIT_SIZES[split]
    return 16 + count * IMAGE_SIZE**2 if "-images-" in name else 8 + count


class Source:
    """A file's bytes as they arrive, refused past `limit` bytes or `timeout` seconds (each wait for more bytes
    lasts at most READ_TIMEOUT); gzip reads it a piece at a time."""

    def __init__(self, url: str, limit: int, timeout: float):
        self.limit, self.timeout, self.size = limit, timeout, 0
        self.deadline = time.monotonic() + timeout
        if "://" in url:
            self.stream = urllib.request.urlopen(url, timeout=min(READ_TIMEOUT, timeout))
        elif Path(url).is_file() or not Path(url).exists():  # a pipe or a device would never end
            self.stream = open(url, "rb")
        else:
            raise ValueError("not a regular file")
        self.read1 = getattr(self.stream, "read1", self.stream.read)  # whatever has arrived, not `size` bytes

    def read(self, size: int = -1) -> bytes:
        """`size` bytes (CHUNK for -1), fewer only at the end, as gzip expects of a file."""
        parts, wanted = [], CHUNK if size < 0 else size
        while wanted:
            if time.monotonic() > self.deadline:
                raise TimeoutError(f"not complete after {self.timeout:g} s (${TIMEOUT_ENV})")
            part = self.read1(min(wanted, CHUNK))
            if not part:
                break
            self.size += len(part)
            if self.size > self.limit:
                raise ValueError(f"more than {self.limit:,} bytes; refused")
            parts.append(part)
            wanted -= len(part)
        return b"".join(parts)

    def close(self) -> None:
        self.stream.close()


def download(url: str, name: str, dest: Path, expected_sha256: str, timeout: float, limit: int | None = None) -> None:
    """Decompress the .gz at `url` into `dest` as it arrives, within `limit` bytes (by default the size a built-in
    data set's IDX file `name` has), and check the SHA-256 of its content."""
    limit = limit or idx_size(name)
    source = Source(url, limit + GZIP_OVERHEAD, timeout)
    digest, size = hashlib.sha256(), 0
    try:
        with gzip.GzipFile(fileobj=source, mode="rb") as stream, open(dest, "wb") as out, \
                tqdm(total=limit, desc=name, unit="B", unit_scale=True, leave=False, disable=None) as progress:
            while True:
                try:
                    chunk = stream.read(CHUNK)
                except (gzip.BadGzipFile, EOFError, zlib.error) as e:
                    raise ValueError(f"not a valid gzip file ({e})") from None
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise ValueError(f"expands to more than the {limit:,} bytes of {name}; refused")
                digest.update(chunk)
                out.write(chunk)
                progress.update(len(chunk))
    finally:
        source.close()
    if digest.hexdigest() != expected_sha256:
        raise ValueError(f"SHA-256 of {name} is {digest.hexdigest()}, expected {expected_sha256}")


def fetch_file(dataset: str, name: str, dest: str | os.PathLike = os.devnull) -> None:
    """Write the verified, decompressed content of one IDX file to `dest` (by default nowhere: only check that
    a source has it), from the first source that has it."""
    expected, timeout = dataset_info(dataset).sha256[name], download_timeout()
    tried = []
    for source in sources(dataset):
        try:
            return download(source + name + ".gz", name, Path(dest), expected, timeout)
        except Exception as e:  # noqa: BLE001 - every failure moves on to the next source
            tried.append(f"{source}{name}.gz ({' '.join(str(e).split()) or type(e).__name__})")  # one line
    raise PipelineError(f"{dataset}/{name}: no source worked; tried " + "; ".join(tried))


def copy_idx(folder: Path, name: str, dest: Path, expected_sha256: str) -> None:
    """Verify and copy the IDX file `name` of a declared data set from `folder`, where it is `name`.gz (as the
    hosts of MNIST-like data sets serve them) or `name`, into `dest`, decompressed."""
    gz, plain = folder / f"{name}.gz", folder / name
    if not gz.is_file() and not plain.is_file():
        raise PipelineError(f"{folder}: has neither {name}.gz nor {name}")
    try:
        if gz.is_file():
            download(str(gz), name, dest, expected_sha256, download_timeout(), MAX_DECLARED_IDX)
            return
        digest, size = hashlib.sha256(), plain.stat().st_size
        if size > MAX_DECLARED_IDX:
            raise ValueError(f"{size:,} bytes, more than {MAX_DECLARED_IDX:,}; refused")
        with open(plain, "rb") as src, open(dest, "wb") as out:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != expected_sha256:
            raise ValueError(f"SHA-256 of {name} is {digest.hexdigest()}, expected {expected_sha256}")
    except (OSError, ValueError, TimeoutError) as e:
        raise PipelineError(f"{gz if gz.is_file() else plain}: {' '.join(str(e).split())}") from None


def fetch(dataset: str, out_dir: str | os.PathLike, log=print) -> None:
    """Fetch all four files of `dataset` into `out_dir`, which appears whole or not at all."""
    with atomic_dir(out_dir) as staging:
        fetch_into(dataset, staging, log)


def fetch_into(dataset: str, folder: Path, log=print) -> None:
    """Fetch all four files of `dataset` into the existing `folder`."""
    for name in dataset_info(dataset).sha256:
        fetch_file(dataset, name, folder / name)
        log(f"{dataset}/{name}: verified")
