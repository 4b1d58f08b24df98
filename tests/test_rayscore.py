"""`infer-ray`: the same records as `infer --format json` from a local Ray instance with 2 CPUs, bad files reported
per file, JSON lines and Parquet, one-line usage errors."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from digitlens import infer
from pipeline.datasets import load_split
from tests.conftest import BAD_FILES

pytestmark = pytest.mark.slow  # each run starts a Ray instance (several seconds)
pytest.importorskip("ray")  # the [ray] extra
pq = pytest.importorskip("pyarrow.parquet")

INFER_RAY = os.path.join(os.path.dirname(sys.executable), "infer-ray")


@pytest.fixture(scope="module")
def images(tmp_path_factory, data_root):
    """A folder of 150 MNIST test digits as PNG files, and the bad files of conftest.BAD_FILES."""
    folder = tmp_path_factory.mktemp("ray-images")
    for i, image in enumerate(load_split(data_root / "mnist", "test")[0][:150]):
        Image.fromarray(255 - image).save(folder / f"digit-{i:03d}.png")  # dark on light, as people's are
    for name, (write, _) in BAD_FILES.items():
        write(folder / name)
    return folder


@pytest.fixture(scope="module")
def model(exported):
    return exported("mnist", "cnn")[0]


def infer_records(*args) -> dict[str, dict]:
    """infer --format json's records, by file name; bad files are on stderr, not in its records."""
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "infer"), *map(str, args), "--format", "json"],
                            capture_output=True, text=True)
    assert result.returncode in (0, infer.FAILED), result.stderr
    return {r["file"]: r for r in json.loads(result.stdout)}


def infer_ray(*args) -> subprocess.CompletedProcess:
    return subprocess.run([INFER_RAY, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_the_same_records_as_infer_and_bad_files_each_with_its_error(images, model, tmp_path):
    out = tmp_path / "results.jsonl"
    result = infer_ray(images, "--model", model, "--out", out, "--top-k", 3, "--batch-size", 32)
    assert result.returncode == 1, result.stderr  # some files could not be classified
    assert f"{150 + len(BAD_FILES)} files scored, {len(BAD_FILES)} could not be classified" in result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["file"] for r in records] == sorted(str(p) for p in images.iterdir())  # the names as infer gives them,
    expected = infer_records(images, "--model", model, "--top-k", 3)                 # in the order of the files
    assert [r for r in records if "predictions" in r] == list(expected.values())
    by_name = {os.path.basename(r["file"]): r for r in records}
    for name, (_, reason) in BAD_FILES.items():
        assert set(by_name[name]) == {"file", "error"} and reason in by_name[name]["error"], by_name[name]


def test_parquet_from_a_list_of_files(images, model, tmp_path):
    files = sorted(str(p) for p in images.glob("digit-*.png"))[:40]
    listing = tmp_path / "list.txt"
    listing.write_text("\r\n".join([*files, str(images / "missing.png"), ""]) + "\r\n")  # Windows line ends too
    out = tmp_path / "results.parquet"
    result = infer_ray("--files-from", listing, "--model", model, "--out", out, "--actors", 2)
    assert result.returncode == 1, result.stderr
    table = pq.read_table(out)
    assert table.column_names == ["file", "predictions", "error"] and table.num_rows == 41
    rows = {r["file"]: r for r in table.to_pylist()}
    assert "no such file" in rows[str(images / "missing.png")]["error"]
    expected = infer_records(*files, "--model", model)
    assert {f: rows[f]["predictions"] for f in files} == {f: r["predictions"] for f, r in expected.items()}
    assert all(rows[f]["error"] is None for f in files)


@pytest.mark.parametrize("args, message", [
    (["IMAGES", "--out", "results.csv"], "must end in .jsonl or .parquet"),
    (["IMAGES", "--out", "r.jsonl", "--files-from", "list.txt"], "either image paths or --files-from"),
    (["--out", "r.jsonl"], "either image paths or --files-from"),
    (["-", "--out", "r.jsonl"], "is not read by infer-ray"),
    (["nowhere/", "--out", "r.jsonl"], "nowhere/: no such file or directory"),
    (["--out", "r.jsonl", "--files-from", "absent.txt"], "absent.txt: no such file"),
    (["--out", "r.jsonl", "--files-from", "EMPTY"], "lists no files"),
])
def test_usage_errors_are_one_line_and_write_nothing(images, model, tmp_path, args, message):
    args = [str(images) if a == "IMAGES" else a for a in args]
    if "EMPTY" in args:
        (tmp_path.parent / "empty.txt").write_text("\n\n")
        args[args.index("EMPTY")] = str(tmp_path.parent / "empty.txt")
    result = subprocess.run([INFER_RAY, *args, "--model", str(model)], capture_output=True, text=True, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_a_bad_model_is_refused_in_one_line_and_nothing_written(images, tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    result = subprocess.run([INFER_RAY, str(images), "--model", str(tmp_path / "bad.onnx"), "--out",
                             str(tmp_path / "r.jsonl")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("Error: ") and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "r.jsonl").exists()


def test_a_file_name_that_is_not_utf8_is_scored_and_shown_as_infer_shows_it(images, model, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "plain.png").write_bytes((images / "digit-000.png").read_bytes())
    odd = os.fsdecode(bytes(folder) + b"/caf\xe9.png")  # Latin-1, not UTF-8
    with open(odd, "wb") as f:
        f.write((images / "digit-001.png").read_bytes())
    out = tmp_path / "results.jsonl"
    result = infer_ray(folder, "--model", model, "--out", out)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == list(infer_records(folder, "--model", model).values())
    assert any(r["file"].endswith("caf\\xe9.png") for r in records)
