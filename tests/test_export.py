import dataclasses
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from digitlens.classifier import Classifier
from digitlens.errors import ModelError
from digitlens.metadata import INPUT_NAME, OUTPUT_NAME, ModelInfo
from digitlens.runtime import onnx_session
from pipeline import conversion as ex
from pipeline.common import PipelineError
from pipeline.datasets import dataset_info, load_split
from pipeline.models import create_model, inference_model, list_models, save_checkpoint
from pipeline.stages import export as export_stage
from tests.conftest import ROOT


def info_for(arch: str, dataset: str = "mnist") -> ModelInfo:
    return ModelInfo(dataset, arch, dataset_info(dataset).classes, 0.1307, 0.3081, "digit",
                     params={"seed": 0, "recipe": {"lr": 0.1}}, test_accuracy=12.5, export_id="abc")


def load_torchscript(path) -> tuple[torch.jit.ScriptModule, ModelInfo]:
    """A TorchScript export and the metadata in its extra file, as a user with torch would load them."""
    extra = {ex.METADATA_FILE: ""}
    with ex.torchscript_deprecation_expected():
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module.eval(), ModelInfo.from_metadata(json.loads(extra[ex.METADATA_FILE]))


@pytest.fixture(scope="module", params=list_models())
def exported_random(request, tmp_path_factory):
    """A random-weight model of each architecture, exported (BatchNorm statistics made non-trivial)."""
    torch.manual_seed(0)
    model = create_model(request.param)
    with torch.no_grad():
        model.train()(torch.randn(64, 1, 28, 28))  # move BatchNorm running stats off their defaults
    model.eval()
    info = info_for(request.param)
    rng = np.random.default_rng(0)
    x, labels = rng.random((300, 1, 28, 28), np.float32), rng.integers(0, 10, 300)
    info, ts_bytes, onnx_bytes, report = ex.export(model, info, x, labels, batch_size=128)
    folder = tmp_path_factory.mktemp(request.param)
    (folder / "m.onnx").write_bytes(onnx_bytes)
    (folder / "m.pt").write_bytes(ts_bytes)
    return model, info, folder, report


@pytest.mark.parametrize("batch", [1, 7, 256])
def test_onnx_and_torchscript_match_pytorch(exported_random, batch):
    model, _, folder, _ = exported_random
    x = torch.from_numpy(np.random.default_rng(batch).normal(0.5, 1.0, (batch, 1, 28, 28)).astype(np.float32))
    with torch.inference_mode():
        reference = model(x).numpy()
    onnx_out = onnx_session(folder / "m.onnx").run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    scripted, _ = load_torchscript(folder / "m.pt")
    with torch.inference_mode():
        ts_out = scripted(x).numpy()
    for out in (onnx_out, ts_out):
        assert out.shape == (batch, 10)
        assert np.abs(out - reference).max() <= ex.TOLERANCE
        np.testing.assert_array_equal(out.argmax(1), reference.argmax(1))


def test_test_time_views_are_in_the_exported_graphs(tmp_path):
    torch.manual_seed(0)
    info = dataclasses.replace(info_for("cnn", "fashion-mnist"), test_flip=True, test_zoom=0.05, test_rotate=5)
    model = inference_model(create_model("cnn"), info).eval()
    rng = np.random.default_rng(0)
    x, labels = rng.random((200, 1, 28, 28), np.float32), rng.integers(0, 10, 200)
    info, ts_bytes, onnx_bytes, report = ex.export(model, info, x, labels, batch_size=64)
    (tmp_path / "m.onnx").write_bytes(onnx_bytes)
    (tmp_path / "m.pt").write_bytes(ts_bytes)
    session = onnx_session(tmp_path / "m.onnx")
    out, mirrored = (session.run([OUTPUT_NAME], {INPUT_NAME: a})[0] for a in (x[:8], np.ascontiguousarray(x[:8, ..., ::-1])))
    np.testing.assert_allclose(out, mirrored, atol=1e-5)  # an image and its mirror image: one answer
    with torch.inference_mode():  # the ten views, as PyTorch averages them, for any batch size
        np.testing.assert_allclose(out[:3], model(torch.from_numpy(x[:3])).numpy(), atol=ex.TOLERANCE)
    scripted, ts_info = load_torchscript(tmp_path / "m.pt")
    with torch.inference_mode():
        np.testing.assert_allclose(scripted(torch.from_numpy(x[:8])).numpy(), out, atol=ex.TOLERANCE)
    onnx_info = ModelInfo.from_metadata(session.get_modelmeta().custom_metadata_map)
    for views in (onnx_info, ts_info):
        assert (views.test_flip, views.test_zoom, views.test_rotate) == (True, 0.05, 5)
    assert report["onnx"]["argmax_mismatches"] == 0


def test_onnx_file_is_self_contained_and_checked(exported_random, tmp_path):
    model, _, folder, report = exported_random
    alone = tmp_path / "alone.onnx"  # no other file beside it: no external data to find
    alone.write_bytes((folder / "m.onnx").read_bytes())
    x = np.random.default_rng(1).random((5, 1, 28, 28), np.float32)
    with torch.inference_mode():
        reference = model(torch.from_numpy(x)).numpy()
    assert np.abs(onnx_session(alone).run([OUTPUT_NAME], {INPUT_NAME: x})[0] - reference).max() <= ex.TOLERANCE
    proto = onnx.load(folder / "m.onnx", load_external_data=False)
    onnx.checker.check_model(proto, full_check=True)
    assert not any(init.external_data for init in proto.graph.initializer)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [ex.OPSET]
    (inp,) = proto.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == INPUT_NAME and dims == ["batch", 1, 28, 28]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [o.name for o in proto.graph.output] == [OUTPUT_NAME]
    assert report["images"] == 300 and report["onnx"]["argmax_mismatches"] == 0


