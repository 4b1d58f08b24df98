"""The HTTP API of `serve`: every endpoint and error status, in-process (TestClient) and over a real uvicorn server."""
from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

if not os.environ.get("CI"):  # in CI a missing package fails the import below
    pytest.importorskip("fastapi", reason="the [serve] extra is not installed (pip install '.[serve]')")
from fastapi.testclient import TestClient  # noqa: E402

from digitlens.app import create_app
from digitlens.classifier import Classifier  # noqa: E402
from digitlens.serve import ServeConfig, main  # noqa: E402
from pipeline.datasets import load_split  # noqa: E402
from tests.conftest import get, post, process_tree, serve_process  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 300_000  # bytes per request in these tests
MAX_FILES = 4


def png(a: np.ndarray, scale: int = 1) -> bytes:
    img = Image.fromarray(a)
    if scale > 1:
        img = img.resize((a.shape[1] * scale, a.shape[0] * scale), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def digits_model(exported) -> Path:
    return exported("mnist", "cnn")[0]


@pytest.fixture(scope="module")
def fashion_model(exported) -> Path:
    return exported("fashion-mnist", "cnn")[0]


@pytest.fixture(scope="module")
def digits(data_root, digits_model) -> list[tuple[int, bytes]]:
    """(label, PNG: black on white, 3x upscaled) of MNIST test digits the model gets right: 2 of each label."""
    images, labels = load_split(data_root / "mnist", "test")
    clf = Classifier(digits_model)
    picked: dict[int, list[bytes]] = {d: [] for d in range(10)}
    for image, label in zip(images[:500], labels[:500]):
        data = png(255 - image, scale=3)
        if len(picked[label]) < 2 and clf.predict(data).top.index == label:
            picked[label].append(data)
    assert all(len(v) == 2 for v in picked.values()), "the test model misses too many digits"
    return [(d, data) for i in range(2) for d, found in picked.items() for data in found[i:i + 1]]


@pytest.fixture
def make_client(digits_model, fashion_model):
    """make_client(**ServeConfig fields) -> a TestClient of a fresh app over both models."""
    clients = []

    def make(raise_server_exceptions=True, **config):
        config = {"max_bytes": LIMIT, "max_files": MAX_FILES} | config
        app = create_app(ServeConfig((str(digits_model), str(fashion_model)), **config))
        clients.append(TestClient(app, raise_server_exceptions=raise_server_exceptions).__enter__())
        return clients[-1]

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client()


def predict_url(model: str = "mnist-cnn", query: str = "") -> str:
    return f"/v1/models/{model}/predict" + (f"?{query}" if query else "")


def assert_error(r, status: int, contains: str = "") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body["error"], str) and "\n" not in body["error"] and contains in body["error"]
    assert "Traceback" not in r.text
    return body


# --- the endpoints

def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "models": ["mnist-cnn", "fashion-mnist-cnn"]}


def test_models_list_their_metadata(client, digits_model):
    models = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["mnist-cnn", "fashion-mnist-cnn"]
    import onnx

    written = {p.key: json.loads(p.value) for p in onnx.load(digits_model).metadata_props}  # as export wrote them
    assert models[0]["name"] == "mnist-cnn" and models[0]["class_names"] == written["class_names"]
    assert (models[0]["mean"], models[0]["std"]) == (written["normalization"]["mean"], written["normalization"]["std"])
    assert models[0]["params"] == written["params"] and models[0]["export_id"] == written["export_id"]
    assert models[0]["dataset"] == "mnist" and models[0]["preprocess"] == "digit"
    assert models[1]["dataset"] == "fashion-mnist" and models[1]["preprocess"] == "fashion"
    assert models[1]["class_names"][0] == "T-shirt/top" and models[1]["test_accuracy"] > 0
    assert client.get("/v1/models/fashion-mnist-cnn").json() == models[1]
    assert_error(client.get("/v1/models/nope"), 404, "no model 'nope'; loaded: mnist-cnn, fashion-mnist-cnn")


