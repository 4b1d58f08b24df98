"""Data-parallel training (pipeline/distributed.py): two gloo processes under torchrun on this machine train to the
accuracy of one process, rank 0 alone writes, and a killed process ends the run with an error and nothing written."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.models import load_checkpoint
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # torchrun starts three Python processes per run

# Stated tolerance between 1 and 2 processes, validation accuracy in points: softmax has no batch statistics, so
# the two differ only by the order of float sums; cnn's BatchNorm normalises each process's half batch on the CPU.
TOLERANCE = {"softmax": 0.1, "cnn": 1.5}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["device"], raw["train"]["epochs"], raw["data"]["train_limit"] = "cpu", 2, 4000
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    return folder / "params.yaml"


def train_cmd(arch: str, out: Path, params: Path, data: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.stages.train", "--dataset", "mnist", "--arch", arch, "--data", str(data),
            "--out", str(out / "m.pt"), "--live", str(out / "live"), "--run-json", str(out / "run.json"),
            "--params", str(params)]


def run(arch: str, out: Path, params: Path, data: Path, processes: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRAIN_PROCESSES": str(processes)}
    env.pop("OMP_NUM_THREADS", None)  # torchrun gives each process one thread
    return subprocess.run(train_cmd(arch, out, params, data), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("arch", list(TOLERANCE))
def test_two_processes_train_to_the_accuracy_of_one_and_rank_0_alone_writes(arch, quick, data_root, tmp_path):
    results = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        result = run(arch, out, quick, data_root / "mnist", processes)
        assert result.returncode == 0, result.stderr[-2000:]
        assert sorted(p.name for p in out.iterdir()) == ["live", "m.pt", "run.json"]  # one set of outputs
        assert json.loads((out / "run.json").read_text())["processes"] == processes
        _, ckpt = load_checkpoint(out / "m.pt")
        assert [row["epoch"] for row in ckpt.history] == [1, 2]
        results[processes] = ckpt.history[-1]["val/accuracy"]
        assert result.stdout.count("epoch  2/2") == 1  # one process logs
    assert abs(results[1] - results[2]) <= TOLERANCE[arch], results


def worker_with_rank(parent: int, rank: int) -> int | None:
    """The pid of the descendant of `parent` that torchrun started as `rank`."""
    import psutil

    for child in psutil.Process(parent).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child.pid
        except psutil.Error:
            continue
    return None


def test_a_killed_process_ends_the_run_with_an_error_and_nothing_written(quick, data_root, tmp_path):
    raw = yaml.safe_load(quick.read_text())
    raw["train"]["epochs"] = 40  # long enough to be killed in the middle
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    env = {**os.environ, "TRAIN_PROCESSES": "2"}
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.Popen(train_cmd("cnn", out, params, data_root / "mnist"), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "live" / "metrics.json").exists():  # the first epoch is done: training is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        victim = worker_with_rank(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=180)  # bounded: no hang
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, stderr[-2000:]
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == [], sorted(out.iterdir())


def test_a_stopped_training_writes_nothing(quick, data_root, tmp_path):
    """SIGTERM (what torchrun, DVC or a user's kill sends) ends one process's training with one line, status 143,
    and no checkpoint, run facts or DVCLive folder."""
    raw = yaml.safe_load(quick.read_text())
    raw["train"]["epochs"] = 40
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    proc = subprocess.Popen(train_cmd("cnn", out, params, data_root / "mnist"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "live" / "metrics.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and stderr.strip().splitlines()[-1] == (
        "Error: stopped by SIGTERM; nothing written"), stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == []
