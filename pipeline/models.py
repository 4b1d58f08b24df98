"""The architectures, looked up by name in a registry (the four of the reference recipes and the tuned one),
and their checkpoints: the weights beside the model's facts (ModelInfo), which rebuild it.

Every architecture takes its input's `channels` (1 or 3) and square `size` (16 to 64 pixels) and its class count
from the data set. At 28x28 grey each keeps its reference layers; at another shape the convolutions take the
channels and the first linear layer takes whatever the convolutions leave (the pooling halves as before)."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from digitlens.files import atomic_path
from digitlens.metadata import IMAGE_SIZE, ModelInfo
from pipeline.augment import affine_grid, warp
from pipeline.common import PipelineError

MODELS: dict[str, type[nn.Module]] = {}


def register(cls: type[nn.Module]) -> type[nn.Module]:
    MODELS[cls.name] = cls
    return cls


def list_models() -> list[str]:
    return list(MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](**kwargs)


@register
class Softmax(nn.Module):
    """Softmax regression on the flattened image (reference recipe: tutorial 004)."""

    name = "softmax"

    def __init__(self, num_classes: int = 10, channels: int = 1, size: int = IMAGE_SIZE):
        super().__init__()
        self.fc = nn.Linear(channels * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) -> (B, C)
        return self.fc(x.flatten(1))


@register
class MLP(nn.Module):
    """784-256-128-10 ReLU network with dropout between the hidden layers (tutorials 000, 003); the input layer
    takes channels x size x size pixels."""

    name = "mlp"

    def __init__(self, num_classes: int = 10, dropout: float = 0.2, channels: int = 1, size: int = IMAGE_SIZE):
        super().__init__()
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1) (got {dropout!r})")
        self.fc1 = nn.Linear(channels * size * size, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, num_classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x.flatten(1)))  # (B, 256)
        x = self.dropout(x)
        x = torch.relu(self.fc2(x))  # (B, 128)
        x = self.dropout(x)
        return self.fc3(x)


@register
class SimpleCNN(nn.Module):
    """Two 5x5 convolutions with max-pooling and one linear layer (tutorial 002), returning logits; the linear
    layer takes the 20 maps of ((size - 4) // 2 - 4) // 2 pixels square (4 at 28x28, 1 at 16x16)."""

    name = "simple_cnn"

    def __init__(self, num_classes: int = 10, channels: int = 1, size: int = IMAGE_SIZE):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.pool = nn.MaxPool2d(2)
        side = ((size - 4) // 2 - 4) // 2
        self.fc = nn.Linear(20 * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.pool(self.conv1(x)))  # (B, 10, 12, 12)
        x = torch.relu(self.pool(self.conv2(x)))  # (B, 20, 4, 4)
        return self.fc(x.flatten(1))


def conv_bn(c_in: int, c_out: int, bias: bool = True) -> list[nn.Module]:
    """3x3 convolution (same size), BatchNorm, ReLU. (The tuned CNN drops the bias BatchNorm makes redundant;
    tutorial 001's keeps it.)"""
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias), nn.BatchNorm2d(c_out), nn.ReLU()]


