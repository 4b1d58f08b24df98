"""One declared data set into the form every stage reads: IDX files and dataset.json (DataFacts), written whole or
not at all. A built-in one is fetched and verified, a declared IDX one verified and copied, a folder of images read
once (pipeline/folders.py)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from digitlens.files import atomic_dir, own_folder
from pipeline.common import PipelineError
from pipeline.datasets import SPLITS, DataFacts, dataset_info, label_counts, load_split, pixel_stats, write_facts
from pipeline.download import copy_idx, fetch_into
from pipeline.folders import FolderReport, write_folder
from pipeline.params import DatasetParams


def prepare_dataset(name: str, ds: DatasetParams, out_dir: str | os.PathLike, log=print) -> DataFacts:
    """Read the data set `name` declared as `ds` into `out_dir`; its facts (classes, counts per split and class,
    pixel statistics, what was converted or skipped)."""
    try:
        out = own_folder(out_dir).resolve()
    except ValueError as e:
        raise PipelineError(str(e)) from None
    source = Path(ds.path).resolve()
    if out.is_relative_to(source) or source.is_relative_to(out):  # the same folder included
        raise PipelineError(f"{out_dir}: is, holds or is inside the data set's own {ds.path}; write elsewhere")
    with atomic_dir(out_dir) as folder:
        if ds.source == "builtin":
            fetch_into(name, folder, log)
            info = dataset_info(name)
            classes, short, report = info.classes, info.short_classes, FolderReport(info.classes)
        elif ds.source == "idx":
            for file, expected in ds.sha256.items():
                copy_idx(Path(ds.path), file, folder / file, expected)
                log(f"{name}/{file}: verified")
            check_idx(ds, folder)
            classes = short = ds.classes
            report = FolderReport(classes)
        else:
            log(f"{name}: reading {ds.path} ...")
            report = write_folder(ds.path, folder, size=ds.image_size, channels=ds.channels,
                                  test_fraction=ds.test_fraction, skip_bad=ds.skip_bad)
            classes = short = report.classes
        counts = label_counts(folder, classes)
        empty = [c for c, n in counts["train"].items() if n == 0]
        if empty:
            raise PipelineError(f"{ds.path}: no training images left in class(es) {', '.join(empty)} after skipping "
                                "bad files; nothing written")
        for split in ("val", "test"):
            if split in counts and not sum(counts[split].values()):
                raise PipelineError(f"{ds.path}: no {split} images (a {split}/ folder whose class folders are empty, "
                                    "or too few images for test_fraction); nothing written")
        mean, std = pixel_stats(folder)
        facts = DataFacts(name=name, classes=classes, short_classes=short, size=ds.image_size, channels=ds.channels,
                          mean=mean, std=std, counts=counts, sha256=report.sha256, converted=dict(report.converted),
                          skipped=[list(s) for s in report.skipped], ignored=report.ignored)
        write_facts(facts, folder)
    return facts


def check_idx(ds: DatasetParams, folder: Path) -> None:
    """A declared IDX data set's files hold images of its declared size and channels, labels of its classes."""
    for split in ("train", "test"):
        images, labels = load_split(folder, split)
        if images.dtype != np.uint8:
            raise PipelineError(f"{ds.path}: {SPLITS[split]} images are {images.dtype}; IDX data sets of bytes (0-255) "
                                "only")
        side = ds.image_size
        form = (side, side) if ds.channels == 1 else (side, side, 3)
        if images.shape[1:] != form:
            raise PipelineError(f"{ds.path}: {SPLITS[split]} images are {'x'.join(map(str, images.shape[1:]))}; "
                                f"declare the image_size and channels they have (image_size {side}, channels {ds.channels})")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(ds.classes)):
            raise PipelineError(f"{ds.path}: {SPLITS[split]} labels run from {labels.min()} to {labels.max()}, but "
                                f"{len(ds.classes)} classes are declared")


def describe(facts: DataFacts) -> list[str]:
    """What the data stage tells: images per split and class, what was converted, skipped or ignored."""
    lines = [f"{facts.name} {split}: {sum(per_class.values()):,} images; "
             + ", ".join(f"{c} {n:,}" for c, n in per_class.items()) for split, per_class in facts.counts.items()]
    if facts.converted or facts.skipped or facts.ignored:
        mode = "grey" if facts.channels == 1 else "RGB"
        lines.append(f"{facts.name}: {facts.converted.get('size', 0):,} images resized to {facts.size}x{facts.size}, "
                     f"{facts.converted.get('mode', 0):,} converted to {mode}; {len(facts.skipped):,} skipped as "
                     f"undecodable (skip_bad); {facts.ignored:,} file(s) not read (not images by their suffix, or outside the "
                     "class folders)")
        lines += [f"  skipped {path}: {why}" for path, why in facts.skipped[:20]]
        if len(facts.skipped) > 20:
            lines.append(f"  ... and {len(facts.skipped) - 20:,} more (dataset.json lists them all)")
    lines.append(f"{facts.name}: pixel mean {facts.mean:.4f}, std {facts.std:.4f} (training images)")
    return lines
