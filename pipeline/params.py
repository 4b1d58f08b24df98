"""Typed view of params.yaml, validated before any stage does work. Importing it does not import torch (the data
stage reads its data set's entry without it); checking recipes and models does."""
from __future__ import annotations

import inspect
import os
import re
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from digitlens.metadata import GREY_ONLY, IMAGE_SIZE, PREPROCESSING, SIZES
from digitlens.text import first_line
from pipeline.common import PipelineError
from pipeline.datasets import DATASETS, IDX_FILES, REGISTRY_FILE, SPLIT_SIZES

PARAMS_FILE = "params.yaml"
MAX_PARAMS_BYTES = 2**20
MAX_DEPTH = 20  # params.yaml nests four deep
MAX_SEED = 2**63 - 1  # a signed 64-bit integer, which torch.manual_seed and every other generator take
MAX_PARAMETERS = 50_000_000  # per model: 200 MB of float32 weights, far beyond what 28x28 images need
MAX_LR = 100.0  # beyond it no recipe here trains; torch's own errors start near 1e300
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # a data set's name and a model's: folder and file names anywhere
PREFIX = re.compile(r"([a-z0-9][a-z0-9_-]{0,63})?")


class ParamsLoader(yaml.SafeLoader):
    """YAML for a user-given params file: no anchors or aliases ("billion laughs"), no duplicate keys, MAX_DEPTH deep."""

    depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(None, None, "anchors and aliases (&name, *name) are not allowed",
                                              event.start_mark)
        if self.depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} deep", event.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        mapping = super().construct_mapping(node, deep)
        if len(mapping) < len(node.value):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return mapping


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class Plateau(Strict):
    """torch.optim.lr_scheduler.ReduceLROnPlateau, stepped on the epoch's last training batch loss (tutorial 001)."""

    mode: Literal["min", "max"] = "min"
    factor: float = Field(0.1, gt=0, lt=1)
    patience: int = Field(1, ge=0)
    threshold: float = Field(0.1, ge=0)


class OneCycle(Strict):
    """torch.optim.lr_scheduler.OneCycleLR, stepped after every batch: the learning rate rises from
    lr / div_factor to the recipe's lr over the first pct_start of training, then anneals (cosine) to
    lr / div_factor / final_div_factor."""

    kind: Literal["onecycle"]
    pct_start: float = Field(0.25, gt=0, lt=1)
    div_factor: float = Field(25.0, ge=1)
    final_div_factor: float = Field(1e4, ge=1)


class Augment(Strict):
    """Random changes to each training image, each applied only where the data set's properties say the
    label survives it (DatasetParams): warps where poses vary, erasing where labels are occlusion-invariant.
    Shifts apply everywhere."""

    rotate: float = Field(0.0, ge=0, le=180)  # degrees, uniform in [-rotate, rotate]
    shear: float = Field(0.0, ge=0, lt=90)  # degrees of horizontal shear (slant), uniform in [-shear, shear]
    scale: float = Field(0.0, ge=0, lt=1)  # zoom uniform in [1 - scale, 1 + scale]
    translate: float = Field(0.0, ge=0, le=14)  # pixels along each axis, uniform in [-translate, translate]
    erase: float = Field(0.0, ge=0, le=1)  # probability of random erasing (one rectangle of 2-25 % of the image)


