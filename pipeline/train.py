"""Train stage: one architecture on one data set with its seed recipe, data kept on the device."""
from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.common import PipelineError, atomic_path, stage_command, write_text
from pipeline.data import DATASETS, dataset_info, load_split
from pipeline.models import MODELS, create_model
from pipeline.params import Params, Recipe, load_params

HISTORY_FIELDS = ["epoch", "train_loss", "test_loss", "test_accuracy", "lr", "seconds"]


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise PipelineError("params.yaml: device: 'cuda' asked for, but torch sees no CUDA device; use 'auto' or 'cpu'")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


def amp_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training on `device` (None = plain float32)."""
    if choice == "auto":
        native = (torch.cuda.is_bf16_supported() if device.type == "cuda" else
                  torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return torch.bfloat16 if native else None
    return torch.bfloat16 if choice == "bf16" else None


def precision_label(amp: torch.dtype | None) -> str:
    return "fp32" if amp is None else "bf16 autocast"


def to_inputs(images: np.ndarray, mean: float, std: float, device: torch.device) -> torch.Tensor:
    """uint8 (N, 28, 28) -> normalised float32 (N, 1, 28, 28) on `device`, in one go."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return ((x.float() / 255.0 - mean) / std).unsqueeze(1)


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum)
    return torch.optim.Adam(model.parameters(), lr=recipe.lr)


def random_hflip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the images of a batch (B, C, H, W) where `mask` (B,) is True."""
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def epoch_batches(n: int, batch_size: int, drop_last: bool, generator: torch.Generator,
                  device: torch.device | None = None) -> list[torch.Tensor]:
    """Index slices of one shuffled permutation, as the seeds' DataLoader(shuffle=True) yields them.
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


@torch.inference_mode()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def score(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in %)."""
    loss = F.cross_entropy(logits.float(), y).item()
    return loss, 100.0 * (logits.argmax(1) == y).float().mean().item()


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
            scheduler.step(last_loss)  # seed 001 steps on the epoch's last batch loss
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


def train(params: Params, dataset: str, arch: str, data_dir: str | Path, log=print) -> dict:
    """Train one model; returns its checkpoint (a dict that torch.load(weights_only=True) reads back)."""
    recipe = params.recipe(arch)
    device = pick_device(params.device)
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
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "precision": precision,
        "torch_version": str(torch.__version__),
    }


def save_checkpoint(ckpt: dict, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


@click.command(help="Train one architecture on one data set with the recipe in params.yaml.")
@click.option("--dataset", required=True, type=click.Choice(list(DATASETS)))
@click.option("--arch", required=True, type=click.Choice(list(MODELS)))
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder written by the data stage.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write (.pt).")
@click.option("--history", required=True, type=click.Path(dir_okay=False), help="Per-epoch CSV to write.")
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@stage_command
def main(dataset: str, arch: str, data_dir: str, out: str, history: str, params_file: str) -> None:
    params = load_params(params_file)
    ckpt = train(params, dataset, arch, data_dir)
    save_checkpoint(ckpt, out)
    write_text(history, history_csv(ckpt["history"]))


if __name__ == "__main__":
    main()
