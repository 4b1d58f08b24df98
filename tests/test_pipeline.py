"""End to end: the real `dvc repro` in a temporary copy of the project, with the quick-run overrides."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.datasets import DATASETS
from pipeline.models import list_models, load_checkpoint
from pipeline.tensors import amp_dtype, precision_label
from tests.conftest import dvc, experiments, git, project_copy, run_queue

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def quick_project(tmp_path_factory, mirror):
    root = tmp_path_factory.mktemp("project")
    env = project_copy(root, mirror)
    # the README's quick run of the whole pipeline, pinned to the CPU: what the tests below read of it (device,
    # threads in the logs) is the CPU's, and a machine with CUDA would otherwise train there
    result = dvc("exp", "run", "-S", "train.epochs=1", "-S", "data.train_limit=2000", "-S", "device=cpu", cwd=root,
                 env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["train"]["epochs"] == 1 and params["data"]["train_limit"] == 2000 and params["device"] == "cpu"
    return root, env, result


def test_repro_trains_evaluates_and_exports_every_model(quick_project):
    root, _, result = quick_project
    archs = list_models()
    for dataset in DATASETS:
        for arch in archs:
            _, ckpt = load_checkpoint(root / "models" / dataset / f"{arch}.pt")
            assert ckpt.info.params["recipe"]["epochs"] == 1 and ckpt.info.params["data"]["train_limit"] == 2000
            metrics = json.loads((root / "reports" / dataset / arch / "metrics.json").read_text())
            assert 10 < metrics["accuracy"] <= 100 and metrics["epochs"] == 1
            assert numeric(metrics) and numeric(json.loads((root / "reports" / dataset / arch / "parity.json").read_text()))
            run = json.loads((root / "reports" / dataset / arch / "run.json").read_text())
            assert run["device"] == "cpu" and run["precision"] == precision_label(amp_dtype("auto", torch.device("cpu")))
            assert (root / "reports" / dataset / arch / "mistakes.png").read_bytes()[:4] == b"\x89PNG"
            per_class = json.loads((root / "reports" / dataset / arch / "classes.json").read_text())
            assert len(per_class["accuracy"]) == 10 and len(per_class["confusion_matrix"]) == 10
            assert sum(map(sum, per_class["confusion_matrix"])) == 10000
            assert (root / "reports" / dataset / arch / "report.png").read_bytes()[:4] == b"\x89PNG"
            parity = json.loads((root / "reports" / dataset / arch / "parity.json").read_text())
            assert parity["images"] == 10000 and parity["onnx"]["argmax_mismatches"] == 0
    assert sorted(p.name for p in (root / "artifacts").iterdir() if not p.name.startswith(".")) == sorted(
        [f"{prefix}{arch}.{ext}" for prefix in ("", "fashion-") for arch in archs for ext in ("onnx", "pt", "md")]
        + ["summary.md"])
    summary = (root / "artifacts" / "summary.md").read_text()
    assert summary.count("| mnist |") == len(archs) and summary.count("| fashion-mnist |") == len(archs)
    assert "Running stage 'train@fashion-cnn'" in result.stdout
    for dataset in DATASETS:  # DVCLive's per-epoch files of every training
        for arch in archs:
            live = root / "reports" / dataset / arch / "train"
            assert json.loads((live / "metrics.json").read_text())["step"] == 1
            assert (live / "plots" / "metrics" / "val" / "accuracy.tsv").read_text().startswith("step\taccuracy\n1\t")


def test_dvc_metrics_and_plots(quick_project):
    root, env, _ = quick_project
    shown = dvc("metrics", "show", "--json", cwd=root, env=env)
    assert shown.returncode == 0, shown.stderr
    (workspace,) = json.loads(shown.stdout).values()  # keyed by revision: "" is the workspace
    files = workspace["data"]
    for dataset in DATASETS:
        for arch in list_models():
            assert "accuracy" in files[f"reports/{dataset}/{arch}/metrics.json"]["data"]
            assert "onnx" in files[f"reports/{dataset}/{arch}/parity.json"]["data"]
            assert "accuracy" in files[f"reports/{dataset}/{arch}/train/metrics.json"]["data"]["val"]
    plots = dvc("plots", "show", "-o", str(root / "plots"), cwd=root, env=env)
    assert plots.returncode == 0, plots.stderr
    html = (root / "plots" / "index.html").read_text()
    for dataset in DATASETS:
        for arch in list_models():
            assert f"reports/{dataset}/{arch}/train/plots/metrics/val/accuracy.tsv" in html
            assert f'"text": "{arch} on {dataset} - confusion matrix"' in html
            assert f"reports/{dataset}/{arch}/report.png" in html
            assert f"reports/{dataset}/{arch}/mistakes.png" in html
    for title in ("MNIST", "Fashion-MNIST"):
        assert f'"text": "{title} - training and validation loss by epoch"' in html


def test_second_repro_is_a_no_op(quick_project):
    root, env, _ = quick_project
    result = dvc("repro", cwd=root, env=env)
    assert result.returncode == 0 and "Running stage" not in result.stdout


@pytest.fixture(scope="module")
def pushed(quick_project, tmp_path_factory):
    """The quick run committed (dvc.lock included) and pushed, with its run cache, to a local-folder remote."""
    root, env, _ = quick_project
    remote = tmp_path_factory.mktemp("remote")
    assert dvc("remote", "add", "-d", "team", str(remote), cwd=root, env=env).returncode == 0
    git("add", "-A", cwd=root, env=env)
    git("commit", "-q", "-m", "quick run", cwd=root, env=env)
    git("tag", "-a", "cnn@v1.0.0", "-m", "Registering artifact cnn version 1.0.0", cwd=root, env=env)
    result = dvc("push", "--run-cache", cwd=root, env=env)
    assert result.returncode == 0, result.stderr
    return root, env


def test_a_user_pulls_one_model_and_classifies_with_the_light_install(pushed, light_venv, tmp_path, data_root):
    from PIL import Image

    from pipeline.datasets import load_split

    root, env = pushed
    clone = tmp_path / "clone"
    git("clone", "-q", str(root), str(clone), cwd=tmp_path, env=env)
    result = dvc("pull", "artifacts/cnn.onnx", cwd=clone, env=env)
    assert result.returncode == 0, result.stderr
    assert (clone / "artifacts" / "cnn.onnx").read_bytes() == (root / "artifacts" / "cnn.onnx").read_bytes()
    assert not (clone / "models" / "mnist" / "cnn.pt").exists()  # one model, nothing else
    image = load_split(data_root / "mnist", "test")[0][0]
    Image.fromarray(255 - image).resize((100, 100)).save(tmp_path / "digit.png")
    infer = subprocess.run([light_venv / "bin" / "infer", tmp_path / "digit.png", "--model", clone / "artifacts" / "cnn.onnx"],
                           capture_output=True, text=True)
    assert infer.returncode == 0 and infer.stdout.startswith(f"{tmp_path / 'digit.png'}: "), infer.stderr


def test_artifacts_get_finds_a_registered_version(pushed, tmp_path):
    root, env = pushed
    result = dvc("artifacts", "get", str(root), "cnn", "--rev", "v1.0.0", "-o", str(tmp_path / "cnn.onnx"),
                 cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cnn.onnx").read_bytes() == (root / "artifacts" / "cnn.onnx").read_bytes()


def test_pulled_run_cache_means_no_training_and_no_export(pushed, tmp_path):
    root, env = pushed
    clone = tmp_path / "clone"
    git("clone", "-q", str(root), str(clone), cwd=tmp_path, env=env)
    assert not (clone / "models").exists() or not any((clone / "models").rglob("*.pt"))  # no outputs yet
    pulled = dvc("pull", "--run-cache", cwd=clone, env=env)
    assert pulled.returncode == 0, pulled.stderr
    result = dvc("repro", cwd=clone, env=env)
    assert result.returncode == 0, result.stderr
    ran = [line for line in result.stdout.splitlines() if line.startswith("Running stage")]
    assert not [line for line in ran if "'train@" in line or "'export@" in line], ran
    assert (clone / "artifacts" / "cnn.onnx").read_bytes() == (root / "artifacts" / "cnn.onnx").read_bytes()


def test_a_missing_remote_is_dvcs_own_error(pushed, tmp_path):
    root, env = pushed
    clone = tmp_path / "clone"
    git("clone", "-q", str(root), str(clone), cwd=tmp_path, env=env)
    assert dvc("remote", "modify", "team", "url", str(tmp_path / "gone"), cwd=clone, env=env).returncode == 0
    result = dvc("pull", "artifacts/cnn.onnx", cwd=clone, env=env)
    assert result.returncode != 0 and "ERROR" in result.stderr and not (clone / "artifacts" / "cnn.onnx").exists()


def numeric(value) -> bool:
    """A number, or a dict whose leaves are all numbers."""
    if isinstance(value, dict):
        return all(map(numeric, value.values()))
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def test_a_queued_sweep_runs_in_parallel_workers_and_shows_in_exp_show(pushed):
    """The README's sweep: a grid queued with -S, two workers of one thread each, compared on validation figures
    in dvc exp show."""
    root, env = pushed
    grid = (0.05, 0.1)  # as the README's; the committed lr must not be one of them, or its row would count too
    assert yaml.safe_load((root / "params.yaml").read_text())["recipes"]["tuned_cnn"]["lr"] not in grid
    queued = dvc("exp", "run", "--queue", "-S", f"recipes.tuned_cnn.lr={grid[0]},{grid[1]}", "train@tuned_cnn",
                 cwd=root, env=env)
    assert queued.returncode == 0, queued.stderr
    status = run_queue(root, env, workers=2)
    assert "Success" in status and "Failed" not in status, status
    shown = dvc("exp", "show", "--json", cwd=root, env=env)
    assert shown.returncode == 0, shown.stderr
    rows = [r for r in experiments(json.loads(shown.stdout)) if r["params"]["recipes"]["tuned_cnn"]["lr"] in grid]
    assert sorted(r["params"]["recipes"]["tuned_cnn"]["lr"] for r in rows) == list(grid)
    for row in rows:
        metrics = row["metrics"]["reports/mnist/tuned_cnn/train/metrics.json"]  # DVCLive's: validation figures
        assert 10 < metrics["val"]["accuracy"] <= 100 and metrics["step"] == 1
        assert all(map(numeric, row["metrics"].values()))  # every metrics file: numbers only
        log = dvc("queue", "logs", row["name"], cwd=root, env=env).stdout
        assert "1 threads)" in log  # the worker's OMP_NUM_THREADS reached the training stage
        assert "Running stage 'train@tuned_cnn'" in log and "Running stage 'train@cnn'" not in log


def test_a_corrupted_model_on_the_remote_is_caught(pushed, tmp_path):
    """The remote's copy of cnn.onnx altered in place, read-only as `dvc push` leaves it: with `verify true` the
    pull refuses it; without, the card's SHA-256 and a re-hashing `dvc data status` both expose it."""
    import hashlib
    import re
    import stat

    root, env = pushed
    remote = tmp_path / "remote"
    shutil.copytree(dvc("remote", "list", cwd=root, env=env).stdout.split()[1], remote)
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    [md5] = [o["md5"] for o in lock["stages"]["export@cnn"]["outs"] if o["path"] == "artifacts/cnn.onnx"]
    stored = remote / "files" / "md5" / md5[:2] / md5[2:]
    stored.chmod(0o644)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of the weights
    stored.write_bytes(bytes(data))
    stored.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)

    def clone(name: str) -> Path:
        folder = tmp_path / name
        git("clone", "-q", str(root), str(folder), cwd=tmp_path, env=env)
        assert dvc("remote", "modify", "--local", "team", "url", str(remote), cwd=folder, env=env).returncode == 0
        return folder

    verified = clone("verified")
    assert dvc("remote", "modify", "team", "verify", "true", cwd=verified, env=env).returncode == 0
    result = dvc("pull", "artifacts/cnn.onnx", cwd=verified, env=env)
    assert result.returncode != 0 and "Checkout failed" in result.stderr
    assert not (verified / "artifacts" / "cnn.onnx").exists()

    trusting = clone("trusting")
    result = dvc("pull", "artifacts/cnn.onnx", "artifacts/cnn.md", cwd=trusting, env=env)
    assert result.returncode == 0, result.stderr  # DVC alone does not notice
    card = (trusting / "artifacts" / "cnn.md").read_text()
    [recorded] = re.findall(r"SHA-256 of `cnn\.onnx`: `([0-9a-f]{64})`", card)
    assert recorded == hashlib.sha256((root / "artifacts" / "cnn.onnx").read_bytes()).hexdigest()
    assert recorded != hashlib.sha256((trusting / "artifacts" / "cnn.onnx").read_bytes()).hexdigest()
    (trusting / "artifacts" / "cnn.onnx").touch()  # DVC hashes the file again only when it looks changed
    status = dvc("data", "status", cwd=trusting, env=env)
    assert re.search(r"modified: +artifacts/cnn\.onnx", status.stdout), status.stdout
