"""Shared fixtures: the local data mirror, fetched data sets and briefly trained, exported models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Absolute, so that subprocesses working in another folder (dvc exp run) find it too
MIRROR = Path(os.environ.get("DATASET_MIRROR", ROOT.parent / "shared" / "datasets")).resolve()


@pytest.fixture(scope="session")
def mirror() -> Path:
    if not (MIRROR / "mnist").is_dir():
        pytest.fail(f"dataset mirror not found at {MIRROR}; set DATASET_MIRROR")
    return MIRROR


@pytest.fixture(scope="session")
def data_root(tmp_path_factory, mirror) -> Path:
    """Both data sets fetched (and verified) from the mirror by the data stage's code."""
    from pipeline.data import DATASETS, fetch

    root = tmp_path_factory.mktemp("data")
    os.environ["DATASET_MIRROR"] = str(mirror)
    for name in DATASETS:
        fetch(name, root / name, log=lambda msg: None)
    return root


@pytest.fixture(scope="session")
def params():
    from pipeline.params import load_params

    return load_params(ROOT / "params.yaml")


def quick_params(params, epochs: int = 1, train_limit: int = 3000):
    return params.model_copy(update={
        "device": "cpu",
        "train": params.train.model_copy(update={"epochs": epochs}),
        "data": params.data.model_copy(update={"train_limit": train_limit}),
    })


@pytest.fixture(scope="session")
def exported(tmp_path_factory, data_root, params):
    """export(dataset, arch) -> (onnx path, torchscript path, checkpoint): a briefly trained model, exported."""
    import torch

    from pipeline.conversion import export, model_info
    from pipeline.datasets import load_split
    from pipeline.models import load_checkpoint, save_checkpoint
    from pipeline.tensors import to_inputs
    from pipeline.training import train

    cache: dict = {}
    out = tmp_path_factory.mktemp("exported")

    def get(dataset: str = "mnist", arch: str = "cnn"):
        if (dataset, arch) not in cache:
            ckpt = train(quick_params(params), dataset, arch, data_root / dataset, log=lambda msg: None)
            save_checkpoint(ckpt, out / f"{dataset}-{arch}.ckpt")
            model, ckpt = load_checkpoint(out / f"{dataset}-{arch}.ckpt")
            images, _ = load_split(data_root / dataset, "test")
            info = model_info(ckpt, ckpt["history"][-1]["test_accuracy"], f"test-{dataset}-{arch}")
            x = to_inputs(images[:500], info.mean, info.std, torch.device("cpu"))
            ts_bytes, onnx_bytes, _ = export(model, info, x.numpy(), batch_size=250)
            paths = out / f"{dataset}-{arch}.onnx", out / f"{dataset}-{arch}.pt"
            paths[0].write_bytes(onnx_bytes)
            paths[1].write_bytes(ts_bytes)
            cache[dataset, arch] = (*paths, ckpt)
        return cache[dataset, arch]

    return get


def site_packages_mb(env_dir: Path) -> float:
    (site,) = (env_dir / "lib").glob("python3*/site-packages")
    return sum(f.stat().st_size for f in site.rglob("*") if f.is_file()) / 2**20


@pytest.fixture(scope="session")
def light_venv(tmp_path_factory) -> Path:
    """A fresh venv with only `pip install .` from this checkout (built as a wheel, not editable)."""
    import subprocess
    import venv

    env_dir = tmp_path_factory.mktemp("light") / "venv"
    venv.create(env_dir, with_pip=True)
    result = subprocess.run([env_dir / "bin" / "pip", "install", "-q", str(ROOT)], cwd=tmp_path_factory.mktemp("build"),
                            capture_output=True, text=True, env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return env_dir
