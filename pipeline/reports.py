"""What the evaluate stage writes: test-set metrics, per-class figures, predictions, the report and mistakes plots."""
from __future__ import annotations

import csv
import io
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from pipeline.common import atomic_path
from pipeline.datasets import dataset_info
from pipeline.models import Checkpoint
from pipeline.tensors import predict_logits, score, to_inputs


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (true class, predicted class)."""
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def evaluate(model: torch.nn.Module, ckpt: Checkpoint, images: np.ndarray, labels: np.ndarray,
             batch_size: int) -> tuple[dict, dict, np.ndarray]:
    """(metrics, per-class figures with the confusion matrix, class probabilities (N, C)) on a labelled split.
    The metrics are numbers only, so that `dvc metrics diff` and `dvc exp show` can compare them."""
    x = to_inputs(images, ckpt.info.mean, ckpt.info.std, torch.device("cpu"))
    y = torch.from_numpy(labels)
    logits = predict_logits(model, x, batch_size)
    loss, acc = score(logits, y)
    probs = torch.softmax(logits, 1).numpy()
    pred = probs.argmax(1)
    classes = ckpt.info.class_names
    cm = confusion_matrix(labels, pred, len(classes))
    per_class = {name: round(100.0 * cm[i, i] / max(cm[i].sum(), 1), 2) for i, name in enumerate(classes)}
    metrics = {
        "accuracy": round(acc, 2),
        "loss": round(loss, 4),
        "params": sum(p.numel() for p in model.parameters()),
        "train_time_s": round(ckpt.run.train_time_s, 1),
        "epochs": len(ckpt.history),
    }
    per_class = {"classes": classes, "accuracy": per_class, "confusion_matrix": cm.tolist()}
    return metrics, per_class, probs


def run_facts(ckpt: Checkpoint) -> dict:
    """Where and how the model was trained (device, precision, CPU threads, torch version): text, not metrics."""
    return {k: v for k, v in asdict(ckpt.run).items() if k != "train_time_s"}


def most_confident_mistakes(labels: np.ndarray, probs: np.ndarray, n: int) -> np.ndarray:
    """Indices of at most `n` wrongly classified images, the most confident first."""
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != labels)
    confidence = probs[wrong, pred[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:n]


def plot_mistakes(ckpt: Checkpoint, images: np.ndarray, labels: np.ndarray, probs: np.ndarray, path: str | Path,
                  rows: int = 4, cols: int = 8) -> None:
    """A grid of the test images the model gets wrong with the highest confidence, the true and the predicted
    class (with its probability) under each."""
    classes = dataset_info(ckpt.info.dataset).short_classes
    pred = probs.argmax(1)
    picked = most_confident_mistakes(labels, probs, rows * cols)
    wrong = int((pred != labels).sum())
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows + 0.6))
    for ax, i in zip(axes.flat, [*picked, *[None] * (rows * cols - len(picked))]):
        ax.axis("off")
        if i is None:
            continue
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"#{i}  true {classes[labels[i]]}\npred {classes[pred[i]]} {100 * probs[i, pred[i]]:.0f}%",
                     fontsize=8)
    fig.suptitle(f"{ckpt.info.architecture} on {ckpt.info.dataset}: the {len(picked)} most confident of its {wrong} mistakes "
                 f"on the {len(labels):,} test images (#index in the test split)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def predictions_csv(labels: np.ndarray, pred: np.ndarray, classes: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    writer.writerows((classes[a], classes[p]) for a, p in zip(labels, pred))
    return buf.getvalue()


def plot_report(ckpt: Checkpoint, metrics: dict, cm: np.ndarray, path: str | Path) -> None:
    """Training curves and confusion matrix of one model, in one PNG."""
    history, short = ckpt.history, dataset_info(ckpt.info.dataset).short_classes
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc, ax_cm) = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [1, 1, 1.2]})
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["test_loss"] for h in history], "o-", label="test")
    ax_loss.set(title="loss", xlabel="epoch", yscale="log")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["test_accuracy"] for h in history], "o-", color="tab:green")
    ax_acc.set(title="test accuracy (%)", xlabel="epoch")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_cm.imshow(np.log1p(cm), cmap="Blues")
    for (i, j), n in np.ndenumerate(cm):
        if n:
            ax_cm.text(j, i, n, ha="center", va="center", fontsize=7, color="white" if i == j else "black")
    ax_cm.set(title="confusion matrix (test)", xlabel="predicted", ylabel="actual",
              xticks=range(len(short)), yticks=range(len(short)))
    ax_cm.set_xticklabels(short, rotation=45, ha="right")
    ax_cm.set_yticklabels(short)
    fig.suptitle(f"{ckpt.info.architecture} on {ckpt.info.dataset}: {metrics['accuracy']:.2f}% test accuracy")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
