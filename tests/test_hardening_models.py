"""Hardening, second round, on the model and training side: damaged metadata, diverging training, params that
would cost gigabytes or crash a parser, a mirror that redirects in a loop, the API's top_k rule."""
from __future__ import annotations

import copy
import json

import pytest
import yaml
from click.testing import CliRunner

from digitlens import Classifier, ModelError, infer
from digitlens.serve import main as serve
from pipeline.common import PipelineError, write_json
from pipeline.params import parse_params
from pipeline.stages import train as train_stage
from tests.conftest import ROOT, tiny_onnx

RAW = yaml.safe_load((ROOT / "params.yaml").read_text())


def one_line_error(output: str, *parts: str) -> None:
    assert output.count("\n") == 1 and output.startswith("Error: ") and "Traceback" not in output, output
    assert all(p in output for p in parts), output


# ---------------------------------------------------------------------------- case 8: metadata that is not UTF-8

@pytest.fixture
def bad_utf8_model(tmp_path):
    from digitlens.metadata import ModelInfo

    info = ModelInfo("mnist", "tiny", [str(i) for i in range(10)], 0.1307, 0.3081, "digit", export_id="MARKER")
    path = tiny_onnx(tmp_path / "bad.onnx", metadata=info.to_metadata())
    path.write_bytes(path.read_bytes().replace(b"MARKER", b"\xffARKER"))
    return path


def test_metadata_that_is_not_utf8_is_a_model_error_everywhere(bad_utf8_model, tmp_path):
    with pytest.raises(ModelError, match="its metadata is not valid UTF-8"):
        Classifier(bad_utf8_model)
    r = CliRunner().invoke(infer.main, [str(tmp_path / "x.png"), "--model", str(bad_utf8_model)])
    assert r.exit_code == 2
    one_line_error(r.output, "bad.onnx: its metadata is not valid UTF-8")
    r = CliRunner().invoke(serve, ["--model", str(bad_utf8_model)])
    assert r.exit_code == 2
    one_line_error(r.output, "bad.onnx: its metadata is not valid UTF-8")


# ---------------------------------------------------------------------------- case 9: training that diverges

def quick(raw: dict, **recipe) -> dict:
    raw = copy.deepcopy(raw)
    raw["device"], raw["train"]["epochs"], raw["data"]["train_limit"] = "cpu", 1, 600
    raw["recipes"]["mlp"] |= recipe
    return raw


def test_diverging_training_stops_in_one_line_and_writes_nothing(tmp_path, data_root):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(quick(RAW, lr=90.0)))
    out, live, run = tmp_path / "out" / "m.pt", tmp_path / "out" / "live", tmp_path / "out" / "run.json"
    r = CliRunner().invoke(train_stage.main, ["--dataset", "mnist", "--arch", "mlp", "--data", str(data_root / "mnist"),
                                              "--out", str(out), "--live", str(live), "--run-json", str(run),
                                              "--params", str(params)])
    assert r.exit_code == 1
    one_line_error(r.stderr, "mlp on mnist diverged, epoch 1: the training loss is nan", "lower recipes.mlp.lr (90)")
    assert not out.parent.exists() or not any(out.parent.iterdir())


@pytest.mark.parametrize("change, error", [
    (lambda raw: raw["recipes"]["mlp"].update(lr=1e300), "recipes.mlp.lr: Input should be less than or equal to 100"),
    (lambda raw: raw["datasets"].update(parts={"source": "folder", "path": "parts", "image_size": 12}),
     "datasets.parts.image_size: Input should be greater than or equal to 16"),
])
def test_knobs_that_cannot_train_are_refused_before_training(change, error):
    raw = copy.deepcopy(RAW)
    change(raw)
    with pytest.raises(PipelineError, match=error.replace(".", r"\.")):
        parse_params(raw)


def test_metrics_files_are_always_valid_json(tmp_path):
    with pytest.raises(PipelineError, match="a value is not finite"):
        write_json(tmp_path / "metrics.json", {"loss": float("nan")})
    assert not (tmp_path / "metrics.json").exists()
    write_json(tmp_path / "metrics.json", {"loss": 0.5})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"loss": 0.5}


# ---------------------------------------------------------------------------- case 10: params that cost gigabytes

def test_model_args_are_checked_without_building_the_weights():
    """width 4096 and hidden 4096 are each in range, and took 13 GB to validate; now a line, no allocation."""
    import resource

    raw = copy.deepcopy(RAW)
    raw["recipes"]["tuned_cnn"]["model_args"] = {"width": 4096, "hidden": 4096, "dropout": 0.1}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(PipelineError, match=r"recipes: Value error, tuned_cnn\.model_args: 7,818,379,274 parameters; "
                                            r"the limit is 50,000,000"):
        parse_params(raw)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200_000  # kB: no weights were allocated


# ---------------------------------------------------------------------------- case 11: a seed of 100,000 digits

def test_an_integer_too_long_to_read_is_one_line(tmp_path):
    from pipeline.params import load_params

    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text().replace("seed: 0", "seed: " + "9" * 100_000, 1))
    with pytest.raises(PipelineError, match=r"cannot read params \(Exceeds the limit") as e:
        load_params(path)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------- case 12: a mirror redirecting in a loop

def test_a_redirect_loop_is_one_line(tmp_path, monkeypatch, http_mirror_redirecting):
    from pipeline import download

    monkeypatch.setenv(download.MIRROR_ENV, http_mirror_redirecting)
    monkeypatch.setattr(download, "dataset_info", lambda name: type("Info", (), {
        "urls": [], "sha256": {"train-images-idx3-ubyte": "0" * 64}})())
    with pytest.raises(PipelineError) as e:
        download.fetch("mnist", tmp_path / "mnist", log=lambda m: None)
    assert "\n" not in str(e.value) and "redirect error that would lead to an infinite loop" in str(e.value)
    assert not (tmp_path / "mnist").exists()


@pytest.fixture
def http_mirror_redirecting():
    """A local HTTP server whose every answer redirects to itself."""
    import http.server
    import threading

    class Loop(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", self.path)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Loop)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


# ---------------------------------------------------------------------------- case 7: one top_k rule

@pytest.mark.parametrize("top_k", [True, False, 0, 1.0, "2"])
def test_the_api_refuses_what_serve_refuses_as_top_k(top_k, tmp_path):
    from digitlens.metadata import ModelInfo

    info = ModelInfo("mnist", "tiny", [str(i) for i in range(10)], 0.1307, 0.3081, "digit")
    clf = Classifier(tiny_onnx(tmp_path / "m.onnx", metadata=info.to_metadata()))
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        list(clf.classify([tmp_path / "none.png"], top_k=top_k))
