"""Test-set figures from a model's outputs, in numpy (no torch): what the export and evaluate stages score."""
from __future__ import annotations

import numpy as np


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Percentage of predictions equal to their labels, rounded to 0.01 as the metrics show it."""
    return round(100.0 * float(np.mean(pred == labels)), 2)


def cross_entropy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-probability of the true class."""
    return float(-np.log(np.maximum(probs[np.arange(len(labels)), labels], np.finfo(np.float64).tiny)).mean())


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (true class, predicted class)."""
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def class_accuracy(cm: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Each class's accuracy (%) from a confusion matrix, rounded to 0.01."""
    return {name: round(100.0 * cm[i, i] / max(cm[i].sum(), 1), 2) for i, name in enumerate(classes)}
