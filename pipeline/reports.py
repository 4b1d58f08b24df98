"""What the evaluate stage writes: test-set metrics, per-class figures, predictions, the report and mistakes plots."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from digitlens import Classifier, ModelInfo
from digitlens.classifier import BATCH_SIZE
from digitlens.files import atomic_path
from pipeline.common import PipelineError
from pipeline.scoring import accuracy, class_accuracy, confusion_matrix, cross_entropy

# Largest difference allowed between the accuracy the core gives an exported model and the one its export measured in
# PyTorch: one test image in 10,000 (a near-tie that onnxruntime's batches of another size round the other way).
MAX_ACCURACY_GAP = 0.0101


def evaluate(clf: Classifier, images: np.ndarray, labels: np.ndarray, run: dict) -> tuple[dict, dict, np.ndarray]:
    """(metrics, per-class figures with the confusion matrix, class probabilities (N, C)) of an exported model on
    a labelled split (uint8 images as the data stage stores them), scored through the torch-free core that `infer`
    uses; `run` is what the train stage wrote (epochs, parameters, training time); the seed comes from the model's
    metadata. The metrics are numbers only,
    so that `dvc metrics diff` and `dvc exp show` can compare them."""
    x = images.astype(np.float32) / 255.0
    probs = np.concatenate([clf.probabilities(x[i:i + BATCH_SIZE]) for i in range(0, len(x), BATCH_SIZE)])
    pred = probs.argmax(1)
    acc = accuracy(pred, labels)
    if clf.info.test_accuracy is None or abs(acc - clf.info.test_accuracy) > MAX_ACCURACY_GAP:
        raise PipelineError(f"{clf.path}: scores {acc:.2f} % through digitlens, but the export stage measured "
                            f"{clf.info.test_accuracy} % in PyTorch: the core's preprocessing and the pipeline's differ")
    classes = clf.info.class_names
    cm = confusion_matrix(labels, pred, len(classes))
    metrics = {
        "accuracy": acc,
        "loss": round(cross_entropy(probs, labels), 4),
        "params": run["parameters"],
        "train_time_s": round(run["train_time_s"], 1),
        "epochs": run["epochs"],
        "seed": clf.info.params.get("seed", -1),  # which training this is: benchmarks/seeds.py tells stale figures
    }
    per_class = {"classes": classes, "accuracy": class_accuracy(cm, classes), "confusion_matrix": cm.tolist()}
    return metrics, per_class, probs


def read_history(live_dir: str | Path) -> list[dict]:
    """The per-epoch rows of a training's DVCLive folder: one key per plots/metrics/<name>.tsv (columns step and
    the name's last part), "epoch" from its steps."""
    folder = Path(live_dir) / "plots" / "metrics"
    columns = {}
    for path in sorted(folder.rglob("*.tsv")):
        name = path.relative_to(folder).with_suffix("").as_posix()
        with open(path, newline="") as f:
            columns[name] = {int(r["step"]): float(r[path.stem]) for r in csv.DictReader(f, delimiter="\t")}
    if not columns:
        raise PipelineError(f"{folder}: no per-epoch metrics (DVCLive's *.tsv files)")
    epochs = sorted(set.intersection(*(set(c) for c in columns.values())))
    return [{"epoch": e, **{name: c[e] for name, c in columns.items()}} for e in epochs]


def most_confident_mistakes(labels: np.ndarray, probs: np.ndarray, n: int) -> np.ndarray:
    """Indices of at most `n` wrongly classified images, the most confident first."""
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != labels)
    confidence = probs[wrong, pred[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:n]


def plot_mistakes(info: ModelInfo, classes: list[str], images: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                  path: str | Path, rows: int = 4, cols: int = 8) -> None:
    """A grid of the test images the model gets wrong with the highest confidence, the true and the predicted
    class (with its probability; `classes`: short names) under each."""
    pred = probs.argmax(1)
    picked = most_confident_mistakes(labels, probs, rows * cols)
    wrong = int((pred != labels).sum())
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows + 0.6))
    for ax, i in zip(axes.flat, [*picked, *[None] * (rows * cols - len(picked))]):
        ax.axis("off")
        if i is None:
            continue
        ax.imshow(images[i], **({"cmap": "gray", "vmin": 0, "vmax": 255} if images[i].ndim == 2 else {}))
        ax.set_title(f"#{i}  true {classes[labels[i]]}\npred {classes[pred[i]]} {100 * probs[i, pred[i]]:.0f}%",
                     fontsize=8)
    fig.suptitle(f"{info.architecture} on {info.dataset}: the {len(picked)} most confident of its {wrong} mistakes "
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


def plot_report(info: ModelInfo, short: list[str], history: list[dict], metrics: dict, cm: np.ndarray,
                path: str | Path) -> None:
    """Training curves (the per-epoch `history`) and confusion matrix (classes labelled by their `short` names) of
    one model, in one PNG."""
    cm = np.asarray(cm)
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc, ax_cm) = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [1, 1, 1.2]})
    ax_loss.plot(epochs, [h["train/loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val/loss"] for h in history], "o-", label="validation")
    ax_loss.set(title="loss", xlabel="epoch", yscale="log")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["val/accuracy"] for h in history], "o-", color="tab:green")
    ax_acc.set(title="validation accuracy (%)", xlabel="epoch")
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
    fig.suptitle(f"{info.architecture} on {info.dataset}: {metrics['accuracy']:.2f}% test accuracy")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