class Recipe(Strict):
    # muon: Muon on the convolution filters (pipeline/muon.py; for networks with a BatchNorm after every convolution),
    # SGD with lr, momentum, nesterov and weight_decay on the rest
    optimizer: Literal["sgd", "adam", "muon"]
    lr: float = Field(gt=0, le=MAX_LR)
    filter_lr: float | None = Field(None, gt=0, le=MAX_LR)  # muon only: the convolution filters' learning rate
    momentum: float = Field(0.0, ge=0, lt=1)
    nesterov: bool = False  # SGD with Nesterov momentum
    weight_decay: float = Field(0.0, ge=0, lt=1)  # L2 on the weights of convolutions (not muon's) and linear layers only
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    batch_size: int = Field(gt=0)
    drop_last: bool = False
    epochs: int = Field(gt=0)
    normalize: bool = False  # standardise with the data set's mean/std, else only scale to [0, 1]
    hflip: bool = False  # random horizontal flip augmentation, on flip-invariant data sets only
    # test-time views, inside the exported graph: the model's logits averaged over each image and its mirror image
    # (test_flip: on flip-invariant data sets only), the image zoomed in and out by test_zoom (a fraction) and
    # rotated by +-test_rotate degrees (where poses vary only); one forward pass per view
    test_flip: bool = False
    test_zoom: float = Field(0.0, ge=0, le=0.5)
    test_rotate: float = Field(0.0, ge=0, le=45)
    augment: Augment = Augment()
    model_args: dict[str, Any] = {}
    scheduler: Plateau | OneCycle | None = None

    @model_validator(mode="after")
    def optimizer_settings(self) -> Recipe:
        if self.nesterov and (self.optimizer == "adam" or self.momentum == 0):
            raise ValueError("nesterov: needs optimizer sgd or muon with a momentum above 0")
        if (self.filter_lr is None) == (self.optimizer == "muon"):
            raise ValueError("filter_lr: the convolution filters' learning rate, set for optimizer muon only")
        return self


class DatasetParams(Strict):
    """One data set: where its images come from, their form, what keeps their labels, how users' images are
    prepared (docs/datasets.md)."""

    # builtin: MNIST or Fashion-MNIST, downloaded; folder: a folder of images; idx: the four IDX files of an
    # MNIST-like data set (KMNIST, EMNIST ...), e.g. fetched with `dvc import-url`
    source: Literal["builtin", "folder", "idx"]
    # the data stage's input, which DVC watches: the folder (inside the project), or for a built-in data set the
    # module with its URLs and checksums
    path: str = Field(min_length=1)
    classes: list[str] | None = None  # idx: the class names in label order (a folder's are its sub-folders' names)
    sha256: dict[str, str] | None = None  # idx: SHA-256 of each of the four decompressed files
    prefix: str | None = None  # of its models' names (artifacts/<prefix><arch>.onnx); default "<name>-"
    # images are brought to image_size x image_size pixels (not `size`: DVC's run cache ignores keys of that name)
    image_size: int = Field(IMAGE_SIZE, ge=SIZES[0], le=SIZES[1])
    channels: Literal[1, 3] = 1  # grey or colour (RGB)
    test_fraction: float = Field(0.2, ge=0.05, le=0.5)  # a folder without test/: this share is the test split
    skip_bad: bool = False  # a folder's undecodable images: skipped and counted (else refused, the file named)
    flip_invariant: bool = False  # a mirrored image keeps its label (clothes yes, digits no)
    pose_varies: bool = False  # images come rotated, slanted and scaled (handwriting yes, catalogue photos no)
    occlusion_invariant: bool = False  # a partly hidden image keeps its label (clothes yes; digits no: 8 -> 3)
    # how a user's image is brought to the model's input: one of digitlens.metadata.PREPROCESSING
    preprocess: str = "plain"

    @field_validator("preprocess")
    @classmethod
    def known_preprocessing(cls, v: str) -> str:
        if v not in PREPROCESSING:
            raise ValueError(f"unknown preprocessing {v!r}; allowed: {', '.join(PREPROCESSING)}")
        return v

    @field_validator("path")
    @classmethod
    def inside_the_project(cls, v: str) -> str:
        if Path(v).is_absolute() or ".." in Path(v).parts:
            raise ValueError(f"{v!r}: give a path inside the project, relative to it (DVC tracks it there)")
        return v

    @field_validator("prefix")
    @classmethod
    def file_name_prefix(cls, v: str | None) -> str | None:
        if v is not None and not PREFIX.fullmatch(v):
            raise ValueError(f"{v!r}: lower-case letters, digits, '-' and '_' only, starting with a letter or digit")
        return v

    @model_validator(mode="after")
    def grey_preprocessing(self) -> DatasetParams:
        if self.preprocess in GREY_ONLY and self.channels != 1:
            raise ValueError(f"preprocess: {self.preprocess} makes grey images; with channels 3 use plain")
        return self

    @model_validator(mode="after")
    def idx_declared(self) -> DatasetParams:
        if self.source != "idx":
            if self.classes is not None or self.sha256 is not None:
                raise ValueError(f"classes and sha256: for source idx only ({self.source} data sets have theirs)")
            return self
        if self.classes is None or len(self.classes) < 2 or len(set(self.classes)) < len(self.classes) \
                or len(self.classes) > 256 or not all(c.strip() for c in self.classes):
            raise ValueError("classes: the class names in label order, 2 to 256 distinct non-empty names")
        if self.sha256 is None or sorted(self.sha256) != sorted(IDX_FILES) \
                or not all(re.fullmatch(r"[0-9a-f]{64}", h) for h in self.sha256.values()):
            raise ValueError(f"sha256: the SHA-256 (64 hex digits) of each of {', '.join(IDX_FILES)} (decompressed)")
        return self


