"""Image-folder data sets (the layout of torchvision's ImageFolder), read once into the IDX files the stages use.

    <root>/train/<class>/*.png    <root>/test/<class>/*.png    (optional <root>/val/<class>/...)
    <root>/<class>/*.png          one folder: the test split is a seeded fraction of it

Class names are the sub-folder names of train (or of the one folder), sorted. Each image is decoded with the
limits `infer` uses (digitlens.images.decode: formats, pixel count, decompression bombs), converted to grey or
RGB and resized to image_size x image_size as `plain` preprocessing does (digitlens.images.pixels), and streamed into
`<split>` IDX files: memory stays that of one image, whatever the number of files. Bad data is refused with the
file named, or, with `skip_bad`, a file that cannot be decoded is skipped and counted.
"""
from __future__ import annotations

import hashlib
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from digitlens.errors import ImageError
from digitlens.files import atomic_dir
from digitlens.images import MODES, decode, image_extensions, pixels
from digitlens.limits import read_encoded
from digitlens.text import shown
from pipeline.common import PipelineError
from pipeline.datasets import SPLITS, held_out

SPLIT_FOLDERS = ("train", "val", "test")


@dataclass
class FolderReport:
    """What the reading found: classes, what was converted, skipped or ignored."""

    classes: list[str]
    converted: Counter = field(default_factory=Counter)  # "size" / "mode" -> images brought to the declared form
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why) with skip_bad
    ignored: int = 0  # files not read: not images by their suffix, outside a class folder, linked folders
    sha256: dict[str, str] = field(default_factory=dict)  # written file -> SHA-256 of its content


def inside(path: Path, root: Path) -> Path:
    """`path` resolved, refused when a symlink leads outside `root` or in a loop."""
    try:
        resolved = path.resolve(strict=False)
    except (RuntimeError, OSError):  # Python 3.11 raises RuntimeError for a loop, later ones OSError
        raise PipelineError(f"{path}: a symbolic link in a loop; remove it") from None
    if not resolved.is_relative_to(root):
        raise PipelineError(f"{path}: a symlink to {resolved}, outside the data set's folder {root}; refused")
    return resolved