def test_predict_answers_like_infer_json(client, digits, digits_model, tmp_path):
    """The records are those `infer --format json` prints for the same files."""
    from digitlens.infer import main as infer

    files = []
    for i, (label, data) in enumerate(digits[:3]):
        (tmp_path / f"{i}-{label}.png").write_bytes(data)
        files.append(("files", (f"{i}-{label}.png", data, "image/png")))
    r = client.post(predict_url(query="top_k=3"), files=files)
    assert r.status_code == 200, r.text
    run = CliRunner().invoke(infer, ["--model", str(digits_model), "--format", "json", "--top-k", "3",
                                     *(str(tmp_path / f) for _, (f, _, _) in files)])
    assert run.exit_code == 0, run.output
    expected = [rec | {"file": Path(rec["file"]).name} for rec in json.loads(run.output)]
    assert r.json() == expected
    assert [rec["predictions"][0]["index"] for rec in r.json()] == [label for label, _ in digits[:3]]
    assert all(len(rec["predictions"]) == 3 for rec in r.json())


def test_browsers_multipart_boundary(client, digits):
    """Chrome's boundaries have capitals (----WebKitFormBoundary...): the Content-Type must not be lowercased."""
    label, data = digits[0]
    body = (b"------WebKitFormBoundaryAbC\r\nContent-Disposition: form-data; name=\"files\"; filename=\"drawing.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + data + b"\r\n------WebKitFormBoundaryAbC--\r\n")
    r = client.post(predict_url(), content=body,
                    headers={"content-type": "Multipart/Form-Data; boundary=----WebKitFormBoundaryAbC"})
    assert r.status_code == 200, r.text
    assert r.json()[0]["file"] == "drawing.png" and r.json()[0]["predictions"][0]["index"] == label


def test_top_k_as_a_form_field_or_in_the_query(client, digits):
    label, data = digits[0]
    one = client.post(predict_url(), files={"files": ("a.png", data)}).json()
    assert len(one[0]["predictions"]) == 1 and one[0]["predictions"][0]["index"] == label
    form = client.post(predict_url(), data={"top_k": "4"}, files={"files": ("a.png", data)}).json()
    assert len(form[0]["predictions"]) == 4
    both = client.post(predict_url(query="top_k=2"), data={"top_k": "4"}, files={"files": ("a.png", data)}).json()
    assert len(both[0]["predictions"]) == 2  # the query wins


def test_fashion_model_classifies_pictures(client, data_root):
    images, labels = load_split(data_root / "fashion-mnist", "test")
    files = [("files", (f"{i}.png", png(255 - images[i], scale=4))) for i in range(4)]
    r = client.post(predict_url("fashion-mnist-cnn"), files=files)
    assert r.status_code == 200
    assert [rec["file"] for rec in r.json()] == [f"{i}.png" for i in range(4)]
    assert sum(rec["predictions"][0]["index"] == label for rec, label in zip(r.json(), labels)) >= 3


def test_each_bad_file_gets_its_own_record(client, digits):
    label, data = digits[1]
    r = client.post(predict_url(), files=[("files", ("good.png", data)), ("files", ("bad.png", b"not an image")),
                                          ("files", ("empty.png", b""))])
    assert r.status_code == 200
    good, bad, empty = r.json()
    assert good["file"] == "good.png" and good["predictions"][0]["index"] == label
    assert bad == {"file": "bad.png", "error": "not an image in a supported format (PNG, JPEG, GIF, BMP, TIFF, WEBP)"}
    assert empty == {"file": "empty.png", "error": "empty file"}


def bomb() -> bytes:
    """A tiny PNG that decodes to 25 million pixels."""
    buf = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("make, error", [
    (lambda d: b"hello", "not an image"),
    (lambda d: d[: len(d) // 2], "truncated or corrupt PNG image"),
    (lambda d: png(np.full((28, 28), 255, np.uint8)), "no content"),
    (lambda d: bomb(), "more than the 20,000,000 this tool decodes"),
], ids=["not-an-image", "truncated", "blank", "bomb"])
def test_no_usable_image_is_400(client, digits, make, error):
    data = make(digits[0][1])
    assert len(data) < LIMIT
    body = assert_error(client.post(predict_url(), files={"files": ("x.png", data)}), 400, error)
    assert body["error"].startswith("x.png: ") and body["results"][0]["file"] == "x.png"
    body = assert_error(client.post(predict_url(), files=[("files", ("x.png", data)), ("files", ("y.png", b"?"))]),
                        400, "none of the 2 images is usable")
    assert [r["file"] for r in body["results"]] == ["x.png", "y.png"]


def test_malformed_multipart_is_400(client):
    headers = {"content-type": "multipart/form-data; boundary=xyz"}
    assert_error(client.post(predict_url(), content=b"--xyz\r\nContent-Disposition: form-data; name=\"files\"; "
                             b"filename=\"a.png\"\r\n\r\nabc", headers=headers), 400)
    assert_error(client.post(predict_url(), content=b"junk", headers={"content-type": "multipart/form-data"}),
                 400, "boundary")
    assert_error(client.post(predict_url(), files={"file": ("a.png", b"x")}), 400,
                 "no file in the form field 'files' (found files in 'file')")
    assert_error(client.post(predict_url(), data={"top_k": "1"}, files={}), 415)  # urlencoded: no file at all


def test_json_arrays_are_classified_raw(make_client, data_root, digits_model):
    """Arrays in MNIST form are classified as they are: the answer is onnxruntime's own on those pixels."""
    import onnxruntime as ort

    client = make_client(max_files=8)
    images, labels = load_split(data_root / "mnist", "test")
    x = images[:2] / 255.0
    r = client.post(predict_url(), json={"images": [x[0].tolist(), x[1].tolist(), [[0.5] * 27] * 28,
                                                    [[2.0] * 28] * 28, [[0.5] * 28, [0.5] * 27]], "top_k": 2})
    assert r.status_code == 200, r.text
    info = Classifier(digits_model).info  # mean and std, as its metadata says
    pixels = np.round(x * 255) / 255  # what a float array in [0, 1] becomes on its way through 8-bit grey
    z = ort.InferenceSession(str(digits_model)).run(None, {"input": ((pixels - info.mean) / info.std)
                                                          .astype(np.float32)[:, None]})[0]
    for record, logits, label in zip(r.json()[:2], z, labels):
        assert [p["index"] for p in record["predictions"]] == list(np.argsort(-logits)[:2])
        assert record["predictions"][0]["index"] == label
    assert r.json()[2:] == [
        {"file": "images[2]", "error": "is 27x28 pixels; raw input must be 28x28"},
        {"file": "images[3]", "error": "float array values must lie in [0, 1] (found 2 to 2)"},
        {"file": "images[4]", "error": "not an array of numbers (rows of equal length, numbers only)"},
    ]


@pytest.mark.parametrize("body, error", [
    (b"{", "body is not valid JSON"),
    (b'{"images": [[[0.5]]]}', "images[0]: is 1x1 pixels; raw input must be 28x28"),
    (b'{"images": [[[NaN]]]}', "images[0]: array holds NaN or infinite values"),
    (b'\xff\xfe', "body is not valid JSON"),
    (b"[" * 100_000, "body is not valid JSON"),  # too deep for the parser: still a bad body, not a 500
])
def test_bad_json_is_400(client, body, error):
    assert_error(client.post(predict_url(), content=body, headers={"content-type": "application/json"}), 400, error)


@pytest.mark.parametrize("body, error", [
    (b"[]", "body: Input should be an object (got [])"),
    (b"{}", "images: Field required"),
    (b'{"images": []}', "images: List should have at least 1 item"),
    (b'{"images": ["digit.png"]}', "images.0: Input should be a valid array (got 'digit.png')"),
    (b'{"images": [[["0.5"]]]}', "Input should be a valid number"),
])
def test_json_of_the_wrong_shape_is_422(client, body, error):
    assert_error(client.post(predict_url(), content=body, headers={"content-type": "application/json"}), 422, error)


def test_unknown_model_route_or_method(client):
    assert_error(client.post(predict_url("nope"), files={"files": ("a.png", b"x")}), 404, "no model 'nope'")
    assert_error(client.get("/v2/anything"), 404, "Not Found")
    r = client.get(predict_url())
    assert_error(r, 405, "Method Not Allowed")
    assert r.headers["allow"] == "POST"


def test_body_over_the_limit_is_413(client):
    headers = {"content-type": "multipart/form-data; boundary=x"}
    too_big = b"x" * (LIMIT + 1)
    assert_error(client.post(predict_url(), content=too_big, headers=headers), 413, "over the 0.286 MB limit")
    # no Content-Length (chunked): counted while reading
    chunks = iter([b"x" * 100_000] * 4)
    assert_error(client.post(predict_url(), content=chunks, headers=headers), 413, "over the 0.286 MB limit")
    assert_error(client.post(predict_url(), content=too_big, headers={"content-type": "application/json"}), 413)


def test_too_many_files_is_413(client, digits):
    files = [("files", (f"{i}.png", data)) for i, (_, data) in enumerate(digits[:MAX_FILES + 1])]
    assert_error(client.post(predict_url(), files=files), 413, f"5 images in one request; the limit is {MAX_FILES}")
    assert client.post(predict_url(), files=files[:MAX_FILES]).status_code == 200
    arrays = [[[0.0] * 28] * 28] * (MAX_FILES + 1)
    assert_error(client.post(predict_url(), json={"images": arrays}), 413, "the limit is 4")


@pytest.mark.parametrize("content_type", ["text/plain", "image/png", "application/x-www-form-urlencoded", None])
def test_wrong_content_type_is_415(client, content_type):
    headers = {"content-type": content_type} if content_type else {}
    assert_error(client.post(predict_url(), content=b"x", headers=headers), 415,
                 "send multipart/form-data (field 'files') or application/json")


@pytest.mark.parametrize("where, value", [("query", "0"), ("query", "-1"), ("query", "x"), ("query", "1.5"),
                                          ("query", "%C2%B2"), ("form", "\u00b2"),
                                          ("form", "0"), ("form", "x"), ("json", 0), ("json", "x"), ("json", True),
                                          ("json", 2.0)])
def test_bad_top_k_is_422(client, digits, where, value):
    files = {"files": ("a.png", digits[0][1])}
    if where == "query":
        r = client.post(predict_url(query=f"top_k={value}"), files=files)
    elif where == "form":
        r = client.post(predict_url(), data={"top_k": value}, files=files)
    else:
        r = client.post(predict_url(), json={"images": [[[0.0] * 28] * 28], "top_k": value})
    assert_error(r, 422, "top_k must be a positive integer")


def test_empty_top_k_form_field_means_the_default(client, digits):
    """As HTML forms send a field left empty."""
    r = client.post(predict_url(), data={"top_k": ""}, files={"files": ("a.png", digits[0][1])})
    assert r.status_code == 200 and len(r.json()[0]["predictions"]) == 1


def test_body_limit_comes_before_parameters(client):
    """FastAPI reads the body before it validates parameters: an oversize body is 413 whatever its query says."""
    headers = {"content-type": "multipart/form-data; boundary=x"}
    assert_error(client.post(predict_url(query="top_k=0"), content=b"x" * (LIMIT + 1), headers=headers), 413)


def test_failures_are_json_500_and_the_server_goes_on(make_client, digits, monkeypatch):
    from digitlens.errors import ModelError

    client = make_client(raise_server_exceptions=False)
    clf = client.app.state.models["mnist-cnn"]

    def failing(error: Exception):
        def classify(*args, **kwargs):
            raise error
        return classify

    monkeypatch.setattr(clf, "classify", failing(RuntimeError("secret\ndetail")))
    r = client.post(predict_url(), files={"files": ("a.png", digits[0][1])})
    assert assert_error(r, 500) == {"error": "internal error (RuntimeError)"}
    assert r.headers["x-content-type-options"] == "nosniff"  # answered inside the middleware, like every other
    monkeypatch.setattr(clf, "classify", failing(ModelError("onnxruntime failed")))
    assert_error(client.post(predict_url(), files={"files": ("a.png", digits[0][1])}), 500,
                 "the model failed: onnxruntime failed")
    assert client.get("/healthz").status_code == 200
    assert client.post(predict_url("fashion-mnist-cnn"), files={"files": ("a.png", digits[0][1])}).status_code == 200


def test_a_slow_prediction_blocks_neither_health_nor_other_requests(make_client, digits):
    """Model work runs off the event loop: while one request's classification is held, others are answered."""
    client = make_client()
    clf = client.app.state.models["mnist-cnn"]
    entered, release = threading.Event(), threading.Event()
    classify = clf.classify

    def held(images, *args, names=None, **kwargs):
        if names and names[0] == "slow.png":
            entered.set()
            assert release.wait(30)
        return classify(images, *args, names=names, **kwargs)

    clf.classify = held
    answers = {}
    slow = threading.Thread(target=lambda: answers.setdefault("slow", client.post(
        predict_url(), files={"files": ("slow.png", digits[0][1])})))
    slow.start()
    try:
        assert entered.wait(30)
        assert client.get("/healthz").status_code == 200
        fast = client.post(predict_url(), files={"files": ("fast.png", digits[1][1])})
        assert fast.status_code == 200 and fast.json()[0]["predictions"][0]["index"] == digits[1][0]
        assert slow.is_alive() and "slow" not in answers
    finally:
        release.set()
        slow.join(30)
    assert answers["slow"].json()[0]["predictions"][0]["index"] == digits[0][0]


# --- the schema and the page

def test_openapi_schema_and_no_cdn_docs(client):
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == {"/healthz", "/readyz", "/v1/models", "/v1/models/{name}",
                                    "/v1/models/{name}/predict"}
    post = schema["paths"]["/v1/models/{name}/predict"]["post"]
    body = post["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    form = schema["components"]["schemas"][body["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]]
    assert form["properties"]["files"]["anyOf"][0]["type"] == "array"
    assert form["properties"]["top_k"]["anyOf"][0]["minimum"] == 1
    images = body["application/json"]["schema"]
    assert images["required"] == ["images"] and images["properties"]["images"]["minItems"] == 1
    [query] = [p for p in post["parameters"] if p["in"] == "query"]
    assert query["name"] == "top_k" and query["schema"]["anyOf"][0]["minimum"] == 1
    assert {"400", "404", "413", "415", "422"} <= set(post["responses"])
    for path in ("/docs", "/redoc"):
        assert client.get(path).status_code == 404


def test_page_is_served_and_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for element in ('id="canvas"', 'id="clear"', 'id="file"', 'id="model"', 'id="predictions"', 'id="top-label"'):
        assert element in r.text
    assert "http://" not in r.text and "https://" not in r.text  # nothing from a CDN
    assert "default-src 'self'" in r.headers["content-security-policy"]


# --- the command

def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_server_does_not_import_torch(digits_model):
    r = run_python(f"import sys; from digitlens.serve import ServeConfig; from digitlens.app import create_app; "
                   f"create_app(ServeConfig(({str(digits_model)!r},))); "
                   f"assert 'torch' not in sys.modules, 'torch imported'")
    assert r.returncode == 0, r.stderr


def test_without_the_extra_serve_names_it():
    r = run_python("import sys; sys.modules['fastapi'] = None; sys.argv = ['serve', '--help']; "
                   "from digitlens.serve import cli; cli()")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "Error: serve needs the [serve] extra (fastapi is not installed): pip install '.[serve]'"]


def test_help_and_bad_models():
    runner = CliRunner()
    r = runner.invoke(main, ["-h"])
    assert r.exit_code == 0 and "--model" in r.output and "--workers" in r.output and "--max-upload-mb" in r.output
    r = runner.invoke(main, ["--model", "nowhere.onnx"])
    assert r.exit_code == 2 and r.output.strip().endswith("nowhere.onnx: no such file")


def test_two_models_of_one_name_are_refused(digits_model, tmp_path):
    (tmp_path / "mnist-cnn.onnx").write_bytes(digits_model.read_bytes())
    r = CliRunner().invoke(main, ["--model", str(digits_model), "--model", str(tmp_path / "mnist-cnn.onnx")])
    assert r.exit_code == 2 and "two models are named 'mnist-cnn'" in r.output


# --- a real server

def gone(pids: list[int]) -> bool:
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(Path(f"/proc/{p}").exists() for p in pids)


@pytest.mark.slow
def test_real_server(digits_model, fashion_model, digits, tmp_path):
    """uvicorn on a free port: concurrent clients each get their own answer, /healthz answers under load,
    a declared oversize body is refused before it is sent, one log line per request, nothing left running."""
    log = tmp_path / "serve.log"
    with serve_process([digits_model, fashion_model], ["--max-upload-mb", "1"], log=log) as (url, proc):
        predict, barrier = f"{url}/v1/models/mnist-cnn/predict", threading.Barrier(16)

        def ask(i: int):
            barrier.wait()
            return post(predict, [(f"{i}.png", digits[i][1])])

        with ThreadPoolExecutor(17) as pool:
            heavy = pool.submit(post, predict, [(f"{i}.png", data) for i, (_, data) in enumerate(digits)] * 3)
            answers = [pool.submit(ask, i) for i in range(16)]
            assert get(f"{url}/healthz", timeout=5) == (200, b'{"status":"ok"}')  # answered under load
            for i, answer in enumerate(answers):
                status, body = answer.result(60)
                assert status == 200 and body[0]["file"] == f"{i}.png"
                assert body[0]["predictions"][0]["index"] == digits[i][0]
            assert heavy.result(60)[0] == 200 and len(heavy.result()[1]) == 60

        # a Content-Length over the limit is refused before the body is sent
        with contextlib.closing(http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), 10)) as conn:
            conn.putrequest("POST", "/v1/models/mnist-cnn/predict")
            conn.putheader("Content-Type", "multipart/form-data; boundary=x")
            conn.putheader("Content-Length", str(5 * 2**20))
            conn.endheaders()
            r = conn.getresponse()
            assert r.status == 413 and json.loads(r.read()) == {"error": "request body over the 1 MB limit"}
        pids = process_tree(proc.pid)
    assert proc.poll() is not None and gone(pids)
    lines = [line for line in log.read_text().splitlines() if '"POST /v1/models/mnist-cnn/predict"' in line]
    assert len(lines) == 18 and sum(" 413 " in line for line in lines) == 1
    assert any(line.endswith(": request body over the 1 MB limit") for line in lines)


@pytest.mark.slow
def test_several_workers(digits_model, digits):
    with serve_process([digits_model], ["--workers", "2"]) as (url, proc):
        pids = process_tree(proc.pid)
        assert len(pids) >= 3  # the supervisor and its two workers
        for label, data in digits[:4]:
            status, body = post(f"{url}/v1/models/mnist-cnn/predict", [("a.png", data)])
            assert status == 200 and body[0]["predictions"][0]["index"] == label
    assert gone(pids)
