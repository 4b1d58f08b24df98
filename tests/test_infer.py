import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto
from PIL import Image

from digitlens import infer
from digitlens.images import prepare
from digitlens.metadata import INPUT_NAME, OUTPUT_NAME, input_spec
from pipeline.datasets import DATASETS, load_split
from pipeline.drawings import SAVED_AS, draw
from pipeline.models import list_models
from tests.conftest import BAD_FILES, ROOT, stderr_on_terminal, tiny_onnx

INFER = os.path.join(os.path.dirname(sys.executable), "infer")


@pytest.fixture(scope="module")
def digits(data_root):
    return load_split(data_root / "mnist", "test")[0][:30]


@pytest.fixture(scope="module")
def clothes(data_root):
    return load_split(data_root / "fashion-mnist", "test")[0][:12]


@pytest.fixture(scope="module")
def mnist(exported):
    return exported("mnist", "cnn")


def run(*args):
    return CliRunner().invoke(infer.main, [str(a) for a in args])


def direct_probs(onnx_path, ckpt, x: np.ndarray) -> np.ndarray:
    """Softmax of the model's logits on (N, 28, 28) pixels in [0, 1], computed here, not by infer."""
    x = ((x - ckpt.info.mean) / ckpt.info.std).astype(np.float32)[:, None]
    z = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def drawn(digit, path, variant="grey", seed=0):
    """A digit as a user's file: dark on light, enlarged, off-centre on 200x200."""
    SAVED_AS[variant][1](draw(digit, np.random.default_rng(seed)), path)
    return path


def original(image, path):
    Image.fromarray(image).save(path)
    return path


def one_line_error(result, name, reason=""):
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {name}: ") and reason in lines[0], result.stderr
    assert "Traceback" not in result.output


def parse_text(stdout: str) -> dict[str, list[tuple[str, float]]]:
    out = {}
    for line in stdout.splitlines():
        name, rest = line.split(": ", 1)
        out[name] = [(c.rsplit(" (", 1)[0], float(c.rsplit(" (", 1)[1].rstrip(")"))) for c in rest.split(", ")]
    return out


# ---------------------------------------------------------------------------- results

def test_raw_28x28_image_gives_the_models_own_prediction(tmp_path, mnist, digits):
    onnx_path, _, ckpt = mnist
    probs = direct_probs(onnx_path, ckpt, digits[:1] / 255)[0]
    result = run(original(digits[0], tmp_path / "d.png"), "--model", onnx_path, "--raw")
    assert result.exit_code == 0 and result.stderr == ""
    k = int(probs.argmax())
    assert result.stdout == f"{tmp_path / 'd.png'}: {ckpt.info.class_names[k]} ({probs[k]:.3f})\n"


def test_user_images_are_preprocessed_then_classified_in_one_batch(tmp_path, mnist, digits):
    onnx_path, _, ckpt = mnist
    files = [drawn(d, tmp_path / f"{i}.png", variant, i) for i, (d, variant) in
             enumerate(zip(digits[:7], SAVED_AS))]
    result = run(*files, "--model", onnx_path, "--format", "json", "--top-k", 10)
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    expected = direct_probs(onnx_path, ckpt, np.stack([prepare(f, "digit") for f in files]))
    assert [r["file"] for r in records] == [str(f) for f in files]
    for record, probs in zip(records, expected):
        got = np.zeros(10)
        got[[p["index"] for p in record["predictions"]]] = [p["probability"] for p in record["predictions"]]
        np.testing.assert_allclose(got, probs, atol=1e-5)
        assert all(p["class"] == ckpt.info.class_names[p["index"]] for p in record["predictions"])


def test_formats_agree_and_top_k_is_sorted(tmp_path, mnist, digits):
    onnx_path, _, ckpt = mnist
    files = [drawn(d, tmp_path / f"{i}.png", seed=i) for i, d in enumerate(digits[:3])]
    text, js, table = (run(*files, "--model", onnx_path, "--top-k", 3, "--format", f) for f in infer.OUTPUT_FORMATS)
    assert text.exit_code == js.exit_code == table.exit_code == 0
    records = json.loads(js.stdout)
    rows = list(csv.DictReader(io.StringIO(table.stdout)))
    assert list(rows[0]) == ["file", "rank", "index", "class", "probability"] and len(rows) == 3 * len(files)
    for f, record, (name, preds) in zip(files, records, parse_text(text.stdout).items()):
        probs = [p["probability"] for p in record["predictions"]]
        assert name == record["file"] == str(f) and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert [c for c, _ in preds] == [p["class"] for p in record["predictions"]]
        np.testing.assert_allclose([p for _, p in preds], probs, atol=5e-4)
        mine = [r for r in rows if r["file"] == str(f)]
        assert [r["class"] for r in mine] == [c for c, _ in preds] and [r["rank"] for r in mine] == ["1", "2", "3"]
    assert len(json.loads(run(files[0], "--model", onnx_path, "--top-k", 50, "--format", "json").stdout)[0]
               ["predictions"]) == len(ckpt.info.class_names)


