"""The training loop: one architecture on one data set with its recipe, the whole split kept on the device."""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from digitlens.metadata import ModelInfo, input_spec
from digitlens.text import first_line
from pipeline.augment import Augmentation
from pipeline.common import PipelineError
from pipeline.datasets import read_facts, training_splits
from pipeline.distributed import ONE_PROCESS, Ranks, join, ranks, total
from pipeline.models import Checkpoint, RunFacts, create_model, inference_model
from pipeline.muon import FilterMuon
from pipeline.params import PARAMS_FILE, OneCycle, Params, Recipe
from pipeline.tensors import amp_dtype, device_name, full_fp32, pick_device, precision_label, predict_logits, score, to_inputs

# What each epoch's history row holds besides its "epoch": DVCLive's names, whose "/" make folders of its plots
# (reports/<dataset>/<arch>/train/plots/metrics/val/accuracy.tsv) and nested keys of its metrics.json. "val" is
# the validation split carved from the training images (data.val_fraction); the test set is not looked at here.
EPOCH_METRICS = ("train/loss", "val/loss", "val/accuracy", "lr", "epoch_time_s")


class Diverged(PipelineError):
    """Training whose loss stopped being a number (NaN or infinity)."""


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimiser; weight decay applies to the weights of convolutions and linear layers, not to
    biases or BatchNorm. `muon`: the convolution filters (4-D weights) in a last group of their own, at `filter_lr`."""
    muon = recipe.optimizer == "muon"
    params = [p for p in model.parameters() if not (muon and p.ndim == 4)]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": recipe.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}] if recipe.weight_decay else [
              {"params": params}]
    if muon:
        filters = [p for p in model.parameters() if p.ndim == 4]
        return FilterMuon([*groups, {"params": filters, "lr": recipe.filter_lr, "orthogonal": True}], lr=recipe.lr,
                          momentum=recipe.momentum, nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)
    fused = True if next(model.parameters()).is_cuda else None  # one kernel for all weights, not one each
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov, fused=fused)
    return torch.optim.Adam(groups, lr=recipe.lr, fused=fused)


NO_AUGMENTATION = Augmentation()


def augmentation(params: Params, dataset: str, arch: str, stats: tuple[float, float]) -> Augmentation:
    """What `arch`'s recipe does to the training images of `dataset` (less what would change their labels);
    `stats`: the data set's pixel (mean, std)."""
    mean, std = params.normalization(arch, stats)
    return Augmentation(hflip=params.hflip(dataset, arch), **params.augment(dataset, arch).model_dump(),
                        fill=-mean / std)


def batches_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def epoch_batches(n: int, batch_size: int, drop_last: bool, generator: torch.Generator,
                  device: torch.device | None = None) -> list[torch.Tensor]:
    """Index slices of one shuffled permutation, as the reference recipes' DataLoader(shuffle=True) yields them.
    The permutation is drawn on the CPU (reproducible everywhere) and moved to `device` once."""
    perm = torch.randperm(n, generator=generator).to(device)
    return [perm[i * batch_size:(i + 1) * batch_size] for i in range(batches_per_epoch(n, batch_size, drop_last))]


