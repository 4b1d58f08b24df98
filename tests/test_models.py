import math

import pytest
import torch

from digitlens.metadata import ModelInfo
from pipeline.augment import random_affine
from pipeline.models import MODELS, ViewAveraged, create_model, inference_model, list_models


def test_registry_has_the_four_reference_architectures_and_the_tuned_one():
    assert list_models() == ["softmax", "mlp", "simple_cnn", "cnn", "tuned_cnn"]
    assert [name for name, cls in MODELS.items() if getattr(cls, "tuned", False)] == ["tuned_cnn"]


@pytest.mark.parametrize("hidden", [0, 256])
def test_tuned_cnn_heads(hidden):
    model = create_model("tuned_cnn", width=8, hidden=hidden, dropout=0.3).eval()
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    fc = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [f.in_features for f in fc] == ([32 * 7 * 7, hidden] if hidden else [32])


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("batch", [1, 7])
def test_forward_returns_logits_for_any_batch(name, batch):
    model = create_model(name).eval()
    out = model(torch.rand(batch, 1, 28, 28))
    assert out.shape == (batch, 10) and out.dtype == torch.float32
    # logits, not log-probabilities: the rows' logsumexp is not pinned at 0
    assert not torch.allclose(torch.logsumexp(out, 1), torch.zeros(batch), atol=1e-3)


@pytest.mark.parametrize("name", list_models())
def test_training_mode_batch_of_seven(name):
    model = create_model(name).train()
    out = model(torch.rand(7, 1, 28, 28))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown architecture 'resnet'; choose one of softmax, mlp, simple_cnn, cnn, tuned_cnn"):
        create_model("resnet")


def test_parameter_counts():
    counts = {name: sum(p.numel() for p in create_model(name).parameters()) for name in MODELS}
    assert counts["softmax"] == 784 * 10 + 10
    assert counts["mlp"] == 784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    assert counts["simple_cnn"] == (10 * 25 + 10) + (20 * 10 * 25 + 20) + (320 * 10 + 10)


def views_info(**views) -> ModelInfo:
    return ModelInfo("fashion-mnist", "cnn", [str(i) for i in range(10)], 0.2, 0.35, "fashion", **views)


def test_test_time_flips_average_each_image_with_its_mirror_image():
    torch.manual_seed(0)
    model = create_model("cnn").eval()
    x = torch.rand(4, 1, 28, 28)
    averaged = inference_model(model, views_info(test_flip=True)).eval()
    assert isinstance(averaged, ViewAveraged) and averaged.views == 2 and inference_model(model, views_info()) is model
    with torch.inference_mode():
        expected = (model(x) + model(torch.flip(x, dims=[3]))) / 2
        torch.testing.assert_close(averaged(x), expected)
        torch.testing.assert_close(averaged(torch.flip(x, dims=[3])), averaged(x))  # mirror images: one answer
    assert averaged.state_dict().keys() == {f"model.{k}" for k in model.state_dict()}  # the same weights, shared


def test_test_time_views_average_zoomed_and_rotated_images():
    torch.manual_seed(0)
    model = create_model("cnn").eval()
    x = torch.rand(4, 1, 28, 28)
    info = views_info(test_flip=True, test_zoom=0.05, test_rotate=5)
    averaged = inference_model(model, info).eval()
    assert averaged.views == info.forward_passes == 10  # (the image, 2 zooms, 2 rotations) x mirror images
    fill = -info.mean / info.std
    draws = torch.tensor([[0, 0, 0.95, 0, 0], [0, 0, 1.05, 0, 0], [math.radians(5), 0, 1, 0, 0],
                          [math.radians(-5), 0, 1, 0, 0]])
    views = [x, *(random_affine(x, d.expand(len(x), 5), fill) for d in draws)]
    views += [v.flip(-1) for v in views]
    with torch.inference_mode():
        torch.testing.assert_close(averaged(x), sum(model(v) for v in views) / 10)
    blank = torch.full((1, 1, 28, 28), fill)  # background only: the views bring in background, not black
    with torch.inference_mode():
        torch.testing.assert_close(averaged(blank), model(blank))
