"""Small image classifiers: train, evaluate and export with DVC and PyTorch; classify with onnxruntime.

The Python API needs no torch: `from pipeline import Classifier`. Its names are imported on first use,
so that a stage (`python -m pipeline.train`) loads only the modules it needs.
"""
import importlib

_API = {"Classifier": "classifier", "ModelError": "runtime", "Prediction": "classifier", "Result": "classifier",
        "ImageError": "images", "ModelInfo": "metadata"}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pipeline.{_API[name]}"), name)
