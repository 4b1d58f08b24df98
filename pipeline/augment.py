"""Batched data augmentation on the device: random horizontal flips, affine warps and random erasing.

Each epoch's random values are drawn at once, for every training image, on the CPU from the training loop's
generator (the same numbers on every device), and moved to the device in one copy. Each batch takes its rows
by index and builds its matrices and masks on the device: no batch waits for the host.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

AFFINE_COLUMNS = 5  # angle (radians), shear (tan), zoom, shift x, shift y (pixels)
ERASE_COLUMNS = 5  # erase?, area fraction, log aspect ratio, top and left (uniform in [0, 1))


def uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def random_hflip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the images of a batch (B, C, H, W) where `mask` (B,) is True."""
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def affine_draws(n: int, generator: torch.Generator, *, rotate: float = 0.0, shear: float = 0.0, scale: float = 0.0,
                 translate: float = 0.0) -> torch.Tensor:
    """(n, AFFINE_COLUMNS): per image a rotation in [-rotate, rotate] degrees, a horizontal shear in [-shear, shear]
    degrees, a zoom in [1 - scale, 1 + scale] and a shift in [-translate, translate] pixels along each axis."""
    return torch.stack([torch.deg2rad(uniform(n, -rotate, rotate, generator)),
                        torch.tan(torch.deg2rad(uniform(n, -shear, shear, generator))),
                        uniform(n, 1 - scale, 1 + scale, generator),
                        uniform(n, -translate, translate, generator),
                        uniform(n, -translate, translate, generator)], 1)


def affine_grid(draws: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """The sampling grid (B, H, W, 2) that warps images of `shape` (B, C, H, W) by their rows of `draws`
    (B, AFFINE_COLUMNS): grid_sample maps each output position to the input position it reads, the inverse warp."""
    _, _, h, w = shape
    angle, skew, zoom, dx, dy = draws.unbind(1)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # the inverse warp: divide by zoom
    theta = torch.stack([torch.stack([cos, cos * skew - sin, dx * 2 / w], 1),
                         torch.stack([sin, sin * skew + cos, dy * 2 / h], 1)], 1)  # (B, 2, 3)
    return F.affine_grid(theta, shape, align_corners=False)


def warp(x: torch.Tensor, grid: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """A batch (B, C, H, W) resampled at `grid` (B, H, W, 2), bilinear; pixels from outside the image take the
    value `fill` (the background: -mean/std once standardised)."""
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def random_affine(x: torch.Tensor, draws: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Warp each image of a batch (B, C, H, W) by its row of `draws` (B, AFFINE_COLUMNS), on x's device."""
    return warp(x, affine_grid(draws.to(x.dtype), list(x.shape)), fill)


def erasing_draws(n: int, generator: torch.Generator, *, p: float, area: tuple[float, float] = (0.02, 0.25),
                  ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """(n, ERASE_COLUMNS): per image whether to erase (probability `p`), the rectangle's share of the image in
    `area`, its aspect ratio in `ratio` (log-uniform), and where it goes (uniforms scaled on the device)."""
    return torch.stack([(torch.rand(n, generator=generator) < p).float(), uniform(n, *area, generator),
                        uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator),
                        torch.rand(n, generator=generator), torch.rand(n, generator=generator)], 1)


def random_erasing(x: torch.Tensor, draws: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    """Random erasing (Zhong et al. 2017, as torchvision's RandomErasing): each image of a batch (B, C, H, W)
    whose row of `draws` (B, ERASE_COLUMNS) says so gets one rectangle set to `value`, built on x's device."""
    _, _, h, w = x.shape
    erase, share, log_aspect, top_u, left_u = draws.unbind(1)
    size, aspect = share * (h * w), torch.exp(log_aspect)
    eh = torch.sqrt(size * aspect).round().clamp(1, h)
    ew = torch.sqrt(size / aspect).round().clamp(1, w)
    top, left = (top_u * (h - eh + 1)).floor(), (left_u * (w - ew + 1)).floor()
    rows = torch.arange(h, device=x.device)[None, :]
    cols = torch.arange(w, device=x.device)[None, :]
    inside_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None]) & (erase[:, None] > 0)  # (B, H)
    inside_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])  # (B, W)
    return x.masked_fill((inside_rows[:, :, None] & inside_cols[:, None, :])[:, None], value)  # mask (B, 1, H, W)


@dataclass(frozen=True)
class Augmentation:
    """What a recipe does to its training images on one data set: flips, an affine warp, erasing."""

    hflip: bool = False
    rotate: float = 0.0
    shear: float = 0.0
    scale: float = 0.0
    translate: float = 0.0
    erase: float = 0.0  # probability
    fill: float = 0.0  # the background's input value, for pixels a warp brings in

    @property
    def warps(self) -> bool:
        return any((self.rotate, self.shear, self.scale, self.translate))

    def draw(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor | None:
        """One epoch's random values for `n` images, (n, columns) on `device` in one copy; None when it does
        nothing."""
        parts = []
        if self.hflip:
            parts.append((torch.rand(n, generator=generator) < 0.5).float()[:, None])
        if self.warps:
            parts.append(affine_draws(n, generator, rotate=self.rotate, shear=self.shear, scale=self.scale,
                                      translate=self.translate))
        if self.erase:
            parts.append(erasing_draws(n, generator, p=self.erase))
        return torch.cat(parts, 1).to(device) if parts else None

    def __call__(self, x: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """The batch `x` changed by its rows of an epoch's `draws`."""
        column = 0
        if self.hflip:
            x = random_hflip(x, draws[:, 0] > 0)
            column = 1
        if self.warps:
            x = random_affine(x, draws[:, column:column + AFFINE_COLUMNS], self.fill)
            column += AFFINE_COLUMNS
        if self.erase:
            x = random_erasing(x, draws[:, column:column + ERASE_COLUMNS])
        return x
