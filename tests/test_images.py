
import numpy as np
import pytest
from PIL import ExifTags, Image

from digitlens import images
from digitlens.images import ImageError, prepare
from digitlens.metadata import GREY_ONLY, PREPROCESSING
from pipeline.datasets import load_split
from pipeline.drawings import SAVED_AS, draw
from tests.conftest import BAD_FILES

COUNT = 40  # test digits per variant


@pytest.fixture(scope="module")
def digits(data_root):
    return load_split(data_root / "mnist", "test")[0][:COUNT]


@pytest.fixture(scope="module")
def clothes(data_root):
    return load_split(data_root / "fashion-mnist", "test")[0][:COUNT]


def mean_abs_diff(a: np.ndarray, uint8: np.ndarray) -> float:
    return float(np.abs(a - uint8.astype(np.float32) / 255).mean())


@pytest.mark.parametrize("variant", list(SAVED_AS))
def test_digit_drawn_off_centre_comes_back_as_the_mnist_original(tmp_path, digits, variant):
    """Dark on light, enlarged, off-centre on 200x200, in each file format -> close to the 28x28 original."""
    suffix, write = SAVED_AS[variant]
    rng = np.random.default_rng(1)
    diffs, blank = [], []
    for i, digit in enumerate(digits):
        path = tmp_path / f"{i}{suffix}"
        write(draw(digit, rng), path)
        out = prepare(path, "digit")
        assert out.shape == (28, 28) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
        diffs.append(mean_abs_diff(out, digit))
        blank.append(float(np.abs(out).mean()))
    # The images differ from their originals by a fraction of what an empty image would
    assert np.mean(diffs) < 0.03 and max(diffs) < 0.1
    assert np.mean(diffs) < 0.25 * np.mean(blank)


def test_digit_recipe_centres_by_mass_and_fits_20_pixels(digits):
    out = images.digit(1 - np.kron(digits[0].astype(np.float32) / 255, np.ones((5, 5))))
    rows, cols = np.flatnonzero(out.max(1) > 0), np.flatnonzero(out.max(0) > 0)
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 <= 20
    ys, xs = np.indices(out.shape)
    assert abs((ys * out).sum() / out.sum() - 14) <= 0.5 and abs((xs * out).sum() / out.sum() - 14) <= 0.5


def test_light_on_dark_input_is_not_inverted(digits):
    enlarged = np.kron(digits[1].astype(np.float32) / 255, np.ones((4, 4)))
    np.testing.assert_allclose(images.digit(enlarged), images.digit(1 - enlarged), atol=1e-5)
    assert mean_abs_diff(images.digit(enlarged), digits[1]) < 0.05


def test_clothing_photo_on_white_comes_back_as_the_fashion_mnist_original(tmp_path, clothes):
    """Fashion-MNIST items were product photos on white, trimmed, longer side 28, centred, negated."""
    diffs = []
    for i, item in enumerate(clothes):
        rows, cols = np.flatnonzero(item.any(1)), np.flatnonzero(item.any(0))
        photo = Image.fromarray(255 - item[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
        scale = 150 / max(photo.size)
        photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.Resampling.BICUBIC)
        canvas = Image.new("RGB", (260, 200), "white")
        canvas.paste(photo.convert("RGB"), (12, 30))
        canvas.save(tmp_path / f"{i}.jpg", quality=90)
        diffs.append(mean_abs_diff(prepare(tmp_path / f"{i}.jpg", "fashion"), item))
    assert np.mean(diffs) < 0.04 and max(diffs) < 0.15


def test_light_ink_on_transparent_background_is_composited_onto_black(tmp_path, digits):
    ink = draw(digits[2], np.random.default_rng(0))
    rgba = np.dstack([np.full((*ink.shape, 3), 255, np.uint8), np.round(255 * ink).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "white-ink.png")
    assert mean_abs_diff(prepare(tmp_path / "white-ink.png", "digit"), digits[2]) < 0.05


def test_palette_with_transparency_and_16_bit_keep_their_range(tmp_path):
    values = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "16.png")
    with Image.open(tmp_path / "16.png") as img:
        assert img.mode.startswith("I")
        grey = images.to_grey(img)
    np.testing.assert_allclose(grey, values / 65535, atol=1e-6)
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    palette.putpixel((3, 3), 0)
    palette.info["transparency"] = 1  # white is transparent: black content on a transparent background
    grey = images.to_grey(palette)
    assert grey[3, 3] == 0 and (grey == 1).sum() == 63


def test_exif_orientation_is_applied(tmp_path):
    upright = np.zeros((40, 20), np.uint8)
    upright[:10] = 255  # a light band at the top
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored rotated; displayed after turning 90 degrees clockwise
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "r.jpg", exif=exif.tobytes())
    grey = images.to_grey(images.load(tmp_path / "r.jpg"))
    assert grey.shape == (40, 20) and grey[:10].mean() > 0.9 and grey[15:].mean() < 0.1