def train_epoch(model, optimizer, x, y, batches, augment: Augmentation | None = None, draws: torch.Tensor | None = None,
                progress=None, amp: torch.dtype | None = None, label_smoothing: float = 0.0,
                scheduler=None) -> tuple[float, float]:
    """One pass over `batches` (index tensors on x's device), each batch changed by `augment` with its rows of
    the epoch's `draws`, the forward under autocast to `amp` when given, `scheduler` stepped after every batch;
    returns (mean loss, last batch's loss): the only values that leave the device, once, at the end."""
    model.train()
    total = torch.zeros((), device=x.device)
    count = 0
    for idx in batches:
        xb, yb = x[idx], y[idx]
        if draws is not None:
            xb = augment(xb, draws[idx])
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(model(xb), yb, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.detach() * len(idx)
        count += len(idx)
        if progress is not None:
            progress.update()
    return (total / count).item(), loss.item()


def fit(model, recipe: Recipe, train_x, train_y, val_x, val_y, *, seed: int, eval_batch_size: int,
        amp: torch.dtype | None = None, augment: Augmentation = NO_AUGMENTATION, info: ModelInfo | None = None,
        log=print, on_epoch: Callable[[dict], None] | None = None, at: Ranks = ONE_PROCESS) -> list[dict]:
    """Train `model` in place with `recipe` and `augment` (what the data set allows of the recipe's
    augmentation), scoring the validation images after each epoch: the network alone, and after the last epoch as
    the model will classify (with the test-time views `info` names, if any); returns the per-epoch history, each
    row also given to `on_epoch` as soon as it is known. Under torchrun (`at`: this process's rank of `at.world`),
    every rank draws the same permutation and augmentation and trains on its share of each batch
    (DistributedDataParallel averages the gradients); rank 0 alone scores, logs and calls `on_epoch` (the other
    ranks return an empty history)."""
    generator = torch.Generator().manual_seed(seed)
    net = model if at.world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[train_x.device.index] if train_x.device.type == "cuda" else None)
    optimizer = make_optimizer(model, recipe)
    plateau = per_batch = None
    if isinstance(recipe.scheduler, OneCycle):
        steps = batches_per_epoch(len(train_x), recipe.batch_size, recipe.drop_last) * recipe.epochs
        # the warm-up must span 2 steps at least (fewer divide by zero in torch): a quick run on a few hundred
        # images gets the schedule's start only
        # each group's lr is its peak (muon's filters have their own)
        per_batch = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=max(steps, math.ceil(2 / recipe.scheduler.pct_start)),
            **recipe.scheduler.model_dump(exclude={"kind"}))
    elif recipe.scheduler is not None:
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **recipe.scheduler.model_dump())
    classifier = inference_model(model, info).to(train_x.device) if info is not None else model
    history = []
    for epoch in range(1, recipe.epochs + 1):
        start = time.perf_counter()
        batches = epoch_batches(len(train_x), recipe.batch_size, recipe.drop_last, generator, train_x.device)
        draws = augment.draw(len(train_x), generator, train_x.device)
        if at.world > 1:
            batches = [b[at.rank::at.world] for b in batches]  # this rank's share of every global batch
        lr = optimizer.param_groups[0]["lr"]
        with tqdm(total=len(batches), desc=f"epoch {epoch}/{recipe.epochs}", unit="batch",
                  leave=False, disable=not sys.stderr.isatty() or not at.main) as progress:
            train_loss, last_loss = train_epoch(net, optimizer, train_x, train_y, batches, augment, draws, progress,
                                                amp, recipe.label_smoothing, per_batch)
        if at.world > 1:  # every rank: the same mean loss, the same decisions
            images = sum(len(b) for b in batches)
            loss_sum, images, last_sum = total(train_loss * images, images, last_loss, at=at, device=train_x.device)
            train_loss, last_loss = loss_sum / images, last_sum / at.world
        if not math.isfinite(train_loss):  # one check an epoch: a per-batch one would wait for the device each step
            raise Diverged(f"epoch {epoch}: the training loss is {train_loss}")
        if plateau is not None:
            plateau.step(last_loss)  # as tutorial 001: on the epoch's last batch loss
        if not at.main:
            continue
        scored = classifier if epoch == recipe.epochs else model  # the views multiply the cost: once
        val_loss, val_acc = score(predict_logits(scored, val_x, eval_batch_size), val_y)
        seconds = time.perf_counter() - start
        row = {"epoch": epoch, **dict(zip(EPOCH_METRICS, (train_loss, val_loss, val_acc, lr, seconds)))}
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        log(f"epoch {epoch:>2}/{recipe.epochs}  train_loss {train_loss:.4f}  val_loss {val_loss:.4f}  "
            f"val_acc {val_acc:6.2f}%  lr {lr:.3g}  {seconds:.1f}s")
    return history


