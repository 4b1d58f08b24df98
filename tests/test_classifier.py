"""The Python API: every input type, the same preprocessing and errors as `infer`, typed results."""
import io
import os
import re

import numpy as np
import pytest
from PIL import Image

from digitlens import Classifier, ImageError, ModelError, Prediction, Result
from digitlens.images import prepare
from digitlens.metadata import ModelInfo
from pipeline.datasets import DATASETS, load_split
from tests.conftest import BAD_FILES, tiny_onnx

INFO = ModelInfo("mnist", "tiny", DATASETS["mnist"].classes, 0.1307, 0.3081, "digit", test_accuracy=12.5)


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    """A stand-in model (Flatten + MatMul) carrying this project's metadata: fast, and any answer is checkable."""
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    return Classifier(tiny_onnx(path, metadata=INFO.to_metadata()))


@pytest.fixture(scope="module")
def digit(data_root):
    return load_split(data_root / "mnist", "test")[0][0]  # a 7


@pytest.fixture(scope="module")
def png(tmp_path_factory, digit):
    path = tmp_path_factory.mktemp("img") / "seven.png"
    Image.fromarray(255 - digit).resize((120, 120)).save(path)
    return path


def test_every_input_type_gives_the_same_answer(clf, png):
    img = Image.open(png)
    arr = np.asarray(img)
    inputs = [png, str(png), png.read_bytes(), bytearray(png.read_bytes()), open(png, "rb"), io.BytesIO(png.read_bytes()),
              img, arr, arr.astype(np.float32) / 255, np.dstack([arr] * 3), np.dstack([arr] * 3 + [np.full_like(arr, 255)])]
    results = clf.predict(inputs, top_k=3)
    assert len(results) == len(inputs) and all(isinstance(r, Result) and r.ok for r in results)
    first = [(p.index, round(p.probability, 3)) for p in results[0].predictions]
    for r in results[1:]:
        assert [(p.index, round(p.probability, 3)) for p in r.predictions] == first, r.source
    assert [r.source for r in results[:4]] == [str(png), str(png), "<bytes>", "<bytes>"]
    assert results[4].source == str(png) and results[6].source == "<image>" and results[7].source == "<array>"


def test_result_is_typed_and_turns_into_infers_json(clf, png):
    r = clf.predict(png, top_k=10)
    assert isinstance(r.top, Prediction) and r.top == r.predictions[0]
    probs = [p.probability for p in r.predictions]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-5)
    assert r.top.label == DATASETS["mnist"].classes[r.top.index]
    assert r.to_dict() == {"file": str(png), "predictions": [
        {"class": p.label, "index": p.index, "probability": round(p.probability, 6)} for p in r.predictions]}


def test_probabilities_are_the_models_own_softmax(clf, png):
    x = prepare(png, "digit")[None]
    z = clf.session.run(None, {clf.input_name: ((x - INFO.mean) / INFO.std).astype(np.float32)[:, None]})[0][0]
    expected = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    np.testing.assert_allclose([p.probability for p in sorted(clf.predict(png, top_k=10).predictions,
                                                               key=lambda p: p.index)], expected, rtol=1e-5)


def test_raw_takes_mnist_form_arrays_as_they_are(clf, digit):
    as_float = clf.predict(digit.astype(np.float32) / 255, raw=True, top_k=10)
    assert as_float.top.index == clf.predict(digit, raw=True).top.index
    with pytest.raises(ImageError, match="raw input must be 28x28"):
        clf.predict(np.zeros((30, 28), np.uint8), raw=True)


BAD_INPUTS = {  # name -> (input, what the error says)
    "empty bytes": (b"", "empty file"),
    "text bytes": (b"hello", "not an image"),
    "str file object": (io.StringIO("x"), "open the image in binary mode"),
    "a number": (42, "unsupported input type int"),
    "None": (None, "unsupported input type NoneType"),
    "4-d array": (np.zeros((2, 28, 28, 1)), "array of shape (2, 28, 28, 1)"),
    "2-channel array": (np.zeros((28, 28, 2)), "array of shape (28, 28, 2)"),
    "empty array": (np.zeros((0, 28)), "has no pixels"),
    "int64 array": (np.zeros((28, 28), np.int64), "dtype int64"),
    "bool array": (np.zeros((28, 28), bool), "dtype bool"),
    "NaN array": (np.full((28, 28), np.nan, np.float32), "NaN or infinite"),
    "out of range": (np.full((28, 28), 2.0), "must lie in [0, 1]"),
    "huge array": (np.zeros((5000, 5000), np.uint8), "more than the 20,000,000"),
    "blank array": (np.zeros((28, 28), np.uint8), "no content"),
    "missing path": ("/nonexistent/x.png", "no such file"),
    "folder": (".", "not a regular file"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_raise_image_error_in_one_line(clf, name):
    source, reason = BAD_INPUTS[name]
    with pytest.raises(ImageError, match=re.escape(reason)) as info:
        clf.predict(source)
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_files_as_bytes_fail_as_they_do_for_infer(clf, tmp_path, name):
    write, reason = BAD_FILES[name]
    write(tmp_path / name)
    with pytest.raises(ImageError, match=reason):
        clf.predict((tmp_path / name).read_bytes())


def test_classify_reports_each_bad_input_and_goes_on(clf, png):
    results = list(clf.classify([png, b"junk", png], batch_size=2))
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].to_dict() == {"file": "<bytes>", "error": "not an image in a supported format (PNG, JPEG, GIF, "
                                                                 "BMP, TIFF, WEBP)"}
    with pytest.raises(ImageError, match=r"^<bytes>: not an image"):
        clf.predict([png, b"junk"])


def test_bad_arguments_and_models(clf, png, tmp_path):
    for bad in (0, -1, "3", 1.5):
        with pytest.raises(ValueError, match="top_k must be a positive integer"):
            clf.predict(png, top_k=bad)
    with pytest.raises(ValueError, match="device must be one of cpu, cuda"):
        Classifier(clf.path, device="tpu")
    with pytest.raises(ModelError, match="no such file"):
        Classifier(tmp_path / "absent.onnx")
    os.mkfifo(tmp_path / "fifo.onnx")
    with pytest.raises(ModelError, match="not a regular file"):
        Classifier(tmp_path / "fifo.onnx")  # refused without opening it: no hang


@pytest.mark.parametrize("field, value, reason", [
    ("normalization", '{"mean": NaN, "std": 0.3}', "normalization.mean must be a finite number"),
    ("normalization", '{"mean": 0.1, "std": Infinity}', "normalization.std must be a finite number"),
    ("normalization", '{"mean": 0.1, "std": 1e-9}', r"normalization.std must be above 0.001"),
    ("normalization", '{"mean": "0.1", "std": 0.3}', "normalization.mean must be a finite number"),
    ("class_names", '"0123456789"', "class_names must be a non-empty list of strings"),
    ("class_names", '{"a": 1}', "class_names must be a non-empty list of strings"),
    ("preprocess", '"jpeg2000"', "unknown preprocessing 'jpeg2000'"),
    ("dataset", "not json", "not JSON"),
    ("test_flip", '"yes"', "test_flip must be true or false"),
])
def test_malformed_metadata_is_refused_not_coerced(tmp_path, field, value, reason):

    meta = INFO.to_metadata() | {field: value}
    with pytest.raises(ModelError, match=reason):
        Classifier(tiny_onnx(tmp_path / "m.onnx", metadata=meta))
