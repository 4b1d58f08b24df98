"""The train -> export -> evaluate chain of one model, run as the stages run (no DVC): DVCLive's files readable while
training runs, the evaluate stage scoring the exported ONNX file without torch, its figures, card and mistakes."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from digitlens import Classifier
from pipeline import reports as ev
from pipeline.datasets import load_split
from pipeline.models import load_checkpoint
from pipeline.stages import evaluate as evaluate_stage
from pipeline.stages import export as export_stage
from pipeline.stages import train as train_stage
from pipeline.tensors import amp_dtype, precision_label
from tests.conftest import ROOT


def test_most_confident_mistakes_come_first():
    labels = np.array([0, 1, 2, 3, 0])
    probs = np.array([[0.9, 0.1, 0, 0],  # right
                      [0.6, 0.4, 0, 0],  # wrong, 0.6
                      [0.05, 0.05, 0.1, 0.8],  # wrong, 0.8
                      [0, 0, 0, 1.0],  # right
                      [0.3, 0.7, 0, 0]])  # wrong, 0.7
    assert ev.most_confident_mistakes(labels, probs, 10).tolist() == [2, 4, 1]
    assert ev.most_confident_mistakes(labels, probs, 2).tolist() == [2, 4]
    assert ev.most_confident_mistakes(labels[[0, 3]], probs[[0, 3]], 5).tolist() == []


def invoke(stage, args: dict) -> None:
    result = CliRunner().invoke(stage.main, [str(a) for kv in args.items() for a in kv])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def chain(data_root, tmp_path_factory, monkeypatch_module):
    """simple_cnn on Fashion-MNIST, 3 short epochs, through the three stages; DVCLive's metrics.json and the
    checkpoint as they stood after each epoch."""
    folder = tmp_path_factory.mktemp("chain")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.update(device="cpu", data={"train_limit": 500}, train={**raw["train"], "epochs": 3})
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    paths = {name: folder / name for name in ("m.pt", "train", "run.json", "a.onnx", "a.pt", "parity.json",
                                              "metrics.json", "classes.json", "predictions.csv", "report.png",
                                              "mistakes.png", "a.md")}
    seen = []
    real_train = train_stage.train

    def watched(*args, on_epoch, **kwargs):
        def spy(row):
            on_epoch(row)  # the stage's own logging, then a look at what a reader finds at that moment
            seen.append((json.loads((paths["train"] / "metrics.json").read_text()), paths["m.pt"].exists()))
        return real_train(*args, on_epoch=spy, **kwargs)

    monkeypatch_module.setattr(train_stage, "train", watched)
    data = data_root / "fashion-mnist"
    invoke(train_stage, {"--dataset": "fashion-mnist", "--arch": "simple_cnn", "--data": data, "--out": paths["m.pt"],
                         "--live": paths["train"], "--run-json": paths["run.json"], "--params": folder / "params.yaml"})
    invoke(export_stage, {"--model": paths["m.pt"], "--data": data, "--onnx": paths["a.onnx"],
                          "--torchscript": paths["a.pt"], "--parity": paths["parity.json"],
                          "--params": folder / "params.yaml"})
    evaluate_args = {"--onnx": paths["a.onnx"], "--torchscript": paths["a.pt"], "--data": data, "--live": paths["train"],
                     "--run-json": paths["run.json"], "--parity": paths["parity.json"], "--metrics": paths["metrics.json"],
                     "--classes": paths["classes.json"], "--predictions": paths["predictions.csv"],
                     "--plot": paths["report.png"], "--mistakes": paths["mistakes.png"], "--card": paths["a.md"]}
    invoke(evaluate_stage, evaluate_args)
    return paths, seen, evaluate_args


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_training_metrics_can_be_read_before_it_ends(chain):
    paths, seen, _ = chain
    assert [(m["step"], done) for m, done in seen] == [(1, False), (2, False), (3, False)]
    first = seen[0][0]
    assert set(first) == {"train", "val", "lr", "epoch_time_s", "step"} and 0 < first["val"]["accuracy"] <= 100
    history = ev.read_history(paths["train"])
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert history[-1]["val/accuracy"] == json.loads((paths["train"] / "metrics.json").read_text())["val"]["accuracy"]
    tsv = (paths["train"] / "plots" / "metrics" / "val" / "accuracy.tsv").read_text().splitlines()
    assert tsv[0] == "step\taccuracy" and len(tsv) == 4


def test_metrics_are_the_exported_models_and_run_facts_are_apart(chain, data_root):
    paths, _, _ = chain
    metrics = json.loads(paths["metrics.json"].read_text())
    assert set(metrics) == {"accuracy", "loss", "params", "train_time_s", "epochs", "seed"} and metrics["seed"] == 0
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values())
    # scored here by the checkpoint's own forward pass on the whole split at once, not through evaluate's code
    model, ckpt = load_checkpoint(paths["m.pt"])
    images, labels = load_split(data_root / "fashion-mnist", "test")
    x = (torch.from_numpy(images).float()[:, None] / 255 - ckpt.info.mean) / ckpt.info.std
    with torch.inference_mode():
        logits = model(x)
    right = int((logits.argmax(1).numpy() == labels).sum())  # batches of another size may round a near-tie the other way
    assert abs(100 * right / 10000 - metrics["accuracy"]) <= 0.025
    assert abs(torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).item() - metrics["loss"]) <= 2e-4
    assert metrics["accuracy"] == Classifier(paths["a.onnx"]).info.test_accuracy
    assert metrics["epochs"] == 3 and metrics["params"] == sum(p.numel() for p in model.parameters())
    cm = np.array(json.loads(paths["classes.json"].read_text())["confusion_matrix"])
    assert cm.sum() == 10000 and abs(np.trace(cm) - right) <= 2
    facts = json.loads(paths["run.json"].read_text())
    assert facts["device"] == "cpu" and facts["threads"] >= 1 and facts["epochs"] == 3
    assert facts["precision"] == precision_label(amp_dtype("auto", torch.device("cpu")))
    predictions = paths["predictions.csv"].read_text().splitlines()
    assert predictions[0] == "actual,predicted" and len(predictions) == 10001


def test_card_and_figures(chain):
    paths, _, _ = chain
    info = Classifier(paths["a.onnx"]).info
    card = paths["a.md"].read_text()
    assert card.startswith("# `a`: simple_cnn on Fashion-MNIST") and f"Export id: `{info.export_id}`" in card
    assert f"Test accuracy: **{info.test_accuracy:.2f} %** on the 10,000 test images" in card
    assert "| T-shirt/top |" in card and "SHA-256 of `a.onnx`" in card
    for name in ("report.png", "mistakes.png"):
        with Image.open(paths[name]) as im:
            assert im.format == "PNG" and im.width > 1000 and im.height > 400


def test_evaluate_imports_no_torch(chain, tmp_path):
    """The stage runs on what `pip install .` gives plus matplotlib: torch is never imported."""
    _, _, args = chain
    args = {**args, **{k: tmp_path / args[k].name for k in ("--metrics", "--classes", "--predictions", "--plot",
                                                           "--mistakes", "--card")}}
    code = (f"import sys\nfrom pipeline.stages.evaluate import main\n"
            f"main({[str(a) for kv in args.items() for a in kv]!r}, standalone_mode=False)\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("False")


def test_a_model_without_mistakes_still_gets_its_figure(chain, data_root, tmp_path):
    paths, _, _ = chain
    info = Classifier(paths["a.onnx"]).info
    images, labels = load_split(data_root / "fashion-mnist", "test")
    # an empty grid that says so
    ev.plot_mistakes(info, [str(i) for i in range(10)], images, labels, np.eye(10)[labels], tmp_path / "none.png")
    assert (tmp_path / "none.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["none.png"]  # nothing left beside it
