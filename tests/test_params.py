import copy

import pytest
import yaml

from pipeline.common import PipelineError
from pipeline.params import load_params, parse_params
from tests.conftest import ROOT

RAW = yaml.safe_load((ROOT / "params.yaml").read_text())


def with_change(path: str, value=None, delete=False):
    raw = copy.deepcopy(RAW)
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        node = node[key]
    if delete:
        del node[last]
    else:
        node[last] = value
    return raw


def test_repository_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert set(params.recipes) == {"softmax", "mlp", "simple_cnn", "cnn", "tuned_cnn"}
    assert params.recipe("cnn").scheduler is not None and params.recipe("cnn").batch_size == 100


def test_augmentation_follows_the_data_set_properties():
    params = parse_params(with_change("recipes.tuned_cnn.augment.erase", 0.25))  # every kind asked for
    digits, clothes = params.augment("mnist", "tuned_cnn"), params.augment("fashion-mnist", "tuned_cnn")
    # digits: warped (handwriting varies in pose), never erased (a hidden stroke changes the digit)
    assert digits.rotate > 0 and digits.shear > 0 and digits.scale > 0 and digits.erase == 0
    # clothes: erased (an occluded shirt is still a shirt), never warped (catalogue photos are upright)
    assert clothes.erase > 0 and clothes.rotate == clothes.shear == clothes.scale == 0
    assert digits.translate == clothes.translate > 0
    assert (params.hflip("mnist", "tuned_cnn"), params.hflip("fashion-mnist", "tuned_cnn")) == (False, True)
    # test-time views follow the same properties, whatever a recipe asks: flips where flip-invariant, rotations
    # where poses vary, zooms everywhere
    views_asked = params.model_copy(update={"recipes": {
        name: r.model_copy(update={"test_flip": True, "test_zoom": 0.1, "test_rotate": 8})
        for name, r in params.recipes.items()}})
    assert views_asked.test_views("mnist", "cnn") == {"test_flip": False, "test_zoom": 0.1, "test_rotate": 8}
    assert views_asked.test_views("fashion-mnist", "cnn") == {"test_flip": True, "test_zoom": 0.1, "test_rotate": 0.0}
    # the reference recipes get none
    assert params.augment("mnist", "cnn") == params.augment("fashion-mnist", "cnn") == type(digits)()


def test_epochs_override_replaces_every_recipe():
    params = parse_params(with_change("train.epochs", 2))
    assert {params.recipe(a).epochs for a in params.recipes} == {2}
    assert params.recipes["cnn"].epochs == 20


@pytest.mark.parametrize("path, value, delete, message", [
    ("recipes.resnet", RAW["recipes"]["cnn"], False,
     "recipes: Value error, unknown architecture 'resnet'; allowed: softmax, mlp, simple_cnn, cnn, tuned_cnn"),
    ("datasets.cifar", RAW["datasets"]["mnist"], False,
     "datasets: Value error, cifar: source builtin is one of mnist, fashion-mnist; declare other data sets with "
     "source: folder"),
    ("datasets.cifar", {"source": "folder"}, False, "datasets.cifar.path: Field required"),
    ("datasets.mnist.image_size", 32, False, "a built-in data set has path pipeline/datasets.py (its URLs and "
                                             "checksums), image_size 28 and channels 1"),
    ("datasets.mnist.mean", 0.13, False, "datasets.mnist.mean: Extra inputs are not permitted"),
    ("datasets.mnist.prefix", "Big ", False, "datasets.mnist.prefix: Value error, 'Big ': lower-case letters"),
    ("models.cnn.arch", "resnet", False, "models.cnn: unknown architecture 'resnet'"),
    ("recipes.tuned_cnn.model_args", {"channels": 3}, False, "unknown argument 'channels'; allowed: dropout, hidden, "
                                                              "width"),
    ("seed", None, True, "seed: Field required"),
    ("recipes.cnn", None, True, "missing cnn"),
    ("recipes.cnn.lr", -0.1, False, "recipes.cnn.lr: Input should be greater than 0 (got -0.1)"),
    ("recipes.mlp.batch_size", "64", False, "recipes.mlp.batch_size: Input should be a valid integer (got '64')"),
    ("recipes.cnn.optimizer", "adamw", False,
     "recipes.cnn.optimizer: Input should be 'sgd', 'adam' or 'muon' (got 'adamw')"),
    ("recipes.tuned_cnn.filter_lr", None, True,
     "recipes.tuned_cnn: Value error, filter_lr: the convolution filters' learning rate, set for optimizer muon only"),
    ("recipes.cnn.filter_lr", 0.01, False, "recipes.cnn: Value error, filter_lr: the convolution filters' learning"),
    ("recipes.tuned_cnn.filter_lr", 0, False, "recipes.tuned_cnn.filter_lr: Input should be greater than 0 (got 0)"),
    ("device", "tpu", False, "device: Input should be 'auto', 'cpu' or 'cuda' (got 'tpu')"),
    ("train.amp", "fp16", False, "train.amp: Input should be 'auto', 'bf16' or 'off' (got 'fp16')"),
    ("data.train_limit", 0, False, "data.train_limit: Input should be greater than 0 (got 0)"),
    ("data.val_fraction", 0.00001, False, "data.val_fraction: Input should be greater than or equal to 0.01"),
    ("data.val_fraction", 0.9, False, "data.val_fraction: Input should be less than or equal to 0.5 (got 0.9)"),
    ("recipes.mlp.model_args", {"dropuot": 0.1}, False, "unknown argument 'dropuot'; allowed: dropout"),
    ("recipes.mlp.model_args", {"dropout": 1.5}, False, "mlp.model_args: dropout must be a number in [0, 1) (got 1.5)"),
    ("recipes.mlp.model_args", {"dropout": "0.2"}, False, "dropout must be a number in [0, 1) (got '0.2')"),
    ("data.train_limit", 50, False, "data.train_limit: 50 is smaller than recipes.softmax.batch_size (100)"),
    ("recipes.cnn.epochs_", 3, False, "recipes.cnn.epochs_: Extra inputs are not permitted"),
    ("recipes.tuned_cnn.augment.erase", 1.5, False,
     "recipes.tuned_cnn.augment.erase: Input should be less than or equal to 1 (got 1.5)"),
    ("recipes.tuned_cnn.scheduler", {"kind": "cosine"}, False, "recipes.tuned_cnn.scheduler"),
    ("recipes.tuned_cnn.model_args", {"width": 0}, False, "width must be an integer from 1 to 4096 (got 0)"),
    ("datasets.mnist.source", None, True, "datasets.mnist.source: Field required"),
])
def test_bad_params_name_the_key(path, value, delete, message):
    with pytest.raises(PipelineError) as err:
        parse_params(with_change(path, value, delete))
    assert message in str(err.value)
    assert str(err.value).startswith("params.yaml: ")


def test_unreadable_params_file(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: [unclosed")
    with pytest.raises(PipelineError, match="cannot read params"):
        load_params(tmp_path / "params.yaml")
