"""Folder data sets (pipeline/folders.py): the same arrays as the IDX files for the same images, colour at another
size, counts per class, and every kind of bad data refused with the file named (or skipped and counted)."""
import os
import re

import numpy as np
import pytest
from PIL import Image

from pipeline.common import PipelineError
from pipeline.datasets import load_split
from pipeline.folders import read_folder
from tests.conftest import truncated_png

COLOURS = {"blue": (30, 60, 200), "green": (40, 180, 60), "red": (210, 40, 40)}


def mnist_folder(root, data_root, n_train=120, n_test=40):
    """MNIST's first images as PNG files in train/<digit>/ and test/<digit>/; returns the (images, labels) used."""
    used = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = (a[:n] for a in load_split(data_root / "mnist", split))
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:04d}.png")
        used[split] = images, labels
    return used


def colour_folder(root, n=12, size=40):
    """One folder of colour squares on grey, a class per colour, each image a little different."""
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            img = np.full((size, size, 3), 128, np.uint8)
            top, left = rng.integers(0, size // 2, 2)
            img[top:top + size // 2, left:left + size // 2] = rgb
            Image.fromarray(img).save(root / name / f"{i}.png")


def as_pairs(images, labels):
    return sorted((int(label), image.tobytes()) for image, label in zip(images, labels))


def test_an_mnist_folder_gives_the_idx_files_arrays(tmp_path, data_root):
    used = mnist_folder(tmp_path / "digits", data_root)
    report = read_folder(tmp_path / "digits", tmp_path / "out", size=28, channels=1)
    assert report.classes == [str(d) for d in range(10)] and not report.converted and not report.skipped
    for split in ("train", "test"):
        images, labels = load_split(tmp_path / "out", split)
        assert images.shape == (len(used[split][0]), 28, 28)
        assert as_pairs(images, labels) == as_pairs(*used[split])  # the same images under the same labels
    assert set(report.sha256) == {f"{p}-{k}" for p in ("train", "t10k") for k in ("images-idx3-ubyte", "labels-idx1-ubyte")}


def test_a_colour_folder_at_another_size_split_by_a_seeded_fraction(tmp_path):
    colour_folder(tmp_path / "squares")
    report = read_folder(tmp_path / "squares", tmp_path / "out", size=32, channels=3, test_fraction=0.25)
    assert report.classes == sorted(COLOURS) and report.converted == {"size": 36}
    train, test = (load_split(tmp_path / "out", split) for split in ("train", "test"))
    assert train[0].shape == (27, 32, 32, 3) and test[0].shape == (9, 32, 32, 3)
    for images, labels in (train, test):  # each image's brightest-channel colour is its class's
        for image, label in zip(images, labels):
            assert image.reshape(-1, 3).max(0).argmax() == np.argmax(COLOURS[report.classes[label]])
    again = read_folder(tmp_path / "squares", tmp_path / "again", size=32, channels=3, test_fraction=0.25)
    assert again.sha256 == report.sha256  # a fixed seed: the same split


def test_mixed_sizes_and_modes_are_converted_and_counted_and_other_files_ignored(tmp_path):
    colour_folder(tmp_path / "set", n=4, size=32)
    Image.new("L", (50, 20), 90).save(tmp_path / "set" / "red" / "grey-wide.png")
    Image.new("RGBA", (32, 32), (255, 0, 0, 128)).save(tmp_path / "set" / "red" / "alpha.png")
    (tmp_path / "set" / "red" / "notes.txt").write_text("not an image")
    (tmp_path / "set" / "red" / ".thumbnails").mkdir()  # hidden: neither read nor counted
    Image.new("RGB", (8, 8)).save(tmp_path / "set" / "red" / ".thumbnails" / "t.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "set" / "stray.png")  # in no class folder: counted, not read
    (tmp_path / "set" / "red" / "linked").symlink_to(tmp_path / "set" / "green")  # not followed: counted
    report = read_folder(tmp_path / "set", tmp_path / "out", size=32, channels=3, test_fraction=0.25)
    assert report.converted == {"mode": 2, "size": 1} and report.ignored == 3
    assert sum(len(load_split(tmp_path / "out", split)[1]) for split in ("train", "test")) == 14


@pytest.mark.parametrize("case, message", [
    ("corrupt", "bad.png: truncated or corrupt PNG image"),
    ("not-an-image", "not an image in a supported format"),
    ("one-class", "1 class folder(s) in it; a classifier needs at least 2"),
    ("empty-class", "no images (.png, .jpg, ...) in this class folder"),
    ("test-only-class", "class folder(s) purple are not in train/"),
    ("no-test", "has train/ but no test/"),
    ("symlink-out", "outside the data set's folder"),
    ("folder-symlink-out", "outside the data set's folder"),
    ("bomb", "decompression bomb"),
])
def test_bad_data_is_refused_with_the_file_named_and_nothing_written(tmp_path, data_root, case, message):
    root = tmp_path / "set"
    mnist_folder(root, data_root, n_train=30, n_test=10)
    if case == "corrupt":
        truncated_png(root / "train" / "3" / "bad.png")
    elif case == "not-an-image":
        (root / "train" / "3" / "bad.png").write_text("hello")
    elif case == "one-class":
        root = tmp_path / "one"
        colour_folder(root, n=2)
        for name in ("green", "red"):
            for f in (root / name).iterdir():
                f.unlink()
            (root / name).rmdir()
    elif case == "empty-class":
        (root / "train" / "empty").mkdir()
    elif case == "test-only-class":
        (root / "test" / "purple").mkdir()
        Image.new("L", (28, 28)).save(root / "test" / "purple" / "p.png")
    elif case == "no-test":
        for f in (root / "test").rglob("*.png"):
            f.unlink()
        for d in sorted((root / "test").iterdir()):
            d.rmdir()
        (root / "test").rmdir()
    elif case == "symlink-out":
        outside = tmp_path / "elsewhere.png"
        Image.new("L", (28, 28)).save(outside)
        os.symlink(outside, root / "train" / "3" / "link.png")
    elif case == "folder-symlink-out":
        (tmp_path / "elsewhere").mkdir()
        Image.new("L", (28, 28)).save(tmp_path / "elsewhere" / "x.png")
        os.symlink(tmp_path / "elsewhere", root / "train" / "3" / "more")
    elif case == "bomb":
        from tests.conftest import png_header_only
        (root / "train" / "3" / "bomb.png").write_bytes(png_header_only(20000, 20000))
    with pytest.raises(PipelineError, match=re.escape(message)) as raised:  # the file or folder first
        read_folder(root, tmp_path / "out", size=28, channels=1)
    assert len(str(raised.value).splitlines()) == 1
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_skip_bad_skips_and_counts_undecodable_files(tmp_path, data_root):
    mnist_folder(tmp_path / "set", data_root, n_train=30, n_test=10)
    truncated_png(tmp_path / "set" / "train" / "3" / "bad.png")
    (tmp_path / "set" / "test" / "1" / "bad.png").write_text("hello")
    report = read_folder(tmp_path / "set", tmp_path / "out", size=28, channels=1, skip_bad=True)
    assert sorted(os.path.basename(f) for f, _ in report.skipped) == ["bad.png", "bad.png"]
    assert len(load_split(tmp_path / "out", "train")[1]) == 30 and len(load_split(tmp_path / "out", "test")[1]) == 10


def test_channels_other_than_grey_or_colour_are_refused(tmp_path, data_root):
    mnist_folder(tmp_path / "set", data_root, n_train=20, n_test=5)
    with pytest.raises(PipelineError, match="channels must be 1 .grey. or 3 .colour., not 2"):
        read_folder(tmp_path / "set", tmp_path / "out", size=28, channels=2)
