"""The GPU check (run by benchmarks/gpu-check.sh): on one CUDA device, the whole pipeline and its figures in a
few minutes, ending with one line and a non-zero status on the first failure."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["pipeline", "digitlens", "params.yaml", "dvc.yaml", ".dvc/config", ".dvcignore", ".gitignore"]


class CheckFailed(click.ClickException):
    exit_code = 1


def run(*cmd, cwd: Path, env: dict | None = None) -> str:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise CheckFailed(f"{' '.join(map(str, cmd[:4]))}... exited {result.returncode}: {tail[0]}")
    return result.stdout


def device_and_precision():
    import torch

    from pipeline.tensors import amp_dtype, pick_device, precision_label

    device = pick_device("cuda", "the GPU check")
    amp = amp_dtype("auto", device)
    click.echo(f"device     {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
               f"train.amp auto -> {precision_label(amp)}")
    return device


def quick_run(project: Path, env: dict) -> None:
    """The README's quick run of every model, on CUDA, in a throwaway git copy of the project."""
    for name in PROJECT_FILES:
        src, dst = ROOT / name, project / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    commit = ["-c", "user.name=gpu", "-c", "user.email=gpu@check", "commit", "-qm", "the project"]
    for git in (["init", "-q"], ["add", "-A"], commit):
        run("git", *git, cwd=project, env=env)
    start = time.perf_counter()
    dvc = shutil.which("dvc") or Path(sys.executable).with_name("dvc")
    run(dvc, "exp", "run", "-S", "train.epochs=1", "-S", "data.train_limit=2000", "-S", "device=cuda", cwd=project, env=env)
    reports = sorted((project / "reports").glob("*/*/metrics.json"))
    runs = [json.loads((m.parent / "run.json").read_text()) for m in reports]
    if not reports or any(not r["device"] or r["device"] == "cpu" for r in runs):
        raise CheckFailed("quick run: a model was not trained on CUDA")
    parity = [json.loads((m.parent / "parity.json").read_text()) for m in reports]
    worst = max(p["onnx"]["max_abs_diff"] for p in parity)
    click.echo(f"quick run  {len(reports)} models on CUDA ({runs[0]['precision']}) in {time.perf_counter() - start:.0f} s; "
               f"export parity of the GPU-trained models, CPU onnxruntime vs PyTorch: max |diff| {worst:.1e}, "
               f"{sum(p['onnx']['argmax_mismatches'] for p in parity)} predictions differ")


def second_epoch(net, optimizer, x, y, recipe, augment, generator, amp) -> tuple[float, int]:
    """Seconds and host-device syncs of `net`'s second training epoch (the first warms up, or compiles)."""
    import torch

    from pipeline.training import epoch_batches, train_epoch

    for epoch in range(2):
        batches = epoch_batches(len(x), recipe.batch_size, recipe.drop_last, generator, x.device)
        draws = augment.draw(len(x), generator, x.device)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as syncs:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn" if epoch else "default")
            train_epoch(net, optimizer, x, y, batches, augment, draws, amp=amp)
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    return time.perf_counter() - start, len(syncs)


def epoch_times(project: Path, device) -> None:
    """One full epoch of cnn and tuned_cnn on each data set, eager and under torch.compile: seconds, and the
    host-device syncs the eager one made."""
    import torch

    from pipeline.datasets import load_split, read_facts
    from pipeline.models import create_model
    from pipeline.params import load_params
    from pipeline.tensors import amp_dtype, full_fp32, to_inputs
    from pipeline.training import augmentation, make_optimizer

    params = load_params(ROOT / "params.yaml")
    full_fp32()  # as training does on CUDA
    for dataset in ("mnist", "fashion-mnist"):
        images, labels = load_split(project / "data" / dataset, "train")
        facts = read_facts(project / "data" / dataset)  # as training reads them
        stats = facts.stats
        for arch in ("cnn", "tuned_cnn"):
            recipe, (mean, std) = params.recipe(arch), params.normalization(arch, stats)
            x = to_inputs(images, mean, std, device).contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(labels).to(device)
            model = create_model(arch, **recipe.model_args).to(device, memory_format=torch.channels_last)
            optimizer, augment = make_optimizer(model, recipe), augmentation(params, dataset, arch, stats)
            generator, amp = torch.Generator().manual_seed(0), amp_dtype("auto", device)
            run = (optimizer, x, y, recipe, augment, generator, amp)
            seconds, syncs = second_epoch(model, *run)
            compiled, _ = second_epoch(torch.compile(model), *run)
            click.echo(f"epoch      {arch} on {dataset}: {seconds:.2f} s for {len(x):,} images "
                       f"({len(x) / seconds:,.0f} images/s), {syncs} host-device syncs; under torch.compile "
                       f"{compiled:.2f} s")


def classify_on_cuda(project: Path) -> None:
    """infer's core on CUDA against the CPU, on the 10,000 test images."""
    from digitlens import Classifier
    from pipeline.datasets import load_split

    images, labels = load_split(project / "data" / "mnist", "test")
    model = project / "artifacts" / "cnn.onnx"
    cpu, cuda = Classifier(model), Classifier(model, device="cuda")
    x = images.astype(np.float32) / 255
    p_cpu, p_cuda = cpu.probabilities(x), cuda.probabilities(x)
    differ = int((p_cpu.argmax(1) != p_cuda.argmax(1)).sum())
    click.echo(f"infer      cuda vs cpu on 10,000 test images: max |probability diff| "
               f"{np.abs(p_cpu - p_cuda).max():.1e}, {differ} predictions differ; accuracy "
               f"{100 * (p_cuda.argmax(1) == labels).mean():.2f} %")
    if differ > 5:
        raise CheckFailed(f"infer --device cuda: {differ} predictions differ from the CPU's")


@click.command(help="Run the GPU check on this machine's CUDA device (benchmarks/gpu-check.sh calls it).")
def main() -> None:
    from digitlens import ModelError
    from pipeline.common import PipelineError

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        device = device_and_precision()
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            project = Path(tmp)
            quick_run(project, env)
            epoch_times(project, device)
            click.echo("benchmark  python -m benchmarks.speed --device cuda:")
            click.echo(run(sys.executable, "-m", "benchmarks.speed", "--device", "cuda", "--data",
                           project / "data" / "mnist", "--steps", "50", "--repeats", "3", "--out", project / "bench.json",
                           cwd=ROOT, env=env).rstrip())
            classify_on_cuda(project)
    except (PipelineError, ModelError) as e:
        raise CheckFailed(str(e)) from None
    click.echo("gpu-check: every step passed")


if __name__ == "__main__":
    main()
