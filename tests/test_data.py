import dataclasses
import gzip
import hashlib
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from pipeline import datasets
from pipeline import download as data
from pipeline.common import PipelineError
from pipeline.stages import data as data_stage
from tests.conftest import ROOT, stderr_on_terminal


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_read_idx_images_and_labels(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    write_idx(tmp_path / "img", images)
    write_idx(tmp_path / "lbl", np.array([3, 7], dtype=np.uint8))
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "img"), images)
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "lbl"), [3, 7])


def test_read_idx_refuses_truncated_file(tmp_path):
    write_idx(tmp_path / "img", np.zeros((3, 28, 28)))
    (tmp_path / "img").write_bytes((tmp_path / "img").read_bytes()[:-5])
    with pytest.raises(PipelineError, match=r"should be \d+ bytes, is \d+"):
        datasets.read_idx(tmp_path / "img")


def test_read_idx_refuses_truncated_header(tmp_path):
    (tmp_path / "img").write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(PipelineError, match="truncated IDX header"):
        datasets.read_idx(tmp_path / "img")


@pytest.mark.parametrize("magic", [b"\x1f\x8b\x08\x00", b"\x00\x00\x42\x03", b"PK\x03\x04", b""])
def test_read_idx_refuses_wrong_magic(tmp_path, magic):
    (tmp_path / "img").write_bytes(magic + bytes(100))
    with pytest.raises(PipelineError, match="not an IDX file"):
        datasets.read_idx(tmp_path / "img")


def test_load_split_refuses_mismatched_labels(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2))
    with pytest.raises(PipelineError, match="do not match"):
        datasets.load_split(tmp_path, "test")


def test_validation_split_is_fixed_disjoint_and_keeps_file_order():
    images = np.arange(1000, dtype=np.uint8).reshape(1000, 1, 1) % 251
    labels = np.arange(1000)
    (train_x, train_y), (val_x, val_y) = datasets.split_validation(images, labels, 0.1)
    assert len(val_y) == 100 and len(train_y) == 900 and set(train_y).isdisjoint(val_y)
    assert sorted([*train_y, *val_y]) == list(labels) and list(train_y) == sorted(train_y)
    np.testing.assert_array_equal(train_x[:, 0, 0], images[train_y, 0, 0])
    np.random.seed(123)  # the global generator (and params.yaml's `seed`) does not move it
    assert list(datasets.split_validation(images, labels, 0.1)[1][1]) == list(val_y)
    assert len(datasets.split_validation(images, labels, 0.25)[1][1]) == 250


def test_mirror_checksums_and_sanity_figures(data_root):
    images, labels = datasets.load_split(data_root / "mnist", "train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert abs(images.mean() / 255 - 0.1307) < 1e-4
    np.testing.assert_array_equal(np.bincount(labels)[:3], [5923, 6742, 5958])
    test_images, test_labels = datasets.load_split(data_root / "fashion-mnist", "test")
    assert test_images.shape == (10000, 28, 28) and np.bincount(test_labels).tolist() == [1000] * 10


@pytest.fixture
def offline_hosts(monkeypatch):
    """The official hosts replaced by a closed local port, so failures come fast and offline."""
    for name, info in datasets.DATASETS.items():
        monkeypatch.setitem(datasets.DATASETS, name, dataclasses.replace(info, urls=["http://127.0.0.1:9/"]))


def fake_mirror(root, dataset, content_for):
    folder = root / dataset
    folder.mkdir(parents=True)
    for name in datasets.DATASETS[dataset].sha256:
        (folder / f"{name}.gz").write_bytes(gzip.compress(content_for(name)))
    return root


def test_checksum_refused_and_nothing_written(tmp_path, monkeypatch, offline_hosts):
    mirror = fake_mirror(tmp_path / "mirror", "mnist", lambda name: b"not the real " + name.encode())
    monkeypatch.setenv(data.MIRROR_ENV, str(mirror))
    out = tmp_path / "data" / "mnist"
    with pytest.raises(PipelineError) as err:
        data.fetch("mnist", out, log=lambda msg: None)
    message = str(err.value)
    assert message.startswith("mnist/train-images-idx3-ubyte: no source worked")
    assert f"{mirror}/mnist/train-images-idx3-ubyte.gz (SHA-256 of" in message
    assert "http://127.0.0.1:9/train-images-idx3-ubyte.gz (" in message
    assert "\n" not in message
    assert not out.exists() and list((tmp_path / "data").iterdir()) == []


def test_not_gzip_and_missing_file_are_reported(tmp_path, monkeypatch, offline_hosts):
    folder = tmp_path / "mirror" / "fashion-mnist"
    folder.mkdir(parents=True)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"plain text")
    monkeypatch.setenv(data.MIRROR_ENV, str(tmp_path / "mirror"))
    with pytest.raises(PipelineError, match="not a valid gzip file"):
        data.fetch_file("fashion-mnist", "train-images-idx3-ubyte")
    with pytest.raises(PipelineError, match="train-labels-idx1-ubyte.gz \\(.*No such file"):
        data.fetch_file("fashion-mnist", "train-labels-idx1-ubyte")


