"""A small colour data set to try the pipeline's own-data path on (docs/datasets.md): shapes drawn in one of a few
colours on random backgrounds, a folder per colour, as PNG files of mixed sizes and modes (RGB, RGBA, palette).

    python -m benchmarks.shapes data-raw/shapes                 # train/<colour>/*.png and test/<colour>/*.png
    python -m benchmarks.shapes data-raw/shapes --one-folder    # <colour>/*.png: the data stage splits off a test set
"""
from __future__ import annotations

from pathlib import Path

import click
import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"blue": (40, 70, 210), "green": (40, 170, 60), "red": (215, 45, 40)}  # class -> its RGB
SIDES = (32, 40, 48)  # the files' sizes: the data stage brings them to the declared size


def shape_image(rng: np.random.Generator, rgb: tuple[int, int, int], side: int) -> Image.Image:
    """A circle, square or triangle in (a jittered) `rgb`, of random size and place, on a random grey background."""
    grey = int(rng.integers(70, 230))
    img = Image.new("RGB", (side, side), tuple(int(np.clip(grey + rng.integers(-15, 16), 0, 255)) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in rgb)
    size = int(rng.integers(side // 3, side * 3 // 4))
    x, y = (int(v) for v in rng.integers(0, side - size, 2))
    kind = rng.integers(3)
    if kind == 0:
        draw.ellipse((x, y, x + size, y + size), fill=colour)
    elif kind == 1:
        draw.rectangle((x, y, x + size, y + size), fill=colour)
    else:
        draw.polygon([(x + size // 2, y), (x, y + size), (x + size, y + size)], fill=colour)
    return img


def save(img: Image.Image, path: Path, i: int) -> None:
    """Every fifth file with an alpha channel, every seventh as a palette image: the data stage converts them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if i % 5 == 0:
        img = img.convert("RGBA")
    elif i % 7 == 0:
        img = img.convert("P", palette=Image.Palette.ADAPTIVE)
    img.save(path)


def write_shapes(root: str | Path, train: int = 200, test: int = 50, seed: int = 0, one_folder: bool = False) -> None:
    """`train` and `test` images per colour under `root` (train/ and test/, or all in one folder per colour)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("test", test)):
        for name, rgb in COLOURS.items():
            for i in range(count):
                folder = Path(root) / ("" if one_folder else split) / name
                save(shape_image(rng, rgb, int(rng.choice(SIDES))), folder / f"{split}-{i:04d}.png", i)


@click.command(help="Write a small colour data set of drawn shapes, a folder per colour (blue, green, red), to try "
                    "`dvc repro` on your own data (docs/datasets.md).")
@click.argument("root", type=click.Path(file_okay=False))
@click.option("--train", default=200, show_default=True, type=click.IntRange(1), help="Training images per colour.")
@click.option("--test", default=50, show_default=True, type=click.IntRange(1), help="Test images per colour.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--one-folder", is_flag=True, help="One folder per colour, no train/ and test/.")
def main(root: str, train: int, test: int, seed: int, one_folder: bool) -> None:
    if Path(root).exists() and any(Path(root).iterdir()):
        raise click.UsageError(f"{root}: not empty; give a new folder")
    write_shapes(root, train, test, seed, one_folder)
    click.echo(f"wrote {len(COLOURS) * (train + test)} images to {root}", err=True)


if __name__ == "__main__":
    main()
