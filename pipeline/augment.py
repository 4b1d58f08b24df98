"""Batched data augmentation on the device: random affine warps, horizontal flips and random erasing.

Every random number is drawn on the CPU from the training loop's generator (the same on every device) and
moved to the batch's device once; the batch itself never leaves the device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def random_hflip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the images of a batch (B, C, H, W) where `mask` (B,) is True."""
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def random_affine(x: torch.Tensor, generator: torch.Generator, *, rotate: float = 0.0, shear: float = 0.0,
                  scale: float = 0.0, translate: float = 0.0, fill: float = 0.0) -> torch.Tensor:
    """Warp each image of a batch (B, C, H, W) by its own random rotation in [-rotate, rotate] degrees,
    horizontal shear in [-shear, shear] degrees, scale in [1 - scale, 1 + scale] and shift in
    [-translate, translate] pixels along each axis; pixels from outside the image take the value `fill`
    (the background: 0 in [0, 1] pixels, -mean/std once standardised)."""
    n, _, h, w = x.shape
    angle = torch.deg2rad(uniform(n, -rotate, rotate, generator))
    skew = torch.tan(torch.deg2rad(uniform(n, -shear, shear, generator)))
    zoom = uniform(n, 1 - scale, 1 + scale, generator)
    # grid_sample maps each output position to the input position it reads: the inverse warp, so divide by zoom
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([
        torch.stack([cos, cos * skew - sin, uniform(n, -translate, translate, generator) * 2 / w], 1),
        torch.stack([sin, sin * skew + cos, uniform(n, -translate, translate, generator) * 2 / h], 1),
    ], 1).to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def random_erasing(x: torch.Tensor, generator: torch.Generator, *, p: float, area: tuple[float, float] = (0.02, 0.25),
                   ratio: tuple[float, float] = (0.3, 3.3), value: float = 0.0) -> torch.Tensor:
    """Random erasing (Zhong et al. 2017, as torchvision's RandomErasing): with probability `p` per image,
    set one rectangle of `area` of the image and aspect ratio in `ratio` (log-uniform) to `value`."""
    n, _, h, w = x.shape
    erase = torch.rand(n, generator=generator) < p
    size = uniform(n, *area, generator) * h * w
    aspect = torch.exp(uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator))
    eh = torch.sqrt(size * aspect).round().clamp(1, h)
    ew = torch.sqrt(size / aspect).round().clamp(1, w)
    top = (torch.rand(n, generator=generator) * (h - eh + 1)).floor()
    left = (torch.rand(n, generator=generator) * (w - ew + 1)).floor()
    rows, cols = torch.arange(h)[None, :], torch.arange(w)[None, :]
    inside_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None]) & erase[:, None]  # (B, H)
    inside_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])  # (B, W)
    mask = (inside_rows[:, :, None] & inside_cols[:, None, :])[:, None].to(x.device)  # (B, 1, H, W)
    return x.masked_fill(mask, value)
