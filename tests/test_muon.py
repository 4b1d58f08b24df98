"""The tuned recipe's optimiser (pipeline/muon.py): SGD where torch's SGD would be, orthogonalised updates of
normalised filters where Muon is asked for."""
import pytest
import torch
from torch import nn

from pipeline import training as tr
from pipeline.models import create_model
from pipeline.muon import FilterMuon, orthogonalize
from pipeline.params import Recipe


@pytest.mark.parametrize("shape", [(48, 432), (432, 48), (96, 96), (10, 9)])
def test_orthogonalize_moves_every_singular_value_near_one(shape):
    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=generator))
    v, _ = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=generator))
    g = u @ torch.diag(torch.logspace(-1, 1, min(shape))) @ v.T  # singular values over two decades
    o = orthogonalize(g)
    assert o.shape == g.shape and o.dtype == g.dtype
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.6 and s.max() < 1.25, s  # Muon's "about [0.7, 1.2]"
    # the same directions: U V^T, up to that spread
    assert torch.nn.functional.cosine_similarity((u @ v.T).flatten(), o.flatten(), dim=0) > 0.95


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5))


def steps(model, optimizer, n=3):
    x, y = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 5
    for _ in range(n):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("nesterov", [True, False])
def test_plain_groups_step_as_torch_sgd(nesterov):
    ours, theirs = small_net(), small_net()
    settings = dict(lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
    steps(ours, FilterMuon(ours.parameters(), **settings))
    steps(theirs, torch.optim.SGD(theirs.parameters(), **settings))
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b)


def test_filters_take_orthogonalised_steps_at_a_fixed_norm():
    model = small_net()
    conv = model[0].weight
    start = conv.detach().clone()
    optimizer = FilterMuon([{"params": [conv], "lr": 0.05, "orthogonal": True}], lr=0.1, momentum=0.9,
                           nesterov=True, weight_decay=0.5)
    steps(model, optimizer, n=1)
    # the first step: the momentum buffer is the gradient, Nesterov's update g + 0.9 g; no weight decay
    g = conv.grad.reshape(4, -1)
    expected = start * (4 ** 0.5 / start.norm()) - 0.05 * orthogonalize(1.9 * g).view_as(conv)
    torch.testing.assert_close(conv.detach(), expected)
    steps(model, optimizer, n=5)
    assert conv.norm().item() == pytest.approx(2.0, rel=0.05)  # sqrt(4 channels), give or take the last step


def test_muon_recipe_puts_the_filters_alone_at_their_learning_rate():
    recipe = Recipe(optimizer="muon", lr=0.2, filter_lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4,
                    batch_size=10, epochs=1)
    model = create_model("tuned_cnn", width=8, hidden=16)
    optimizer = tr.make_optimizer(model, recipe)
    *plain, filters = optimizer.param_groups
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert filters["orthogonal"] and filters["lr"] == 0.02 and {id(p) for p in filters["params"]} == set(map(id, convs))
    assert [(g["lr"], g["weight_decay"], g["orthogonal"]) for g in plain] == [(0.2, 5e-4, False), (0.2, 0.0, False)]
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(map(id, model.parameters()))  # each parameter in one group
    # the one-cycle schedule peaks at each group's own rate
    steps_total = 8
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                   total_steps=steps_total, pct_start=0.25)
    peaks = [0.0] * 3
    for _ in range(steps_total - 1):
        optimizer.step()
        schedule.step()
        peaks = [max(p, g["lr"]) for p, g in zip(peaks, optimizer.param_groups)]
    assert peaks == pytest.approx([0.2, 0.2, 0.02])
