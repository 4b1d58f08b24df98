"""Digits in other hands (pipeline/drawings.py): each style does what its name says."""
import numpy as np
import pytest

from pipeline import drawings as hw
from pipeline.datasets import load_split
from pipeline.drawings import enlarge


@pytest.fixture(scope="module")
def big(data_root):
    images, _ = load_split(data_root / "mnist", "test")
    return enlarge(images[0], np.random.default_rng(0))  # a 7, about 100-140 pixels tall


def ink_columns(a: np.ndarray) -> np.ndarray:
    return np.flatnonzero(a.max(0) > 0.5)


def test_stroke_width_changes_the_ink_not_the_shape(big):
    thick, thin = hw.stroke(big, 1.0), hw.stroke(big, -1.0)
    assert thick.sum() > 1.3 * big.sum() and thin.sum() < 0.8 * big.sum()
    assert thick.shape[0] > big.shape[0]  # room for the wider strokes
    assert (thick > 0.5).sum() > (big > 0.5).sum() > (thin > 0.5).sum() > 0


def test_rotation_slant_and_proportions(big):
    h, w = big.shape
    assert hw.rotate(big, 15).shape[1] > w and hw.rotate(big, -15).shape[0] > h
    right, left = hw.slant(big, 20), hw.slant(big, -20)
    assert right.shape == left.shape and right.shape[1] > w
    top, bottom = slice(0, h // 4), slice(3 * h // 4, h)
    # leaning right: the top half's ink sits further right than the bottom's, relative to the original
    shift = lambda a: ink_columns(a[top]).mean() - ink_columns(a[bottom]).mean()  # noqa: E731
    assert shift(right) > shift(big) + 10 > shift(left) + 20
    assert hw.stretch(big, 0.7).shape == (h, round(0.7 * w)) and hw.stretch(big, 1.4).shape == (h, round(1.4 * w))
