"""Batched augmentation: what each change does to a batch, drawn reproducibly from the loop's generator, each
epoch's values in one go."""
import pytest
import torch

from pipeline.augment import Augmentation, affine_draws, erasing_draws, random_affine, random_erasing, random_hflip


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def blob(n: int = 8) -> torch.Tensor:
    """n copies of a bright 6x6 square off the centre of a 28x28 black image."""
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 6:12, 8:14] = 1.0
    return x


def test_random_hflip_flips_only_masked_images():
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 3)
    out = random_hflip(x, torch.tensor([True, False]))
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])


def test_affine_without_change_is_the_identity():
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(random_affine(x, affine_draws(len(x), gen())), x, atol=1e-5, rtol=0)


def test_affine_gives_each_image_its_own_warp_reproducibly():
    x = blob()
    draw = lambda: affine_draws(len(x), gen(1), rotate=15, shear=10, scale=0.1, translate=2)  # noqa: E731
    out = random_affine(x, draw())
    assert not torch.allclose(out, x)
    assert len({round(float(img.sum()), 3) for img in out}) == len(out)  # every image differently warped
    torch.testing.assert_close(out, random_affine(x, draw()))


@pytest.mark.parametrize("fill", [0.0, -0.4242])
def test_affine_fills_uncovered_pixels_with_the_background(fill):
    x = torch.full((6, 1, 28, 28), fill)
    torch.testing.assert_close(random_affine(x, affine_draws(6, gen(), rotate=30, scale=0.3, translate=5), fill), x)


def test_shift_moves_content_by_at_most_translate_pixels():
    out = random_affine(blob(64), affine_draws(64, gen(2), translate=2))
    rows = torch.arange(28.0)[:, None]
    centre_row = (out[:, 0] * rows).sum((1, 2)) / out[:, 0].sum((1, 2))
    assert (centre_row - 8.5).abs().max() <= 2.0 + 1e-4 and (centre_row - 8.5).abs().max() > 0.5


def test_rotation_keeps_a_centred_image_centred_and_turns_it():
    x = torch.zeros(16, 1, 28, 28)
    x[:, :, 4:24, 13:15] = 1.0  # a vertical bar through the centre
    out = random_affine(x, affine_draws(16, gen(3), rotate=15))
    cols = torch.arange(28.0)
    centre_col = (out[:, 0] * cols).sum((1, 2)) / out[:, 0].sum((1, 2))
    torch.testing.assert_close(centre_col, torch.full((16,), 13.5), atol=0.05, rtol=0)
    assert (out[:, 0, 4, :].argmax(1) != out[:, 0, 23, :].argmax(1)).any()  # the bar now leans


def test_erasing_with_p_zero_changes_nothing():
    x = torch.rand(5, 1, 28, 28)
    assert torch.equal(random_erasing(x, erasing_draws(5, gen(), p=0.0)), x)


def test_erasing_sets_one_rectangle_per_image_of_the_stated_area():
    x = torch.rand(200, 1, 28, 28) + 1.0  # never 0, the erasing value
    out = random_erasing(x, erasing_draws(200, gen(4), p=1.0), value=0.0)
    for img in out[:, 0]:
        erased = img == 0
        rows, cols = erased.any(1).nonzero().flatten(), erased.any(0).nonzero().flatten()
        h, w = len(rows), len(cols)
        assert erased.sum() == h * w  # one solid rectangle
        assert rows.max() - rows.min() + 1 == h and cols.max() - cols.min() + 1 == w
        assert 0.02 * 784 * 0.5 <= h * w <= 0.25 * 784 * 1.5  # the area range, give or take the rounding
    kept = random_erasing(x, erasing_draws(200, gen(5), p=0.5))
    untouched = (kept == x).flatten(1).all(1).float().mean()
    assert 0.3 < untouched < 0.7


def test_an_epoch_is_drawn_once_and_batches_take_their_rows():
    """One (n, columns) tensor per epoch; a batch's result depends only on its own rows of it."""
    augment = Augmentation(hflip=True, rotate=10, shear=10, scale=0.1, translate=2, erase=0.5, fill=-0.4)
    draws = augment.draw(100, gen(6), torch.device("cpu"))
    assert draws.shape == (100, 11) and draws.dtype == torch.float32
    x = torch.rand(100, 1, 28, 28)
    whole = augment(x, draws)
    idx = torch.tensor([7, 3, 42])
    torch.testing.assert_close(augment(x[idx], draws[idx]), whole[idx])
    assert Augmentation().draw(100, gen(), torch.device("cpu")) is None


def test_training_copies_nothing_to_the_device_per_batch(monkeypatch):
    """The epoch's draws and indices are on the device already: no batch calls .to() (on CUDA, each would wait
    for the queued work)."""
    from pipeline import training as tr
    from pipeline.models import create_model
    from pipeline.params import Recipe

    recipe = Recipe(optimizer="sgd", lr=0.01, batch_size=10, epochs=1)
    model = create_model("simple_cnn")
    augment = Augmentation(hflip=True, rotate=10, erase=0.5)
    x, y = torch.rand(50, 1, 28, 28), torch.randint(0, 10, (50,))
    batches = tr.epoch_batches(50, 10, False, gen())
    draws = augment.draw(50, gen(), torch.device("cpu"))
    calls = []
    real_to = torch.Tensor.to
    moves = lambda a, k: "device" in k or any(isinstance(v, (torch.device, str)) for v in a)  # noqa: E731 - not dtypes
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: (calls.append(a) if moves(a, k) else None)
                        or real_to(self, *a, **k))
    tr.train_epoch(model, tr.make_optimizer(model, recipe), x, y, batches, augment, draws)
    assert calls == []
    x.to("cpu")  # and the counting itself works
    assert calls == [("cpu",)]