def test_large_photo_is_decoded_small_and_still_found(tmp_path, digits):
    canvas = np.full((2400, 3200), 255, np.uint8)
    big = Image.fromarray(255 - digits[3]).resize((1000, 1000), Image.Resampling.BICUBIC)
    page = Image.fromarray(canvas)
    page.paste(big, (1900, 300))
    page.save(tmp_path / "photo.jpg", quality=90)
    with Image.open(tmp_path / "photo.jpg") as img:
        img.draft(None, (images.WORK_SIDE, images.WORK_SIDE))
        assert max(img.size) < 3200
    assert mean_abs_diff(prepare(tmp_path / "photo.jpg", "digit"), digits[3]) < 0.05


def test_noisy_photo_crops_to_the_digit_not_the_paper(tmp_path, digits):
    rng = np.random.default_rng(0)
    ink = draw(digits[4], rng)
    paper = 0.8 * (1 - ink) + 0.1 + rng.normal(0, 0.03, ink.shape)  # grey paper, grey ink, sensor noise
    Image.fromarray(np.clip(paper * 255, 0, 255).astype(np.uint8)).save(tmp_path / "noisy.png")
    assert mean_abs_diff(prepare(tmp_path / "noisy.png", "digit"), digits[4]) < 0.05


def test_raw_keeps_28x28_pixels_and_refuses_other_sizes(tmp_path, digits):
    Image.fromarray(digits[0]).save(tmp_path / "raw.png")
    np.testing.assert_allclose(prepare(tmp_path / "raw.png", None), digits[0] / 255, atol=1e-6)
    Image.fromarray(digits[0]).resize((56, 56)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="56x56 pixels; raw input must be 28x28"):
        prepare(tmp_path / "big.png", None)


@pytest.mark.parametrize("name, recipe", [(name, recipe) for name in BAD_FILES for recipe in PREPROCESSING
                                          if recipe in GREY_ONLY or "no content" not in BAD_FILES[name][1]])
def test_bad_files_raise_image_error_with_reason(tmp_path, name, recipe):
    write, reason = BAD_FILES[name]
    write(tmp_path / name)
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match=reason):
        prepare(tmp_path / name, recipe)
    assert Image.MAX_IMAGE_PIXELS == limit and limit is not None


def test_plain_keeps_blank_images_and_colour_and_resizes_to_the_models_form(tmp_path):
    """`plain` (declared data sets) only converts and resizes: a blank image is an image of one colour."""
    Image.new("RGBA", (50, 20), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("RGB", (40, 40), (200, 30, 10)).save(tmp_path / "red.png")
    assert (prepare(tmp_path / "clear.png", "plain", 32, 3) == 1).all()  # transparent: white, as the data stage does
    red = prepare(tmp_path / "red.png", "plain", 16, 3)
    assert red.shape == (16, 16, 3) and np.allclose(red[0, 0], np.array([200, 30, 10]) / 255)
    assert prepare(tmp_path / "red.png", "plain", 16, 1).shape == (16, 16)
    with pytest.raises(ImageError, match="40x40 pixels; raw input must be 32x32"):
        prepare(tmp_path / "red.png", None, 32, 3)


def test_thin_line_is_content_and_a_lone_speck_is_not():
    page = np.ones((100, 100), np.float32)
    page[50, 10:90] = 0
    for recipe in (images.digit, images.fashion):
        out = recipe(page)
        assert out.shape == (28, 28) and out.max() > 0.5 and (out.max(0) > 0.1).sum() >= 20
    page[:] = 1
    page[20, 70] = 0
    with pytest.raises(ImageError, match="no content"):
        images.digit(page)
