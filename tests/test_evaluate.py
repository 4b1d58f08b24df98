"""The evaluate stage's figures: numeric metrics, run facts apart, the most confident mistakes."""
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import reports as ev
from pipeline import training as tr
from pipeline.datasets import load_split
from pipeline.models import load_checkpoint, save_checkpoint
from pipeline.tensors import amp_dtype, precision_label
from tests.conftest import quick_params


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


@pytest.fixture(scope="module")
def quick_model(params, data_root, tmp_path_factory):
    path = tmp_path_factory.mktemp("evaluate") / "m.pt"
    save_checkpoint(tr.train(quick_params(params, train_limit=500), "fashion-mnist", "simple_cnn",
                             data_root / "fashion-mnist", log=lambda m: None), path)
    return load_checkpoint(path)


def test_metrics_are_numbers_and_run_facts_are_apart(quick_model, data_root):
    model, ckpt = quick_model
    images, labels = load_split(data_root / "fashion-mnist", "test")
    metrics, per_class, probs = ev.evaluate(model, ckpt, images, labels, 1000)
    assert metrics and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values())
    assert probs.shape == (10000, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
    # scored here, by the model's own forward pass on the whole split at once, not through evaluate's code
    x = (torch.from_numpy(images).float()[:, None] / 255 - ckpt.info.mean) / ckpt.info.std
    with torch.inference_mode():
        predicted = model(x).argmax(1).numpy()
    right = int((predicted == labels).sum())  # batches of another size may round a near-tie the other way
    assert abs(100 * right / 10000 - metrics["accuracy"]) <= 0.025
    cm = np.array(per_class["confusion_matrix"])
    assert cm.sum() == 10000 and abs(np.trace(cm) - right) <= 2
    facts = ev.run_facts(ckpt)
    assert facts["device"] == "cpu" and facts["threads"] >= 1
    assert facts["precision"] == precision_label(amp_dtype("auto", torch.device("cpu")))


def test_mistakes_figure(quick_model, data_root, tmp_path):
    model, ckpt = quick_model
    images, labels = load_split(data_root / "fashion-mnist", "test")
    _, _, probs = ev.evaluate(model, ckpt, images, labels, 1000)
    ev.plot_mistakes(ckpt, images, labels, probs, tmp_path / "mistakes.png")
    with Image.open(tmp_path / "mistakes.png") as im:
        assert im.format == "PNG" and im.width > 1000 and im.height > 700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mistakes.png"]  # nothing left beside it
    # a model without mistakes still gets its figure (an empty grid that says so)
    perfect = np.eye(10)[labels]
    ev.plot_mistakes(ckpt, images, labels, perfect, tmp_path / "none.png")
    assert (tmp_path / "none.png").read_bytes()[:4] == b"\x89PNG"
