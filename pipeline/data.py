"""Data stage: fetch MNIST / Fashion-MNIST from a mirror or the official hosts, verify, write the IDX files."""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import sys
import tempfile
import urllib.request
import zlib
from pathlib import Path

import click

from pipeline.common import PipelineError, stage_command
from pipeline.datasets import DATASETS, dataset_info

MIRROR_ENV = "DATASET_MIRROR"


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


@click.command(help="Fetch and verify one data set (mirror in $DATASET_MIRROR, else official hosts).")
@click.option("--dataset", required=True, type=click.Choice(list(DATASETS)))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@stage_command
def main(dataset: str, out_dir: str) -> None:
    fetch(dataset, out_dir, log=lambda msg: print(msg, file=sys.stderr))


if __name__ == "__main__":
    main()