@register
class CNN(nn.Module):
    """Three 3x3 conv-BN-ReLU blocks and a BN MLP head (tutorial 001), flattening the 64 maps of size // 4 pixels
    square from dim 1."""

    name = "cnn"

    def __init__(self, num_classes: int = 10, channels: int = 1, size: int = IMAGE_SIZE):
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn(channels, 16),
            *conv_bn(16, 32),
            nn.MaxPool2d(2),  # (B, 32, 14, 14)
            *conv_bn(32, 64),
            nn.MaxPool2d(2),  # (B, 64, 7, 7)
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * (size // 4) ** 2, 128), nn.BatchNorm1d(128), nn.ReLU(),
            nn.Linear(128, 64), nn.BatchNorm1d(64), nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


@register
class TunedCNN(nn.Module):
    """A BatchNorm VGG-style CNN for the tuned recipe: one conv at 28x28 (max-pooled before its BatchNorm and
    ReLU), two at 14x14, two at 7x7 (width, 2x and 4x `width` channels), max-pooling between; then either global
    average pooling and one linear layer (hidden=0) or the 7x7 maps (size // 4 at other sizes) flattened into a
    BatchNorm MLP head of `hidden` units with dropout."""

    name = "tuned_cnn"
    tuned = True  # not one of the reference recipes: listed apart in the summary and the README

    def __init__(self, num_classes: int = 10, width: int = 32, hidden: int = 0, dropout: float = 0.0,
                 channels: int = 1, size: int = IMAGE_SIZE):
        super().__init__()
        for arg, value, low in (("width", width, 1), ("hidden", hidden, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 4096:
                raise ValueError(f"{arg} must be an integer from {low} to 4096 (got {value!r})")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1) (got {dropout!r})")
        w = width
        self.features = nn.Sequential(
            # pooled before its BatchNorm and ReLU, as airbench's blocks are: a quarter of their work at full size
            nn.Conv2d(channels, w, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(w), nn.ReLU(),  # (B, w, 14, 14)
            *conv_bn(w, 2 * w, bias=False), *conv_bn(2 * w, 2 * w, bias=False),
            nn.MaxPool2d(2),  # (B, 2w, 7, 7)
            *conv_bn(2 * w, 4 * w, bias=False), *conv_bn(4 * w, 4 * w, bias=False),  # (B, 4w, 7, 7)
        )
        if hidden:
            self.head = nn.Sequential(
                nn.Flatten(), nn.Linear(4 * w * (size // 4) ** 2, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout),
                nn.Linear(hidden, num_classes))
        else:
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                      nn.Linear(4 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ViewAveraged(nn.Module):
    """Test-time augmentation inside the graph: the mean of `model`'s logits over each image and its views: zoomed
    in and out by `zoom` (a fraction), rotated by +-`rotate` degrees, and, with `flip`, the mirror images of all
    of these (the recipes' test_zoom, test_rotate, test_flip, each where the data set allows it). It shares the
    model's weights and runs all views of a batch as one batch; exports carry the views. `size`: the images' side;
    `fill`: the background's input value, for pixels a view brings in."""

    def __init__(self, model: nn.Module, size: int, *, flip: bool = False, zoom: float = 0.0, rotate: float = 0.0,
                 fill: float = 0.0):
        super().__init__()
        self.model, self.flip, self.fill = model, flip, fill
        draws = [[0.0, 0.0, 1 + z, 0.0, 0.0] for z in ((-zoom, zoom) if zoom else ())]
        draws += [[math.radians(a), 0.0, 1.0, 0.0, 0.0] for a in ((rotate, -rotate) if rotate else ())]
        grids = (affine_grid(torch.tensor(draws), [len(draws), 1, size, size]) if draws
                 else torch.empty(0, size, size, 2))
        self.register_buffer("grids", grids, persistent=False)  # (views, H, W, 2), fixed by the recipe

    @property
    def views(self) -> int:
        """Forward passes per image."""
        return (1 + len(self.grids)) * (2 if self.flip else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        b, (v, h, w, _) = x.shape[0], self.grids.shape
        views = [x]
        if v:  # each view of the whole batch in turn: (v * B, C, H, W)
            views.append(warp(x.repeat(v, 1, 1, 1), self.grids[:, None].expand(v, b, h, w, 2).reshape(-1, h, w, 2),
                              self.fill))
        x = torch.cat(views)
        if self.flip:
            x = torch.cat([x, x.flip(-1)])
        return self.model(x).reshape(self.views, b, -1).mean(0)


def inference_model(model: nn.Module, info: ModelInfo) -> nn.Module:
    """`model` as it classifies at test time: averaged over the test-time views `info` names, if any."""
    if info.forward_passes == 1:
        return model
    return ViewAveraged(model, info.size, flip=info.test_flip, zoom=info.test_zoom, rotate=info.test_rotate,
                        fill=-info.mean / info.std)


@dataclass(frozen=True)
class RunFacts:
    """How long and where a model trained: its epochs, parameter count, device, precision, CPU threads, torch
    version and processes (torchrun's; the train stage writes them to run.json)."""

    train_time_s: float
    epochs: int
    parameters: int
    device: str
    precision: str
    threads: int | None
    torch_version: str
    processes: int = 1


@dataclass(frozen=True)
class Checkpoint:
    """What the train stage writes and every later stage reads: the facts, the weights, the per-epoch history."""

    info: ModelInfo
    state_dict: dict[str, torch.Tensor]
    history: list[dict]
    run: RunFacts

    def model(self) -> nn.Module:
        """The trained model as it classifies (with its test-time views, if any), rebuilt from its facts, in eval
        mode."""
        model = create_model(self.info.architecture, num_classes=len(self.info.class_names),
                             channels=self.info.channels, size=self.info.size, **self.info.model_args)
        model.load_state_dict(self.state_dict)
        return inference_model(model, self.info).eval()


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike) -> None:
    """Write a checkpoint as plain tensors, numbers and strings (torch.load(weights_only=True) reads it back)."""
    with atomic_path(path) as tmp:
        torch.save({"info": ckpt.info.to_dict(), "state_dict": ckpt.state_dict, "history": ckpt.history,
                    "run": asdict(ckpt.run)}, tmp)


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, Checkpoint]:
    """(the model in eval mode, its checkpoint) from a file written by the train stage."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        ckpt = Checkpoint(ModelInfo(**raw["info"]), raw["state_dict"], raw["history"], RunFacts(**raw["run"]))
        model = ckpt.model()
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such checkpoint") from None
    except Exception as e:  # noqa: BLE001 - corrupt, truncated or foreign files
        raise PipelineError(f"{path}: not a valid checkpoint ({type(e).__name__}: {e})".splitlines()[0]) from None
    return model, ckpt
