"""Your own data set through the whole pipeline: a folder of MNIST's images reads into MNIST's own files and trains
alike; a declared IDX data set is verified against its checksums; a colour data set at 32x32 drawn here runs through
the real `dvc repro`, and its exported model classifies new images through `infer`, the Python API and `serve`."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from benchmarks.shapes import COLOURS, shape_image, write_shapes
from digitlens import Classifier
from digitlens import infer as infer_cli
from pipeline.common import PipelineError
from pipeline.dataprep import prepare_dataset
from pipeline.datasets import DATASETS, IDX_FILES, load_split, read_facts
from pipeline.params import DatasetParams
from pipeline.tensors import predict_logits, score, to_inputs
from pipeline.training import train
from tests.conftest import ROOT, dvc, post, project_copy, quick_params, serve_process

pytestmark = pytest.mark.slow

SHAPES = {"source": "folder", "path": "data-raw/shapes", "image_size": 32, "channels": 3, "preprocess": "plain",
          "flip_invariant": True, "pose_varies": True, "occlusion_invariant": True}
SHAPE_MODELS = ("softmax", "cnn")


def with_dataset(params, name: str, ds: DatasetParams):
    return params.model_copy(update={"datasets": {**params.datasets, name: ds}})


def test_an_mnist_folder_reads_into_mnists_own_files_and_trains_alike(tmp_path, data_root, params, monkeypatch):
    """Every MNIST image as a PNG named by its place in the IDX file, in a folder per digit: the data stage's code
    writes back the official files byte for byte, so a model trains on them exactly as on the IDX path."""
    for split in ("train", "test"):
        images, labels = load_split(data_root / "mnist", split)
        for digit in range(10):
            (tmp_path / "digits" / split / str(digit)).mkdir(parents=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image).save(tmp_path / "digits" / split / str(label) / f"{i:05d}.png", compress_level=1)
    monkeypatch.chdir(tmp_path)  # a declared path is relative to the project
    mnist = params.datasets["mnist"]
    ds = DatasetParams(source="folder", path="digits", flip_invariant=mnist.flip_invariant,
                       pose_varies=mnist.pose_varies, occlusion_invariant=mnist.occlusion_invariant, preprocess="digit")
    facts = prepare_dataset("digits", ds, tmp_path / "data" / "digits", log=lambda msg: None)
    assert facts.sha256 == DATASETS["mnist"].sha256  # the official files' checksums
    assert facts.classes == [str(d) for d in range(10)] and not facts.converted and not facts.skipped
    official = read_facts(data_root / "mnist")
    assert (facts.mean, facts.std, list(facts.counts["test"].values())) == (
        official.mean, official.std, list(official.counts["test"].values()))
    quick = quick_params(with_dataset(params, "digits", ds), epochs=1, train_limit=2000)
    results = []
    for name, folder in (("mnist", data_root / "mnist"), ("digits", tmp_path / "data" / "digits")):
        ckpt = train(quick, name, "cnn", folder, log=lambda msg: None)
        images, labels = load_split(folder, "test")
        logits = predict_logits(ckpt.model(), to_inputs(images, ckpt.info.mean, ckpt.info.std, torch.device("cpu")), 500)
        results.append(([{k: v for k, v in row.items() if k != "epoch_time_s"} for row in ckpt.history],
                        score(logits, torch.from_numpy(labels))))
    assert results[0] == results[1]  # the same validation curve and the same test loss and accuracy, exactly


def idx_folder(folder, mirror, dataset="fashion-mnist"):
    """A declared IDX data set's files as `dvc import-url` leaves them: the .gz files, here from the mirror."""
    folder.mkdir(parents=True)
    for name in IDX_FILES:
        (folder / f"{name}.gz").write_bytes((mirror / dataset / f"{name}.gz").read_bytes())
    return folder