def test_folder_means_its_images_and_patterns_are_expanded(tmp_path, mnist, digits):
    onnx_path, _, _ = mnist
    folder = tmp_path / "scans"
    folder.mkdir()
    for i, variant in enumerate(["grey", "rgb", "jpeg"]):
        drawn(digits[i], folder / f"{i}{SAVED_AS[variant][0]}", variant)
    (folder / "README.txt").write_text("not an image")
    drawn(digits[3], folder / ".hidden.png")
    result = run(folder, "--model", onnx_path)
    assert result.exit_code == 0
    assert list(parse_text(result.stdout)) == [str(folder / n) for n in ["0.png", "1.png", "2.jpg"]]
    result = run(str(folder / "*.png"), "--model", onnx_path)
    assert result.exit_code == 0 and list(parse_text(result.stdout)) == [str(folder / n) for n in ["0.png", "1.png"]]


def test_batch_size_does_not_change_results(tmp_path, mnist, digits):
    onnx_path, _, _ = mnist
    files = [drawn(d, tmp_path / f"{i}.png", seed=i) for i, d in enumerate(digits[:9])]
    first, *others = [json.loads(run(*files, "--model", onnx_path, "--batch-size", b, "--format", "json").stdout)
                      for b in (1, 4, 64)]
    assert len(first) == len(files)
    for other in others:
        for a, b in zip(first, other, strict=True):
            assert a["file"] == b["file"] and a["predictions"][0]["index"] == b["predictions"][0]["index"]
            assert abs(a["predictions"][0]["probability"] - b["predictions"][0]["probability"]) < 1e-5