def check_datasets(v: dict[str, DatasetParams]) -> dict[str, DatasetParams]:
    """The data sets' names, and a built-in one's fixed form."""
    if not v:
        raise ValueError("declare at least one data set")
    for name, ds in v.items():
        if not NAME.fullmatch(name):
            raise ValueError(f"{name!r}: a data set's name is 1-64 lower-case letters, digits, '-' and '_', "
                             "starting with a letter or digit (it names folders and files)")
        if ds.source == "builtin":
            if name not in DATASETS:
                raise ValueError(f"{name}: source builtin is one of {', '.join(DATASETS)}; declare other data "
                                 "sets with source: folder")
            if ds.path != REGISTRY_FILE or ds.image_size != IMAGE_SIZE or ds.channels != 1:
                raise ValueError(f"{name}: a built-in data set has path {REGISTRY_FILE} (its URLs and checksums), "
                                 f"image_size {IMAGE_SIZE} and channels 1")
    return v


class ModelEntry(Strict):
    dataset: str
    arch: str


def model_name(datasets: dict[str, DatasetParams], dataset: str, arch: str) -> str:
    prefix = datasets[dataset].prefix
    return (f"{dataset}-" if prefix is None else prefix) + arch


def check_models(datasets: dict[str, DatasetParams], models: dict[str, ModelEntry], archs: list[str]) -> None:
    """No two data sets could name a model alike; each model of a declared data set and a known architecture
    (`archs`), named by the data set's prefix and the architecture."""
    taken: dict[str, str] = {}  # a model name any data set could give -> that data set
    for name in datasets:
        for arch in archs:
            model = model_name(datasets, name, arch).lower()
            if taken.setdefault(model, name) != name:
                raise ValueError(f"datasets: {taken[model]} and {name} would both name a model {model!r} "
                                 "(artifacts/<prefix><arch>.onnx); give one of them another prefix")
    for model, entry in models.items():
        if entry.dataset not in datasets:
            raise ValueError(f"models.{model}: unknown data set {entry.dataset!r}; declared: {', '.join(datasets)}")
        if entry.arch not in archs:
            raise ValueError(f"models.{model}: unknown architecture {entry.arch!r}; allowed: {', '.join(archs)}")
        if model != model_name(datasets, entry.dataset, entry.arch):
            raise ValueError(f"models.{model}: name it {model_name(datasets, entry.dataset, entry.arch)} (its data "
                             f"set's prefix and its architecture), or give datasets.{entry.dataset} that prefix")


class DatasetsAndModels(BaseModel):
    """The checks of the `datasets` and `models` sections, for the data stage's view of the file (Declared) and
    for the whole file (Params), each of which declares the fields."""

    def architectures(self) -> list[str]:
        return list(self.recipes)

    @field_validator("datasets", check_fields=False)
    @classmethod
    def known_datasets(cls, v: dict) -> dict:
        return check_datasets(v)

    @model_validator(mode="after")
    def models_named_by_their_data_set(self) -> DatasetsAndModels:
        check_models(self.datasets, self.models, self.architectures())
        return self


