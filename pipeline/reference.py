"""The reference recipes' own training loop: torchvision's data set classes, per-sample transforms and a
DataLoader, as the tutorials wrote it. The pipeline's loop is checked against it (tests) and timed against it
(benchmarks/speed.py)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision import transforms

from pipeline.datasets import dataset_info
from pipeline.params import Params


def reference_dataset(dataset: str, data_dir: str | Path, train: bool, transform) -> torch.utils.data.Dataset:
    """torchvision's own MNIST / FashionMNIST class, reading the IDX files the data stage wrote."""
    import torchvision

    tv = getattr(torchvision.datasets, dataset_info(dataset).torchvision_class)
    local = type(f"Local{tv.__name__}", (tv,), {"raw_folder": property(lambda self: str(data_dir))})
    return local(root=str(data_dir), train=train, transform=transform, download=False)


def reference_transform(params: Params, dataset: str, arch: str, stats: tuple[float, float]) -> transforms.Compose:
    """ToTensor (+ Normalize with the data set's pixel `stats`) (+ RandomHorizontalFlip), per sample, as the
    reference recipes' scripts do."""
    steps = [transforms.ToTensor()]
    if params.recipes[arch].normalize:
        steps.append(transforms.Normalize(*([v] for v in params.normalization(arch, stats))))
    if params.hflip(dataset, arch):
        steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose(steps)


def reference_train_steps(model, optimizer, loader, device, steps: int | None = None) -> list[float]:
    """The reference recipes' inner loop: a DataLoader batch at a time, moved to the device; returns each loss."""
    model.train()
    losses = []
    for i, (x, y) in enumerate(loader):
        if steps is not None and i == steps:
            break
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