def test_folder_of_clothing_photos_with_a_fashion_model(tmp_path, exported, clothes):
    onnx_path, _, ckpt = exported("fashion-mnist", "softmax")
    folder = tmp_path / "shop"
    folder.mkdir()
    for i, item in enumerate(clothes):
        Image.fromarray(255 - item).resize((140, 140)).convert("RGB").save(folder / f"{i:02d}.jpg")
    result = run(folder, "--model", onnx_path, "--format", "json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    prepared = np.stack([prepare(folder / f"{i:02d}.jpg", "fashion") for i in range(len(clothes))])
    expected = direct_probs(onnx_path, ckpt, prepared)
    assert [r["predictions"][0]["index"] for r in records] == expected.argmax(1).tolist()
    assert {r["predictions"][0]["class"] for r in records} <= set(ckpt.info.class_names)


@pytest.mark.slow
@pytest.mark.parametrize("dataset", list(DATASETS))
@pytest.mark.parametrize("arch", list_models())
def test_every_exported_model_of_both_data_sets(tmp_path, exported, data_root, dataset, arch):
    onnx_path, _, ckpt = exported(dataset, arch)
    images = load_split(data_root / dataset, "test")[0][:5]
    files = [original(255 - im, tmp_path / f"{i}.png") for i, im in enumerate(images)]
    result = run(*files, "--model", onnx_path, "--format", "json")
    assert result.exit_code == 0, result.output
    recipe = "digit" if dataset == "mnist" else "fashion"
    expected = direct_probs(onnx_path, ckpt, np.stack([prepare(f, recipe) for f in files]))
    assert [r["predictions"][0]["index"] for r in json.loads(result.stdout)] == expected.argmax(1).tolist()


# ---------------------------------------------------------------------------- bad input files

@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_file_is_reported_and_the_good_ones_classified(tmp_path, mnist, digits, name):
    onnx_path, _, _ = mnist
    write, reason = BAD_FILES[name]
    write(tmp_path / name)
    good = drawn(digits[0], tmp_path / "good.png")
    result = run(tmp_path / name, good, "--model", onnx_path)
    assert result.exit_code == 1
    one_line_error(result, tmp_path / name, reason)
    assert list(parse_text(result.stdout)) == [str(good)]


def test_raw_refuses_an_image_that_is_not_28x28(tmp_path, mnist, digits):
    result = run(drawn(digits[0], tmp_path / "big.png"), "--model", mnist[0], "--raw")
    assert result.exit_code == 1 and result.stdout == ""
    one_line_error(result, tmp_path / "big.png", "raw input must be 28x28")


@pytest.mark.parametrize("make, reason", [
    (lambda p: p, "no such file or directory"),
    (lambda p: p.mkdir() or p, "folder holds no images"),
    (lambda p: p.with_name("nothing-*.png"), "no file matches"),
])
def test_paths_that_name_no_image_are_usage_errors(tmp_path, mnist, digits, make, reason):
    bad = make(tmp_path / "missing")
    good = drawn(digits[0], tmp_path / "good.png")
    result = run(good, bad, "--model", mnist[0])
    assert result.exit_code == 2
    one_line_error(result, bad, reason)
    assert list(parse_text(result.stdout)) == [str(good)]


# ---------------------------------------------------------------------------- bad models

@pytest.fixture(scope="module")
def metadata(mnist):
    return {p.key: p.value for p in onnx.load(mnist[0], load_external_data=False).metadata_props}


def written(path, content: bytes):
    path.write_bytes(content)
    return path


BAD_MODELS = {  # name -> (writer(path, mnist, metadata), what the error says)
    "missing.onnx": (lambda p, m, meta: p, "no such file"),
    "folder.onnx": (lambda p, m, meta: p.mkdir() or p, "is a directory"),
    "notes.onnx": (lambda p, m, meta: written(p, b"hello, I am not a model\n"), "not an ONNX model"),
    "noise.onnx": (lambda p, m, meta: written(p, np.random.default_rng(0).bytes(5000)), "not an ONNX model"),
    "truncated.onnx": (lambda p, m, meta: written(p, m[0].read_bytes()[:100_000]), "not an ONNX model"),
    "32x32.onnx": (lambda p, m, meta: tiny_onnx(p, ("batch", 1, 32, 32), meta), "its metadata says (batch, 1, 28, 28)"),
    "rgb.onnx": (lambda p, m, meta: tiny_onnx(p, ("batch", 3, 28, 28), meta), "its metadata says (batch, 1, 28, 28)"),
    "rank-3.onnx": (lambda p, m, meta: tiny_onnx(p, ("batch", 28, 28), meta), "expected one float tensor"),
    "rgb-digit.onnx": (lambda p, m, meta: tiny_onnx(p, ("batch", 3, 28, 28), {**meta, "input": json.dumps(input_spec(3))}),
                       "takes 3 channels; digit preprocessing makes grey images"),
    "no-metadata.onnx": (lambda p, m, meta: tiny_onnx(p), "(infer --assume)"),
    "outside.onnx": (lambda p, m, meta: tiny_onnx(p, metadata=meta, external="../weights.bin"),
                     "outside its own folder"),
    "absolute.onnx": (lambda p, m, meta: tiny_onnx(p, metadata=meta, external=str(p.parent.parent / "w.bin")),
                      "outside its own folder"),
}


@pytest.mark.parametrize("name", list(BAD_MODELS))
def test_unusable_model_is_a_usage_error(tmp_path, mnist, metadata, digits, name):
    write, reason = BAD_MODELS[name]
    (tmp_path / "models").mkdir()
    model = write(tmp_path / "models" / name, mnist, metadata)
    result = run(drawn(digits[0], tmp_path / "d.png"), "--model", model)
    assert result.exit_code == 2 and result.stdout == ""
    one_line_error(result, model, reason)


def test_external_data_link_leading_out_is_refused_and_inside_is_used(tmp_path, metadata, digits):
    image = drawn(digits[0], tmp_path / "d.png")
    inside = tiny_onnx(tmp_path / "models" / "inside.onnx", metadata=metadata, external="data/w.bin")
    assert run(image, "--model", inside).exit_code == 0
    tiny_onnx(tmp_path / "elsewhere" / "m.onnx", metadata=metadata, external="w.bin")
    linked = tiny_onnx(tmp_path / "models" / "linked.onnx", metadata=metadata, external="link.bin")
    (tmp_path / "models" / "link.bin").unlink()
    (tmp_path / "models" / "link.bin").symlink_to(tmp_path / "elsewhere" / "w.bin")  # same bytes, other folder
    result = run(image, "--model", linked)
    assert result.exit_code == 2
    one_line_error(result, linked, "outside its own folder")


def test_exported_model_with_external_data_beside_it_gives_the_same_answer(tmp_path, mnist, digits):
    proto = onnx.load(mnist[0])
    onnx.save_model(proto, tmp_path / "split.onnx", save_as_external_data=True, location="split.data")
    stored = onnx.load(tmp_path / "split.onnx", load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in stored.graph.initializer)
    image = drawn(digits[0], tmp_path / "d.png")
    assert run(image, "--model", tmp_path / "split.onnx").stdout == run(image, "--model", mnist[0]).stdout != ""


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_model_is_a_usage_error(tmp_path, mnist, digits):
    model = tmp_path / "m.onnx"
    model.write_bytes(mnist[0].read_bytes())
    model.chmod(0)
    result = run(drawn(digits[0], tmp_path / "d.png"), "--model", model)
    assert result.exit_code == 2
    one_line_error(result, model, "cannot read it")


def test_model_the_os_refuses_to_read_is_a_usage_error(tmp_path, mnist, digits, monkeypatch):
    """As above, where the tests run as root (who reads files whatever their mode)."""
    import onnx

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(onnx, "load", refused)
    result = run(drawn(digits[0], tmp_path / "d.png"), "--model", mnist[0])
    assert result.exit_code == 2
    one_line_error(result, mnist[0], "cannot read it (Permission denied)")


def test_model_without_metadata_runs_with_documented_defaults_when_asked(tmp_path, digits):
    model = tiny_onnx(tmp_path / "foreign.onnx")
    image = drawn(digits[0], tmp_path / "d.png")
    result = run(image, "--model", model, "--assume", "digit", "--top-k", 10, "--format", "json")
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.stdout)
    assert sorted(p["class"] for p in record["predictions"]) == [str(i) for i in range(10)]
    assert all(p["class"] == str(p["index"]) for p in record["predictions"])