class Declared(DatasetsAndModels):
    """The data sets and the models, checked against the architectures the recipes name: what the data stage reads,
    without torch (the rest of the file ignored)."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True, allow_inf_nan=False)
    datasets: dict[str, DatasetParams]
    models: dict[str, ModelEntry]
    recipes: dict[str, Any]


class DataParams(Strict):
    # the share of the training images held out, with a fixed seed, for per-epoch curves and recipe choices
    val_fraction: float = Field(0.1, ge=0.01, le=0.5)  # 600 images at least
    train_limit: int | None = Field(None, gt=0)  # quick runs: train on the first N of the rest only


class TrainParams(Strict):
    epochs: int | None = Field(None, gt=0)  # quick runs: replaces every recipe's epoch count
    eval_batch_size: Annotated[int, Field(gt=0)] | Literal["auto"] = "auto"  # auto: EVAL_BATCH[device type]
    channels_last: bool = True  # NHWC memory format for the convolutional models
    # bfloat16 autocast of the training forward pass (weights, optimiser and evaluation stay float32):
    # auto = where the device computes bf16 natively (oneDNN on the CPU, CUDA with bf16), else off
    amp: Literal["auto", "bf16", "off"] = "auto"


EVAL_BATCH = {"cpu": 100, "cuda": 5000}  # test-set images per forward pass: 100 is a 2-core CPU's fastest; a GPU
                                         # wants thousands (kernel launches, not arithmetic, bound small batches)


class Params(DatasetsAndModels):
    model_config = Strict.model_config
    seed: int = Field(ge=0, le=MAX_SEED)
    device: Literal["auto", "cpu", "cuda"]
    data: DataParams
    train: TrainParams
    datasets: dict[str, DatasetParams]
    recipes: dict[str, Recipe]
    # every model dvc.yaml trains: name -> data set and architecture; the name is the artifact's file stem and must
    # be the data set's prefix and the architecture (DVC's templating cannot join strings, so they are listed)
    models: dict[str, ModelEntry]

    def architectures(self) -> list[str]:
        """The registry's (the recipes are checked to be exactly these)."""
        from pipeline.models import MODELS

        return list(MODELS)

    @field_validator("recipes")
    @classmethod
    def known_architectures(cls, v: dict) -> dict:
        import torch

        from pipeline.models import MODELS

        for name, recipe in v.items():
            if name not in MODELS:
                raise ValueError(f"unknown architecture {name!r}; allowed: {', '.join(MODELS)}")
            accepted = set(inspect.signature(MODELS[name]).parameters) - {"num_classes", "channels", "size"}
            for arg in recipe.model_args:
                if arg not in accepted:
                    allowed = ", ".join(sorted(accepted)) or "none"
                    raise ValueError(f"{name}.model_args: unknown argument {arg!r}; allowed: {allowed}")
            try:  # the values too: the constructor checks them, on the meta device (no memory for weights)
                with torch.device("meta"):
                    size = sum(p.numel() for p in MODELS[name](**recipe.model_args).parameters())
            except (TypeError, ValueError) as e:
                raise ValueError(f"{name}.model_args: {e}") from None
            if size > MAX_PARAMETERS:
                raise ValueError(f"{name}.model_args: {size:,} parameters; the limit is {MAX_PARAMETERS:,}")
        return v

    @model_validator(mode="after")
    def everything_covered(self) -> Params:
        from pipeline.models import MODELS

        missing = [k for k in MODELS if k not in self.recipes]
        if missing:
            raise ValueError(f"recipes: missing {', '.join(missing)}")
        limit = self.data.train_limit
        images = SPLIT_SIZES["train"] - round(SPLIT_SIZES["train"] * self.data.val_fraction)
        for arch, recipe in self.recipes.items():
            if not recipe.drop_last or recipe.batch_size <= min(limit or images, images):
                continue
            if limit is not None and limit < images:
                raise ValueError(f"data.train_limit: {limit} is smaller than recipes.{arch}.batch_size "
                                 f"({recipe.batch_size}), whose incomplete batches are dropped: nothing would train")
            raise ValueError(f"recipes.{arch}.batch_size: {recipe.batch_size} is more than the {images:,} training "
                             f"images left beside the validation split, and recipes.{arch}.drop_last drops "
                             "incomplete batches: nothing would train")
        return self

    def eval_batch(self, device_type: str) -> int:
        """Images per forward pass when scoring on a device of `device_type` ('cpu', 'cuda')."""
        size = self.train.eval_batch_size
        return EVAL_BATCH.get(device_type, EVAL_BATCH["cpu"]) if size == "auto" else size

    def recipe(self, arch: str) -> Recipe:
        """The recipe of `arch` with the quick-run epoch override applied."""
        recipe = self.recipes[arch]
        if self.train.epochs is not None:
            recipe = recipe.model_copy(update={"epochs": self.train.epochs})
        return recipe

    def model_name(self, dataset: str, arch: str) -> str:
        """The name (artifact file stem) of `arch` trained on `dataset`: the data set's prefix, then the arch."""
        return model_name(self.datasets, dataset, arch)

    def normalization(self, arch: str, stats: tuple[float, float]) -> tuple[float, float]:
        """(mean, std) the inputs of `arch` are standardised with: the data set's pixel statistics `stats` (the data
        stage's), or (0, 1) = scaled only."""
        return stats if self.recipes[arch].normalize else (0.0, 1.0)

    def hflip(self, dataset: str, arch: str) -> bool:
        return self.recipes[arch].hflip and self.datasets[dataset].flip_invariant

    def test_views(self, dataset: str, arch: str) -> dict[str, Any]:
        """The recipe's test-time views less what would change labels on `dataset`: ModelInfo's test_flip,
        test_zoom and test_rotate."""
        recipe, ds = self.recipes[arch], self.datasets[dataset]
        return {"test_flip": recipe.test_flip and ds.flip_invariant, "test_zoom": recipe.test_zoom,
                "test_rotate": recipe.test_rotate if ds.pose_varies else 0.0}

    def augment(self, dataset: str, arch: str) -> Augment:
        """The recipe's augmentation less what would change labels on `dataset`."""
        augment, ds = self.recipes[arch].augment, self.datasets[dataset]
        off = {}
        if not ds.pose_varies:
            off.update(rotate=0.0, shear=0.0, scale=0.0)
        if not ds.occlusion_invariant:
            off.update(erase=0.0)
        return augment.model_copy(update=off)