def train(params: Params, dataset: str, arch: str, data_dir: str | Path, log=print,
          params_file: str = PARAMS_FILE, on_epoch: Callable[[dict], None] | None = None,
          monitor: int | None = None) -> Checkpoint:
    """Train one model on the training images less the validation split; returns its checkpoint. `on_epoch` gets
    each epoch's history row as it ends. `monitor`: score only the first N validation images after each epoch
    (tests; the stage scores them all). Under torchrun, one of its processes (pipeline/distributed.py): only rank
    0's checkpoint has the history, and only rank 0 logs."""
    recipe = params.recipe(arch)
    at = ranks()
    device = join(pick_device(params.device, params_file), at)
    if not at.main:
        log = on_epoch = None
    log = log or (lambda msg: None)
    torch.manual_seed(params.seed)
    facts = read_facts(data_dir)
    mean, std = params.normalization(arch, facts.stats)
    (train_images, train_labels), val = training_splits(data_dir, params.data.val_fraction)
    val_images, val_labels = (a[:monitor] for a in val)
    if params.data.train_limit is not None:
        train_images, train_labels = train_images[:params.data.train_limit], train_labels[:params.data.train_limit]
    train_x, val_x = (to_inputs(a, mean, std, device) for a in (train_images, val_images))
    train_y, val_y = (torch.from_numpy(a).to(device) for a in (train_labels, val_labels))
    if recipe.drop_last and len(train_x) < recipe.batch_size:
        raise PipelineError(f"{dataset}: {len(train_x)} training images, fewer than recipes.{arch}.batch_size "
                            f"({recipe.batch_size}), whose incomplete batches are dropped: nothing would train")
    model = create_model(arch, num_classes=len(facts.classes), channels=facts.channels, size=facts.size,
                         **recipe.model_args).to(device)
    if at.world > 1 and device.type == "cuda":  # batch statistics over the global batch (on the CPU: each share's)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if params.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
        train_x, val_x = (t.contiguous(memory_format=torch.channels_last) for t in (train_x, val_x))
    amp = amp_dtype(params.train.amp, device)
    if device.type == "cuda":
        full_fp32()  # what autocast leaves in float32 stays float32, and the label says so
    precision = precision_label(amp)
    threads = torch.get_num_threads() if device.type == "cpu" else None
    log(f"training {arch} on {dataset} ({len(train_x)} images, {len(val_x)} for validation) on {device} ({precision}"
        f"{f', {threads} threads' if threads else ''}{f', {at.world} processes' if at.world > 1 else ''}): "
        f"{recipe.optimizer} lr {recipe.lr} batch {recipe.batch_size} epochs {recipe.epochs}")
    preprocess = params.datasets[dataset].preprocess
    info = ModelInfo(dataset=dataset, architecture=arch, class_names=list(facts.classes), mean=mean, std=std,
                     preprocess=preprocess, model_args=dict(recipe.model_args),
                     input=input_spec(facts.channels, facts.size, preprocess), **params.test_views(dataset, arch),
                     params={"seed": params.seed, "device": params.device, "recipe": recipe.model_dump(),
                             "hflip": params.hflip(dataset, arch), "augment": params.augment(dataset, arch).model_dump(),
                             "data": params.data.model_dump(), "train": params.train.model_dump()})
    start = time.perf_counter()
    try:
        history = fit(model, recipe, train_x, train_y, val_x, val_y, seed=params.seed,
                      eval_batch_size=params.eval_batch(device.type), amp=amp,
                      augment=augmentation(params, dataset, arch, facts.stats), info=info, log=log,
                      on_epoch=on_epoch, at=at)
    except Diverged as e:
        raise PipelineError(f"{arch} on {dataset} diverged, {e}: lower recipes.{arch}.lr ({recipe.lr:g}), or check "
                            f"the data's pixel mean/std ({mean:g}/{std:g}, data/{dataset}/dataset.json); nothing written"
                            ) from None
    except RuntimeError as e:  # a collective that lost, or waited in vain for, another process
        if at.world == 1:
            raise
        raise PipelineError(f"process {at.rank} of {at.world}: another process failed or stopped "
                            f"({first_line(e)}); nothing written") from None
    train_time = time.perf_counter() - start
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    parameters = sum(p.numel() for p in model.parameters())
    return Checkpoint(info, state, history, RunFacts(train_time, len(history), parameters, device_name(device), precision,
                                                     threads, str(torch.__version__), at.world))