def test_an_idx_data_set_is_verified_against_its_declared_checksums(tmp_path, mirror, data_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    idx_folder(tmp_path / "raw" / "clothes", mirror)
    info = DATASETS["fashion-mnist"]
    ds = DatasetParams(source="idx", path="raw/clothes", classes=info.classes, sha256=info.sha256, preprocess="fashion")
    facts = prepare_dataset("clothes", ds, tmp_path / "data" / "clothes", log=lambda msg: None)
    assert facts.classes == info.classes and sum(facts.counts["train"].values()) == 60_000
    for split in ("train", "test"):
        ours, official = load_split(tmp_path / "data" / "clothes", split), load_split(data_root / "fashion-mnist", split)
        assert all(np.array_equal(a, b) for a, b in zip(ours, official))
    wrong = {
        "checksum": (ds.model_copy(update={"sha256": {**info.sha256, IDX_FILES[0]: "0" * 64}}),
                     f"train-images-idx3-ubyte.gz: SHA-256 of {IDX_FILES[0]} is "),
        "size": (ds.model_copy(update={"image_size": 32}),
                 "train images are 28x28; declare the image_size and channels they have"),
        "classes": (ds.model_copy(update={"classes": ["a", "b"]}), "train labels run from 0 to 9, but 2 classes"),
    }
    for case, (bad, message) in wrong.items():
        with pytest.raises(PipelineError, match=message):
            prepare_dataset("clothes", bad, tmp_path / "data" / "bad", log=lambda msg: None)
        assert not (tmp_path / "data" / "bad").exists(), case


def test_a_folders_own_val_split_is_the_validation_set(tmp_path, params, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_shapes(tmp_path / "set", train=30, test=6)
    write_shapes(tmp_path / "val-images", train=8, test=1, seed=1)
    (tmp_path / "val-images" / "train").rename(tmp_path / "set" / "val")
    ds = DatasetParams(**SHAPES | {"path": "set"})
    facts = prepare_dataset("set", ds, tmp_path / "data", log=lambda msg: None)
    assert {split: sum(c.values()) for split, c in facts.counts.items()} == {"train": 90, "val": 24, "test": 18}
    lines = []
    train(quick_params(with_dataset(params, "set", ds), epochs=1, train_limit=None), "set", "mlp",
          tmp_path / "data", log=lines.append)
    assert "(90 images, 24 for validation)" in lines[0]  # all of train/ trains, val/ validates


@pytest.mark.parametrize("out", [".", "", "..", "set", "set/data", "data/.."])
def test_an_output_folder_that_would_delete_the_input_or_the_working_folder_is_refused(tmp_path, monkeypatch, out):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work" if out == ".." else tmp_path)
    write_shapes(tmp_path / "set", train=3, test=1)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(PipelineError, match="the working folder or one above it|is, holds or is inside the data set's"):
        prepare_dataset("set", DatasetParams(**SHAPES | {"path": "set"}), out, log=lambda msg: None)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_shapes(tmp_path / "set", train=2, test=1)
    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(ramp).save(tmp_path / "set" / "train" / "red" / "deep.png")  # mode I;16
    Image.fromarray(ramp.astype(np.float32) / 65535).save(tmp_path / "set" / "train" / "red" / "float.tif")  # F
    prepare_dataset("set", DatasetParams(**SHAPES | {"path": "set", "channels": 1}), tmp_path / "data",
                    log=lambda msg: None)
    images, _ = load_split(tmp_path / "data", "train")
    ramps = [im for im in images if int(im[0, 0]) < 2 and int(im[-1, -1]) > 250]
    assert len(ramps) == 2 and all(110 < im.mean() < 145 for im in ramps)  # black to white, mid-grey on average


def test_a_symlink_loop_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_shapes(tmp_path / "set", train=2, test=1)
    (tmp_path / "set" / "train" / "red" / "x.png").symlink_to("x.png")
    with pytest.raises(PipelineError, match="x.png: a symbolic link in a loop; remove it"):
        prepare_dataset("set", DatasetParams(**SHAPES | {"path": "set"}), tmp_path / "data", log=lambda msg: None)


def test_a_test_split_without_images_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_shapes(tmp_path / "set", train=3, test=1)
    for image in (tmp_path / "set" / "test").rglob("*.png"):
        image.unlink()
    with pytest.raises(PipelineError, match="set: no test images"):
        prepare_dataset("set", DatasetParams(**SHAPES | {"path": "set"}), tmp_path / "data", log=lambda msg: None)
    assert not (tmp_path / "data").exists()


def test_the_data_stage_refuses_a_corrupt_image_in_one_line_and_writes_nothing(tmp_path):
    write_shapes(tmp_path / "data-raw" / "shapes", train=4, test=2)
    (tmp_path / "data-raw" / "shapes" / "train" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["datasets"]["shapes"] = SHAPES
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "pipeline.stages.data", "--dataset", "shapes", "--out", "data/shapes"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 2, result.stderr  # "reading ...", the error
    assert result.stderr.splitlines()[-1].startswith("Error: ") and "broken.png: " in result.stderr
    assert "(remove it, or skip such files with skip_bad)" in result.stderr
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())
    params["datasets"]["shapes"] = SHAPES | {"skip_bad": True}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "1 skipped as undecodable (skip_bad)" in result.stderr
    assert "skipped train/red/broken.png: not an image in a supported format" in result.stderr
    assert read_facts(tmp_path / "data" / "shapes").skipped[0][0] == "train/red/broken.png"
    # a file where the output's parent folder belongs, and a file name with a line break in it: one line each
    (tmp_path / "blocked").write_text("a file")
    blocked = subprocess.run([*cmd[:-1], "blocked/shapes"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert blocked.returncode == 1 and blocked.stderr.splitlines()[-1].startswith("Error: blocked")
    assert "Traceback" not in blocked.stderr and (tmp_path / "blocked").read_text() == "a file"
    params["datasets"]["shapes"] = SHAPES
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "data-raw" / "shapes" / "train" / "red" / "broken.png").rename(
        tmp_path / "data-raw" / "shapes" / "train" / "red" / "x\nError: fine.png")
    forged = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert forged.returncode == 1 and len(forged.stderr.splitlines()) == 2  # "reading ...", the error, escaped
    assert forged.stderr.splitlines()[1].startswith("Error: ") and "x\\nError: fine.png: not an image" in forged.stderr


# ---------------------------------------------------------------- a colour data set through `dvc repro`

@pytest.fixture(scope="module")
def shapes_project(tmp_path_factory, mirror):
    """The project with its data sets and models replaced by a folder of colour shapes (three classes, 200 + 50
    images each, mixed sizes and modes) added to DVC, and `dvc repro` run with the full recipes."""
    root = tmp_path_factory.mktemp("own")
    env = project_copy(root, mirror)
    write_shapes(root / "data-raw" / "shapes")
    assert dvc("add", "data-raw/shapes", cwd=root, env=env).returncode == 0
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["datasets"] = {"shapes": SHAPES}
    params["models"] = {f"shapes-{arch}": {"dataset": "shapes", "arch": arch} for arch in SHAPE_MODELS}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = dvc("repro", cwd=root, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root, env, result


def new_shapes(folder, count=4):
    """Images drawn apart from the data set (another seed, larger, as JPEG): {file: its colour}."""
    rng, drawn = np.random.default_rng(123), {}
    folder.mkdir(exist_ok=True)
    for name, rgb in COLOURS.items():
        for i in range(count):
            path = folder / f"{name}-{i}.jpg"
            shape_image(rng, rgb, 90).save(path, quality=90)
            drawn[path] = name
    return drawn


def test_repro_reads_trains_and_exports_the_colour_data_set(shapes_project):
    root, _, result = shapes_project
    assert "data-raw/shapes" in (root / "dvc.lock").read_text()  # the raw folder is a dependency of its data stage
    facts = read_facts(root / "data" / "shapes")
    assert facts.classes == sorted(COLOURS) and (facts.size, facts.channels) == (32, 3)
    assert facts.counts == {"train": {c: 200 for c in sorted(COLOURS)}, "test": {c: 50 for c in sorted(COLOURS)}}
    assert facts.converted["mode"] > 0 and facts.converted["size"] > 0  # RGBA and palette files, 40 and 48 pixels
    assert "images resized to 32x32" in result.stdout + result.stderr
    for arch in SHAPE_MODELS:
        metrics = json.loads((root / "reports" / "shapes" / arch / "metrics.json").read_text())
        assert metrics["accuracy"] >= 95, (arch, metrics)
        card = (root / "artifacts" / f"shapes-{arch}.md").read_text()
        assert "float32 `(batch, 3, 32, 32)`" in card and "resized to 32x32 pixels" in card
    assert (root / "artifacts" / "summary.md").read_text().count("| shapes |") == len(SHAPE_MODELS)


def test_the_exported_model_classifies_new_images_through_infer_the_api_and_serve(shapes_project, tmp_path):
    root, _, _ = shapes_project
    model = root / "artifacts" / "shapes-cnn.onnx"
    drawn = new_shapes(tmp_path / "new")
    clf = Classifier(model)
    assert clf.info.class_names == sorted(COLOURS) and (clf.info.size, clf.info.channels) == (32, 3)
    api = {r.source: r.top.label for r in clf.predict([str(p) for p in drawn])}
    result = CliRunner().invoke(infer_cli.main, [*map(str, drawn), "--model", str(model), "--format", "json"])
    assert result.exit_code == 0, result.output
    cli = {r["file"]: r["predictions"][0]["class"] for r in json.loads(result.stdout)}
    with serve_process([model]) as (url, _):
        status, body = post(f"{url}/v1/models/shapes-cnn/predict", [(p.name, p.read_bytes()) for p in drawn])
        assert status == 200
        served = {r["file"]: r["predictions"][0]["class"] for r in body}
        pixels = [(np.asarray(Image.open(p).convert("RGB").resize((32, 32))) / 255).tolist() for p in list(drawn)[:2]]
        status, raw = post(f"{url}/v1/models/shapes-cnn/predict", json={"images": pixels})
        assert status == 200 and [r["predictions"][0]["class"] for r in raw] == [drawn[p] for p in list(drawn)[:2]]
    expected = {str(p): name for p, name in drawn.items()}
    assert api == cli == expected and served == {p.name: name for p, name in drawn.items()}


def test_editing_the_images_makes_their_stages_stale(shapes_project):
    root, env, _ = shapes_project
    shape_image(np.random.default_rng(7), COLOURS["red"], 32).save(root / "data-raw" / "shapes" / "train" / "red" / "x.png")
    try:
        status = dvc("status", cwd=root, env=env)
        assert "data@shapes" in status.stdout and "modified:           data-raw/shapes" in status.stdout
    finally:
        (root / "data-raw" / "shapes" / "train" / "red" / "x.png").unlink()
    assert "data@shapes" not in dvc("status", cwd=root, env=env).stdout