def error_text(error: dict) -> str:
    where = ".".join(str(p) for p in error["loc"])
    got = "" if error["type"] in ("missing", "value_error") else f" (got {error['input']!r})"
    return f"{where}: {error['msg']}{got}" if where else f"{error['msg']}{got}"


def parse_params(raw: Any, source: str = PARAMS_FILE, model: type[BaseModel] = Params) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise PipelineError(f"{source}: " + "; ".join(error_text(err) for err in e.errors())) from None


def read_yaml(path: str | Path) -> Any:
    """The YAML document in `path`, a regular file of at most MAX_PARAMS_BYTES, read with ParamsLoader."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_PARAMS_BYTES:
        raise OSError(f"not a regular file of at most {MAX_PARAMS_BYTES // 2**20} MB")
    with open(path, "rb") as f:
        return yaml.load(f.read(MAX_PARAMS_BYTES + 1), ParamsLoader)


def read_params_file(path: str | Path) -> Any:
    try:
        return read_yaml(path)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise PipelineError(f"{path}: cannot read params: {where}{e.problem or first_line(e)}") from None
    except (OSError, yaml.YAMLError, RecursionError, ValueError) as e:  # ValueError: an integer of 4,300+ digits
        raise PipelineError(f"{path}: cannot read params ({getattr(e, 'strerror', None) or first_line(e)})") from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    return parse_params(read_params_file(path), str(path))


def load_dataset(name: str, path: str | Path = PARAMS_FILE) -> DatasetParams:
    """The data set `name` as params.yaml declares it, its data sets and models checked (without torch)."""
    declared = parse_params(read_params_file(path), str(path), Declared).datasets
    if name not in declared:
        raise PipelineError(f"{path}: no data set {name!r}; declared: {', '.join(declared)}")
    return declared[name]
