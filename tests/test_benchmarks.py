"""The measurements in benchmarks/, each run as its documented command: `python -m benchmarks.NAME`."""
import json
import shutil
import subprocess
import sys

import pytest

from pipeline.drawings import SAVED_AS, STYLES
from tests.conftest import ROOT


def benchmark(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def table_rows(stdout: str) -> dict[str, list[str]]:
    """First word of each table row -> its cells (the rows after the header and its rule)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("-")) + 1
    return {line.split()[0]: line.split() for line in lines[start:] if line.strip()}


@pytest.mark.slow
def test_robustness_table_and_threshold(exported, data_root):
    args = ["--model", exported("mnist", "cnn")[0], "--data", data_root / "mnist", "--count", "12"]
    result = benchmark("robustness", *args, "--threshold", "0")
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert list(rows) == ["original", *SAVED_AS, "overall"]
    assert rows["overall"][1] == str(12 * len(SAVED_AS))
    lowest = min(float(rows[name][3].rstrip("%")) for name in SAVED_AS)  # printed to 0.1 %
    assert benchmark("robustness", *args, "--threshold", max(lowest - 0.05, 0)).returncode == 0
    if lowest < 100:
        assert benchmark("robustness", *args, "--threshold", lowest + 0.05).returncode == 1


@pytest.mark.slow
def test_robustness_and_handwriting_refuse_a_clothing_model(exported, data_root):
    for name in ("robustness", "handwriting"):
        result = benchmark(name, "--model", exported("fashion-mnist", "softmax")[0], "--data", data_root / "mnist",
                           "--count", "5")
        assert result.returncode == 2 and "a fashion-mnist model; this measurement uses MNIST digits" in result.stderr


@pytest.mark.slow
def test_handwriting_compares_models(exported, data_root):
    first, other = exported("mnist", "cnn")[0], exported("mnist", "simple_cnn")[0]
    result = benchmark("handwriting", "--model", first, "--model", other, "--data", data_root / "mnist", "--count", "30")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for style in STYLES:
        assert any(line.lstrip().startswith(style) for line in lines), style
    assert f"{other.stem} makes" in result.stdout and f"fewer errors than {first.stem}" in result.stdout
    assert any(line.lstrip().startswith("all changed") and " 240 " in line for line in lines)  # 8 changes x 30
    # the validation digits instead, for comparing recipes without the test set
    result = benchmark("handwriting", "--model", first, "--data", data_root / "mnist", "--split", "val", "--count", "5")
    assert result.returncode == 0, result.stderr
    assert "the first 5 MNIST validation digits" in result.stdout


@pytest.mark.slow
def test_rayscore_times_both_commands_on_the_same_files(exported, data_root):
    result = benchmark("rayscore", "--images", 40, "--model", exported("mnist", "cnn")[0], "--data", data_root / "mnist")
    assert result.returncode == 0, result.stderr
    assert "the same predictions: yes" in result.stdout
    assert [line.split()[0] for line in result.stdout.splitlines()[1:3]] == ["infer", "infer-ray"]


@pytest.mark.slow
def test_speed_prints_and_writes_every_figure(data_root, tmp_path):
    out = tmp_path / "results.json"
    result = benchmark("speed", "--data", data_root / "mnist", "--arch", "softmax", "--steps", "3", "--repeats", "1",
                       "--out", out, "--infer-model", tmp_path / "absent.onnx")
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    [row] = results["training"]
    assert (row["arch"], row["batch_size"], row["steps"], row["augment"]) == ("softmax", 100, 3, "none")
    assert {"pipeline_img_s", "reference_loop_img_s"} <= set(row)
    assert [(r["arch"], r["batch"]) for r in results["inference"]] == [("softmax", 1), ("softmax", 256)]
    assert {"eager", "torchscript", "onnxruntime"} <= set(results["inference"][0])
    assert "cold `infer`: skipped" in result.stdout and "cold_infer" not in results
    assert "softmax" in result.stdout


@pytest.mark.slow
def test_loadtest_reports_the_server_against_the_api(exported):
    result = benchmark("loadtest", "--model", exported("mnist", "cnn")[0], "--requests", "60", "--concurrency", "2")
    assert result.returncode == 0, result.stderr
    assert "errors     0" in result.stdout and "Classifier.predict of the same images" in result.stdout


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a machine with an NVIDIA GPU runs the real check")
def test_the_gpu_check_says_there_is_no_gpu_and_runs_nothing():
    result = subprocess.run(["bash", ROOT / "benchmarks" / "gpu-check.sh"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "gpu-check: no NVIDIA GPU on this machine; nothing run\n"
    assert not (ROOT / ".venv-gpu").exists()


def test_seeds_counts_each_finished_seed_once():
    from benchmarks.seeds import seed_runs, spread

    path = "reports/mnist/tuned_cnn/metrics.json"

    def row(rev, seed, acc, experiment=None, state=None, typ="branch_commit", scored=None, lr=0.1):
        return {"Experiment": experiment, "rev": rev, "typ": typ, "State": state, "params.yaml:seed": float(seed),  # as
                "recipes.tuned_cnn.lr": lr, "pipeline/training.py": "3f2a", f"{path}:accuracy": acc,  # dvc.api.exp_show
                f"{path}:train_time_s": 200.0, f"{path}:seed": float(seed if scored is None else scored)}  # gives them

    rows = [row("workspace", 0, 99.0, typ="baseline"), row("main", 0, 99.69, typ="baseline"),
            row("505d40f", 2, 99.69, "cruel-stob", "Running", scored=0),  # shows the commit's figures: left out
            row("f1126f2", 1, 99.70, "tidal-vega", "Success"), row("0a1b2c3", 1, 99.80, "again", "Success"),
            row("9f8e7d6", 3, 99.75, "broken", "Failed"),
            row("1b2c3d4", 4, 99.69, "train-only", "Success", scored=0),  # did not evaluate this model
            row("2c3d4e5", 5, 99.90, "other-lr", "Success", lr=0.2)]  # another recipe, not another seed
    runs, repeats = seed_runs(rows, path)
    assert {s: r["accuracy"] for s, r in runs.items()} == {0: 99.69, 1: 99.70} and repeats == ["again (seed 1)"]
    assert spread([99.69, 99.70, 99.74]) == "99.71 ± 0.03"
