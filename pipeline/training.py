"""The training loop: one architecture on one data set with its recipe, the whole split kept on the device."""
from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.datasets import dataset_info, load_split
from pipeline.models import create_model
from pipeline.params import Params, Recipe
from pipeline.tensors import amp_dtype, device_name, pick_device, precision_label, predict_logits, score, to_inputs

HISTORY_FIELDS = ["epoch", "train_loss", "test_loss", "test_accuracy", "lr", "seconds"]


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum)
    return torch.optim.Adam(model.parameters(), lr=recipe.lr)


def random_hflip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the images of a batch (B, C, H, W) where `mask` (B,) is True."""
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def epoch_batches(n: int, batch_size: int, drop_last: bool, generator: torch.Generator,
                  device: torch.device | None = None) -> list[torch.Tensor]:
    """Index slices of one shuffled permutation, as the reference recipes' DataLoader(shuffle=True) yields them.
    The permutation is drawn on the CPU (reproducible everywhere) and moved to `device` once."""
    perm = torch.randperm(n, generator=generator).to(device)
    stop = n - n % batch_size if drop_last else n
    return [perm[i:i + batch_size] for i in range(0, stop, batch_size)]


def train_epoch(model, optimizer, x, y, batches, flip=None, progress=None,
                amp: torch.dtype | None = None) -> tuple[float, float]:
    """One pass over `batches` (index tensors), the forward under autocast to `amp` when given;
    returns (mean loss, last batch's loss)."""
    model.train()
    total = torch.zeros((), device=x.device)
    count = 0
    for idx in batches:
        xb, yb = x[idx], y[idx]
        if flip is not None:
            xb = random_hflip(xb, flip[idx])
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(idx)
        count += len(idx)
        if progress is not None:
            progress.update()
    return (total / count).item(), loss.item()


def fit(model, recipe: Recipe, train_x, train_y, test_x, test_y, *, hflip: bool, seed: int,
        eval_batch_size: int, amp: torch.dtype | None = None, log=print) -> list[dict]:
    """Train `model` in place with `recipe`; returns the per-epoch history."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(model, recipe)
    scheduler = None
    if recipe.scheduler is not None:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **recipe.scheduler.model_dump())
    history = []
    for epoch in range(1, recipe.epochs + 1):
        start = time.perf_counter()
        batches = epoch_batches(len(train_x), recipe.batch_size, recipe.drop_last, generator, train_x.device)
        flip = (torch.rand(len(train_x), generator=generator) < 0.5).to(train_x.device) if hflip else None
        lr = optimizer.param_groups[0]["lr"]
        with tqdm(total=len(batches), desc=f"epoch {epoch}/{recipe.epochs}", unit="batch",
                  leave=False, disable=not sys.stderr.isatty()) as progress:
            train_loss, last_loss = train_epoch(model, optimizer, train_x, train_y, batches, flip, progress, amp)
        if scheduler is not None:
            scheduler.step(last_loss)  # as tutorial 001: on the epoch's last batch loss
        test_loss, test_acc = score(predict_logits(model, test_x, eval_batch_size), test_y)
        row = dict(epoch=epoch, train_loss=train_loss, test_loss=test_loss, test_accuracy=test_acc,
                   lr=lr, seconds=time.perf_counter() - start)
        history.append(row)
        log(f"epoch {epoch:>2}/{recipe.epochs}  train_loss {train_loss:.4f}  test_loss {test_loss:.4f}  "
            f"test_acc {test_acc:6.2f}%  lr {lr:.3g}  {row['seconds']:.1f}s")
    return history


def history_csv(history: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


def train(params: Params, dataset: str, arch: str, data_dir: str | Path, log=print,
          params_file: str = "params.yaml") -> dict:
    """Train one model; returns its checkpoint (a dict that torch.load(weights_only=True) reads back)."""
    recipe = params.recipe(arch)
    device = pick_device(params.device, params_file)
    if params.train.threads:
        torch.set_num_threads(params.train.threads)
    torch.manual_seed(params.seed)
    mean, std = params.normalization(dataset, arch)
    train_images, train_labels = load_split(data_dir, "train")
    test_images, test_labels = load_split(data_dir, "test")
    if params.data.train_limit is not None:
        train_images, train_labels = train_images[:params.data.train_limit], train_labels[:params.data.train_limit]
    train_x, test_x = (to_inputs(a, mean, std, device) for a in (train_images, test_images))
    train_y, test_y = (torch.from_numpy(a).to(device) for a in (train_labels, test_labels))
    classes = dataset_info(dataset).classes
    model = create_model(arch, num_classes=len(classes), **recipe.model_args).to(device)
    if params.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
        train_x, test_x = (t.contiguous(memory_format=torch.channels_last) for t in (train_x, test_x))
    amp = amp_dtype(params.train.amp, device)
    precision = precision_label(amp)
    log(f"training {arch} on {dataset} ({len(train_x)} images) on {device} ({precision}): {recipe.optimizer} "
        f"lr {recipe.lr} batch {recipe.batch_size} epochs {recipe.epochs}")
    start = time.perf_counter()
    history = fit(model, recipe, train_x, train_y, test_x, test_y, hflip=params.hflip(dataset, arch),
                  seed=params.seed, eval_batch_size=params.train.eval_batch_size, amp=amp, log=log)
    train_time = time.perf_counter() - start
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return {
        "arch": arch,
        "model_args": dict(recipe.model_args),
        "state_dict": state,
        "dataset": dataset,
        "class_names": classes,
        "normalization": {"mean": mean, "std": std},
        "preprocess": params.datasets[dataset].preprocess,
        "params": {"seed": params.seed, "device": params.device, "recipe": recipe.model_dump(),
                   "hflip": params.hflip(dataset, arch), "data": params.data.model_dump(),
                   "train": params.train.model_dump()},
        "history": history,
        "train_time_s": train_time,
        "device": device_name(device),
        "precision": precision,
        "torch_version": str(torch.__version__),
    }