def test_fixed_batch_model_takes_one_image_at_a_time(tmp_path, metadata, digits):
    model = tiny_onnx(tmp_path / "b1.onnx", (1, 1, 28, 28), metadata)
    files = [drawn(d, tmp_path / f"{i}.png") for i, d in enumerate(digits[:3])]
    result = run(*files, "--model", model)
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 3


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime has CUDA")
def test_cuda_without_cuda_provider_is_a_usage_error(tmp_path, mnist, digits):
    result = run(drawn(digits[0], tmp_path / "d.png"), "--model", mnist[0], "--device", "cuda")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith(f"Error: {mnist[0]}: device cuda: this onnxruntime has no CUDA provider")
    assert len(result.stderr.splitlines()) == 1


# ---------------------------------------------------------------------------- the installed command

def poisoned_env(tmp_path) -> dict:
    """An environment in which importing torch or torchvision fails."""
    for name in ("torch", "torchvision"):
        (tmp_path / "poison" / name).mkdir(parents=True)
        (tmp_path / "poison" / name / "__init__.py").write_text(f"raise ImportError('infer must not import {name}')\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "poison"), str(ROOT)]))


def test_console_script_runs_without_torch(tmp_path, mnist, digits):
    env = poisoned_env(tmp_path)
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert "infer must not import torch" in check.stderr
    image = drawn(digits[0], tmp_path / "d.png")
    result = subprocess.run([INFER, str(image), "--model", str(mnist[0])], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == run(image, "--model", mnist[0]).stdout and result.stderr == ""
    bad = subprocess.run([INFER, str(image), "--model", str(tmp_path / "none.onnx")],
                         env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr == f"Error: {tmp_path / 'none.onnx'}: no such file\n"


def test_dash_reads_one_image_from_standard_input(tmp_path, mnist, digits):
    image = drawn(digits[0], tmp_path / "d.png")
    piped = subprocess.run([INFER, "-", "--model", str(mnist[0]), "--format", "json"], input=image.read_bytes(),
                           capture_output=True)
    assert piped.returncode == 0, piped.stderr
    [record] = json.loads(piped.stdout)
    [from_file] = json.loads(run(image, "--model", mnist[0], "--format", "json").stdout)
    assert record == from_file | {"file": "<stdin>"}
    empty = subprocess.run([INFER, "-", "--model", str(mnist[0])], input="", capture_output=True, text=True)
    assert empty.returncode == 1 and empty.stderr == "Error: <stdin>: empty file\n"
    twice = run("-", "-", "--model", mnist[0])
    assert twice.exit_code == 2 and "can be given once only" in twice.stderr


def test_version_and_short_help():
    from importlib.metadata import version

    assert run("--version").stdout == f"infer, version {version('digitlens')}\n"
    short, long = run("-h"), run("--help")
    assert short.exit_code == long.exit_code == 0 and short.stdout == long.stdout
    assert "Usage: main [OPTIONS] IMAGES..." in short.stdout and "Exit status: 0 all classified" in short.stdout


def test_progress_bar_only_for_many_files_on_a_terminal(tmp_path, mnist, digits):
    files = [str(original(d, tmp_path / f"{i}.png")) for i, d in enumerate(digits[:infer.PROGRESS_MIN])]
    options = ["--model", str(mnist[0]), "--raw", "--batch-size", "8"]
    result, terminal = stderr_on_terminal([INFER, *files, *options])
    assert result.returncode == 0 and len(result.stdout.splitlines()) == len(files)
    assert "classifying" in terminal and f"{len(files)}/{len(files)}" in terminal
    piped = subprocess.run([INFER, *files, *options], capture_output=True, text=True)
    assert piped.returncode == 0 and piped.stderr == "" and piped.stdout == result.stdout
    few, terminal = stderr_on_terminal([INFER, *files[:infer.PROGRESS_MIN - 1], *options])
    assert few.returncode == 0 and terminal == ""