@pytest.mark.slow
def test_recompressed_mirror_accepted_over_url(tmp_path, monkeypatch, mirror):
    """Any gzip of the right content passes, and the mirror may be a URL (file:// here)."""
    real = {n: gzip.decompress((mirror / "mnist" / f"{n}.gz").read_bytes()) for n in datasets.DATASETS["mnist"].sha256}
    fake_mirror(tmp_path / "mirror", "mnist", real.__getitem__)
    monkeypatch.setenv(data.MIRROR_ENV, (tmp_path / "mirror").as_uri())
    data.fetch("mnist", tmp_path / "out", log=lambda msg: None)
    for name in real:
        assert hashlib.sha256((tmp_path / "out" / name).read_bytes()).hexdigest() == datasets.DATASETS["mnist"].sha256[name]


def test_sources_order(monkeypatch):
    monkeypatch.delenv(data.MIRROR_ENV, raising=False)
    assert data.sources("fashion-mnist") == datasets.DATASETS["fashion-mnist"].urls
    assert any("amazonaws" in url for url in data.sources("mnist"))
    monkeypatch.setenv(data.MIRROR_ENV, "/some/mirror/")
    assert data.sources("mnist")[0] == "/some/mirror/mnist/"


def test_data_stage_command_reports_one_line(tmp_path, monkeypatch, offline_hosts):
    from click.testing import CliRunner

    monkeypatch.setenv(data.MIRROR_ENV, str(tmp_path / "nowhere"))
    result = CliRunner().invoke(data_stage.main, ["--dataset", "mnist", "--out", str(tmp_path / "mnist")])
    assert result.exit_code == 1
    assert result.output.startswith("Error: mnist/train-images-idx3-ubyte: no source worked")
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert not (tmp_path / "mnist").exists()


def test_download_progress_on_a_terminal_only(mirror, tmp_path):
    """A bar per file while it downloads on a terminal; piped, one line per verified file, then the images per
    split and class and the pixel statistics."""
    cmd = [sys.executable, "-m", "pipeline.stages.data", "--dataset", "mnist", "--out", str(tmp_path / "a")]
    env = {**os.environ, "DATASET_MIRROR": str(mirror)}
    result, terminal = stderr_on_terminal(cmd, cwd=ROOT, env=env)
    assert result.returncode == 0 and "\rtrain-images-idx3-ubyte:   0%|" in terminal and "/47.0M [" in terminal
    piped = subprocess.run([*cmd[:-1], str(tmp_path / "b")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert piped.returncode == 0 and piped.stderr.splitlines() == [
        *(f"mnist/{name}: verified" for name in datasets.DATASETS["mnist"].sha256),
        "mnist train: 60,000 images; 0 - zero 5,923, 1 - one 6,742, 2 - two 5,958, 3 - three 6,131, 4 - four 5,842, "
        "5 - five 5,421, 6 - six 5,918, 7 - seven 6,265, 8 - eight 5,851, 9 - nine 5,949",
        "mnist test: 10,000 images; 0 - zero 980, 1 - one 1,135, 2 - two 1,032, 3 - three 1,010, 4 - four 982, "
        "5 - five 892, 6 - six 958, 7 - seven 1,028, 8 - eight 974, 9 - nine 1,009",
        "mnist: pixel mean 0.1307, std 0.3081 (training images)", f"wrote {tmp_path / 'b'}"]
    facts = datasets.read_facts(tmp_path / "b")
    assert facts.counts["test"]["9 - nine"] == 1009 and (facts.size, facts.channels) == (28, 1)