def test_metadata_round_trips_through_onnxruntime(exported):
    onnx_path, ts_path, ckpt = exported("fashion-mnist", "mlp")
    meta = onnx_session(onnx_path).get_modelmeta().custom_metadata_map
    info = ModelInfo.from_metadata(meta)
    assert info == dataclasses.replace(ckpt.info, test_accuracy=info.test_accuracy, export_id="test-fashion-mnist-mlp")
    assert 10 < info.test_accuracy <= 100
    assert info.class_names == list(ckpt.info.class_names) and info.class_names[0] == "T-shirt/top"
    assert (info.mean, info.std) == (ckpt.info.mean, ckpt.info.std)
    assert info.preprocess == "fashion" and info.input["polarity"] == "light-on-dark"
    assert info.params["recipe"]["batch_size"] == 64 and info.model_args == {"dropout": 0.2}
    assert all(isinstance(json.loads(v), (str, list, dict, float, int)) for v in meta.values())
    _, ts_info = load_torchscript(ts_path)
    assert ts_info == info


@pytest.mark.slow
def test_torchscript_runs_without_the_project(exported, tmp_path):
    _, ts_path, _ = exported("mnist", "cnn")
    script = f"""
import sys
sys.path = [p for p in sys.path if p not in ({str(ROOT)!r}, '', '.')]
sys.modules['pipeline'] = None  # any import of the project now fails
import json, torch
extra = {{'metadata.json': ''}}
m = torch.jit.load({str(ts_path)!r}, _extra_files=extra)
out = m(torch.zeros(5, 1, 28, 28))
meta = json.loads(extra['metadata.json'])
print(tuple(out.shape), json.loads(meta['architecture']), len(json.loads(meta['class_names'])))
"""
    result = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(5, 10) cnn 10"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_exports_are_refused(exported, tmp_path, damage):
    onnx_path, ts_path, _ = exported("mnist", "cnn")
    for src in (onnx_path, ts_path):
        data = src.read_bytes()
        data = {"truncate": data[: len(data) // 2], "garbage": b"\x00junk" * 50, "empty": b""}[damage]
        (tmp_path / src.name).write_bytes(data)
    with pytest.raises(ModelError, match=r"^not an ONNX model \("):
        Classifier(tmp_path / onnx_path.name)  # what loads users' .onnx files


def test_parity_failure_writes_nothing(exported, data_root, tmp_path, monkeypatch):
    """The stage refuses a disagreeing export and leaves no artifact behind."""
    onnx_path, _, ckpt = exported("mnist", "softmax")
    save_checkpoint(ckpt, tmp_path / "softmax.ckpt")
    real_parity = ex.parity

    def off_by_a_bit(*args, **kwargs):
        report = real_parity(*args, **kwargs)
        report["onnx"]["max_abs_diff"] = 3e-4
        return report

    monkeypatch.setattr(ex, "parity", off_by_a_bit)
    outs = {"--onnx": tmp_path / "a.onnx", "--torchscript": tmp_path / "a.pt", "--parity": tmp_path / "p.json"}
    args = ["--model", str(tmp_path / "softmax.ckpt"), "--data", str(data_root / "mnist"),
            "--params", str(ROOT / "params.yaml")] + [str(a) for kv in outs.items() for a in kv]
    result = CliRunner().invoke(export_stage.main, args)
    assert result.exit_code == 1
    assert result.output.startswith("Error: onnx export disagrees with PyTorch: max |diff| 0.0003 (limit 0.0001)")
    assert not any(p.exists() for p in outs.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["softmax.ckpt"]

    monkeypatch.setattr(ex, "parity", real_parity)
    assert CliRunner().invoke(export_stage.main, args).exit_code == 0
    parity = json.loads(outs["--parity"].read_text())
    assert parity["images"] == 10000 and parity["onnx"]["max_abs_diff"] <= ex.TOLERANCE
    info = Classifier(outs["--onnx"]).info
    # the test accuracy in the metadata: the checkpoint's own forward pass on the whole test split, scored here
    images, labels = load_split(data_root / "mnist", "test")
    x = (torch.from_numpy(images).float()[:, None] / 255 - info.mean) / info.std
    with torch.inference_mode():
        right = int((ckpt.model()(x).argmax(1).numpy() == labels).sum())
    assert abs(info.test_accuracy - right / 100) <= 0.02 and len(info.export_id) == 16
    assert load_torchscript(outs["--torchscript"])[1] == info
    assert all(isinstance(v, (int, float)) for fmt in ("onnx", "torchscript") for v in parity[fmt].values())
    assert set(parity) == {"images", "onnx", "torchscript"}  # numbers only: a DVC metrics file


def test_check_parity_counts_differing_predictions():
    ok = {"max_abs_diff": 1e-6, "argmax_mismatches": 0}
    ex.check_parity({"onnx": ok, "torchscript": ok})
    with pytest.raises(PipelineError, match="torchscript export disagrees with PyTorch: .* 2 predictions differ"):
        ex.check_parity({"onnx": ok, "torchscript": {"max_abs_diff": 1e-6, "argmax_mismatches": 2}})
