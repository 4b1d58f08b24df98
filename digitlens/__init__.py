"""Classify images with models exported by this project's pipeline: onnxruntime, Pillow and numpy, no torch.

    from digitlens import Classifier
    Classifier("artifacts/tuned_cnn.onnx").predict("digit.png").top
"""
from digitlens.classifier import Classifier, Prediction, Result
from digitlens.errors import ImageError, ModelError
from digitlens.metadata import ModelInfo

__all__ = ["Classifier", "ImageError", "ModelError", "ModelInfo", "Prediction", "Result"]