def class_folders(folder: Path, root: Path) -> dict[str, Path]:
    """{class name: folder} of the visible sub-folders of `folder`; a name that is not UTF-8 is refused (it would
    be a class name in every model's metadata and answer)."""
    classes = {p.name: inside(p, root) for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    for name in classes:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise PipelineError(f"{folder / shown(name)}: a class folder whose name is not UTF-8 text; rename it") from None
    return classes


def loose_files(folder: Path) -> int:
    """Visible files directly in `folder`, outside any class folder: not read, counted."""
    return sum(1 for p in folder.iterdir() if not p.name.startswith(".") and not p.is_dir())


def images_in(folder: Path, root: Path, report: FolderReport) -> list[tuple[str, Path]]:
    """(name within `folder`, resolved path) of the image files under it (by suffix, as `infer` tells them from
    others); others are counted. Symbolic links to folders are not followed (counted; refused if they lead out)."""
    files, suffixes = [], image_extensions()
    for p in sorted(folder.rglob("*")):
        within = p.relative_to(folder)
        if any(part.startswith(".") for part in within.parts):  # hidden files and folders
            continue
        if p.is_dir():
            if p.is_symlink():
                inside(p, root)
                report.ignored += 1
            continue
        if p.suffix.lower() in suffixes:
            files.append((within.as_posix(), inside(p, root)))
        else:
            report.ignored += 1
    return files


def scan(root: str | os.PathLike, test_fraction: float) -> tuple[dict[str, list[tuple[Path, int]]], FolderReport]:
    """{split: [(file, label)]}, in file-name order, of a folder data set, and its report so far; refuses layouts
    that cannot train."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise PipelineError(f"{root}: no such folder")
    split_dirs = {s: root / s for s in SPLIT_FOLDERS if (root / s).is_dir()}
    one_folder = "train" not in split_dirs
    if one_folder and split_dirs:
        raise PipelineError(f"{root}: has {', '.join(split_dirs)}/ but no train/")
    if not one_folder and "test" not in split_dirs:
        raise PipelineError(f"{root}: has train/ but no test/")
    train_classes = class_folders(root if one_folder else split_dirs["train"], root)
    report = FolderReport(classes=list(train_classes))
    if len(train_classes) < 2:
        raise PipelineError(f"{root}: {len(train_classes)} class folder(s) in {'it' if one_folder else 'train/'}; "
                            "a classifier needs at least 2")
    report.ignored += loose_files(root) + sum(loose_files(folder) for folder in split_dirs.values())
    index = {name: i for i, name in enumerate(train_classes)}
    splits: dict[str, list[tuple[str, Path, int]]] = {}
    for split, folder in ({"train": root} if one_folder else split_dirs).items():
        classes = class_folders(folder, root)
        unknown = sorted(set(classes) - set(index))
        if unknown:
            raise PipelineError(f"{folder}: class folder(s) {', '.join(unknown)} are not in train/; every class "
                                "must have training images")
        splits[split] = []
        for name, class_dir in classes.items():
            files = images_in(class_dir, root, report)
            if split == "train" and not files:
                raise PipelineError(f"{class_dir}: no images (.png, .jpg, ...) in this class folder")
            splits[split] += [(within, f, index[name]) for within, f in files]
        # in file-name order across the classes (then by class): files named by their index in another data set's
        # file, e.g. MNIST's written as 00000.png ..., come back in that order, so that both train alike
        splits[split] = [(f, label) for _, f, label in sorted(splits[split], key=lambda it: (it[0], it[2]))]
    if one_folder:
        items = splits.pop("train")
        held = held_out(len(items), test_fraction)
        splits = {"train": [it for it, h in zip(items, held) if not h], "test": [it for it, h in zip(items, held) if h]}
    return splits, report


def load_image(path: Path, size: int, channels: int, report: FolderReport) -> np.ndarray:
    """(size, size) or (size, size, 3) uint8 of one file; ImageError when it cannot be decoded."""
    img = decode(read_encoded(path))
    if img.mode != MODES[channels]:
        report.converted["mode"] += 1
    if img.size != (size, size):
        report.converted["size"] += 1
    return pixels(img, size, channels)


def idx_header(count: int, shape: tuple[int, ...]) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, 1 + len(shape)) + struct.pack(f">{1 + len(shape)}I", count, *shape)


def write_split(items: list[tuple[Path, int]], prefix: Path, size: int, channels: int, skip_bad: bool,
                report: FolderReport) -> None:
    """Stream one split into `<prefix>-images-idx3-ubyte` and `<prefix>-labels-idx1-ubyte`; the headers' count is
    rewritten at the end (skipped files left no bytes)."""
    shape = (size, size) if channels == 1 else (size, size, channels)
    images, labels = Path(f"{prefix}-images-idx3-ubyte"), Path(f"{prefix}-labels-idx1-ubyte")
    written = 0
    with open(images, "wb") as xi, open(labels, "wb") as yi:
        xi.write(idx_header(len(items), shape))
        yi.write(idx_header(len(items), ()))
        for path, label in items:
            try:
                xi.write(load_image(path, size, channels, report).tobytes())
            except ImageError as e:
                if not skip_bad:
                    raise PipelineError(f"{path}: {e} (remove it, or skip such files with skip_bad)") from None
                report.skipped.append((str(path), str(e)))
                continue
            yi.write(bytes([label]))
            written += 1
        for f, dims in ((xi, shape), (yi, ())):
            f.seek(0)
            f.write(idx_header(written, dims))
    for path in (images, labels):
        with open(path, "rb") as f:  # read back in chunks: the split may not fit in memory
            report.sha256[path.name] = hashlib.file_digest(f, "sha256").hexdigest()


def read_folder(root: str | os.PathLike, out_dir: str | os.PathLike, *, size: int, channels: int,
                test_fraction: float = 0.2, skip_bad: bool = False) -> FolderReport:
    """Read the folder data set at `root` into IDX files in `out_dir` (which appears whole or not at all)."""
    with atomic_dir(out_dir) as staging:
        return write_folder(root, staging, size=size, channels=channels, test_fraction=test_fraction,
                            skip_bad=skip_bad)


def write_folder(root: str | os.PathLike, folder: Path, *, size: int, channels: int, test_fraction: float = 0.2,
                 skip_bad: bool = False) -> FolderReport:
    """Read the folder data set at `root` into IDX files in the existing `folder`: `val` files too when it has its
    own val/, and a test split of `test_fraction` of the images (drawn with a fixed seed) when it is one folder."""
    if channels not in MODES:
        raise PipelineError(f"channels must be 1 (grey) or 3 (colour), not {channels}")
    splits, report = scan(root, test_fraction)
    if len(report.classes) > 256:
        raise PipelineError(f"{root}: {len(report.classes)} classes; IDX labels hold at most 256")
    for split, items in splits.items():
        write_split(items, folder / SPLITS[split], size, channels, skip_bad, report)
    base = Path(root).resolve()
    report.skipped = [(str(Path(f).relative_to(base)), why) for f, why in report.skipped]
    return report
