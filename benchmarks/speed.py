"""Benchmark: training and inference throughput of the pipeline against the reference recipes' loop, and cold `infer`."""
from __future__ import annotations

import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch
from torch.utils.data import DataLoader

from digitlens.metadata import IMAGE_SIZE, INPUT_NAME, OUTPUT_NAME, ModelInfo
from digitlens.runtime import onnx_session
from pipeline.common import stage_command, table, write_json
from pipeline.conversion import to_onnx, to_torchscript
from pipeline.datasets import DATASETS, dataset_info, load_split, read_facts
from pipeline.models import MODELS, create_model
from pipeline.params import Params, load_params
from pipeline.reference import reference_dataset, reference_train_steps, reference_transform
from pipeline.tensors import amp_dtype, device_name, full_fp32, pick_device, precision_label, to_inputs
from pipeline.training import augmentation, epoch_batches, make_optimizer, train_epoch

# ---------------------------------------------------------------------------- timing helpers

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def training_throughput(params: Params, dataset: str, arch: str, data_dir: Path, device: torch.device,
                        steps: int, repeats: int) -> dict:
    """Images/s of the pipeline's loop and of the reference loop, alternated, medians over repeats."""
    recipe = params.recipe(arch)
    facts = read_facts(data_dir)  # the data stage's pixel statistics, as training reads them
    stats = facts.stats
    mean, std = params.normalization(arch, stats)
    images, labels = load_split(data_dir, "train")
    x, y = to_inputs(images, mean, std, device), torch.from_numpy(labels).to(device)
    augment = augmentation(params, dataset, arch, stats)
    channels_last = params.train.channels_last
    amp = amp_dtype(params.train.amp, device)
    if device.type == "cuda":
        full_fp32()  # as training: "fp32" is IEEE float32, not TF32
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    loader = DataLoader(reference_dataset(dataset, data_dir, True, reference_transform(params, dataset, arch, stats)),
                        batch_size=recipe.batch_size, shuffle=True, drop_last=recipe.drop_last)
    generator = torch.Generator().manual_seed(params.seed)

    def fresh(memory_format=torch.contiguous_format):
        model = create_model(arch, **recipe.model_args).to(device, memory_format=memory_format)
        return model, make_optimizer(model, recipe)

    def pipeline_run(dtype=amp):
        batches = epoch_batches(len(x), recipe.batch_size, recipe.drop_last, generator, device)[:steps]
        draws = augment.draw(len(x), generator, device)  # a whole epoch's, as training draws them
        model, optimizer = fresh(torch.channels_last if channels_last else torch.contiguous_format)
        train_epoch(model, optimizer, x, y, batches, augment, draws, amp=dtype)

    def reference_run():  # the reference scripts' model: default memory format
        reference_train_steps(*fresh(), loader, device, steps)

    # the pipeline as configured, the same loop in float32 (when autocast is on), the reference loop
    runs = {"pipeline": pipeline_run}
    if amp is not None:
        runs["pipeline_fp32"] = lambda: pipeline_run(None)
    runs["reference_loop"] = reference_run
    for fn in runs.values():  # warm-up: allocator, kernels, DataLoader
        fn()
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            seconds[name].append(timed(fn, device))
    img_s = {name: steps * recipe.batch_size / statistics.median(t) for name, t in seconds.items()}
    parts = [("flip", augment.hflip), ("warp", augment.warps), ("erase", augment.erase)]
    row = {"batch_size": recipe.batch_size, "precision": precision_label(amp), "steps": steps,
           "augment": "+".join(name for name, on in parts if on) or "none"}
    row |= {f"{name}_img_s": round(v) for name, v in img_s.items()}
    row["ratio"] = round(img_s["pipeline"] / img_s["reference_loop"], 2)
    if amp is not None:
        row["ratio_fp32"] = round(img_s["pipeline_fp32"] / img_s["reference_loop"], 2)
    return row


def inference_throughput(arch: str, batch: int, device: torch.device, seconds: float, repeats: int) -> dict:
    """Images/s of eager PyTorch, TorchScript and onnxruntime (CPU provider) at one batch size."""
    model = create_model(arch).eval()
    scripted = to_torchscript(model)
    info = ModelInfo("mnist", arch, dataset_info("mnist").classes, 0.0, 1.0, "digit")
    session = onnx_session(to_onnx(model, info).SerializeToString())
    x = torch.rand(batch, 1, IMAGE_SIZE, IMAGE_SIZE)
    x_np = x.numpy()
    model_dev, scripted_dev, x_dev = model.to(device), scripted.to(device), x.to(device)

    def eager():
        with torch.inference_mode():
            model_dev(x_dev)

    def script():
        with torch.inference_mode():
            scripted_dev(x_dev)

    def ort():
        session.run([OUTPUT_NAME], {INPUT_NAME: x_np})

    runners = {"eager": eager, "torchscript": script, "onnxruntime": ort}
    calls = {}
    for name, fn in runners.items():  # warm up, then calibrate calls per timing to about `seconds`
        for _ in range(3):
            fn()
        once = timed(lambda fn=fn: [fn() for _ in range(5)], device) / 5
        calls[name] = max(1, int(seconds / max(once, 1e-6)))
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            n = calls[name]
            times[name].append(timed(lambda fn=fn, n=n: [fn() for _ in range(n)], device) / n)
    return {name: round(batch / statistics.median(t)) for name, t in times.items()}


def cold_infer(model_path: Path, runs: int) -> dict:
    """Wall time of a fresh `infer one.png` process, and of `python -c 'import onnxruntime'` for scale."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "digit.png"
        canvas = np.full((200, 200), 255, np.uint8)
        canvas[60:140, 90:100] = 0  # a dark "1" on white paper
        Image.fromarray(canvas).save(png)
        infer = [str(Path(sys.executable).with_name("infer")), str(png), "--model", str(model_path)]
        baseline = [sys.executable, "-c", "import onnxruntime"]
        subprocess.run(infer, check=True, capture_output=True)  # warm the file cache
        result = {"infer_s": [], "import_onnxruntime_s": []}
        for _ in range(runs):
            for key, cmd in (("infer_s", infer), ("import_onnxruntime_s", baseline)):
                start = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True)
                result[key].append(time.perf_counter() - start)
    return {key: round(statistics.median(v), 3) for key, v in result.items()}


@click.command(help="Measure training and inference throughput on this machine; print tables and write JSON.")
@click.option("--data", "data_dir", default="data/mnist", show_default=True, type=click.Path(exists=True, file_okay=False),
              help="A data set folder written by the data stage.")
@click.option("--dataset", default="mnist", show_default=True, type=click.Choice(list(DATASETS)))
@click.option("--arch", "archs", multiple=True, type=click.Choice(list(MODELS)), help="Default: every architecture.")
@click.option("--steps", default=100, show_default=True, help="Training batches per timed run.")
@click.option("--repeats", default=5, show_default=True, help="Timed runs per loop (alternated); medians reported.")
@click.option("--device", "device_choice", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--infer-model", type=click.Path(dir_okay=False), help="ONNX file for the cold `infer` timing "
              "(default: artifacts/cnn.onnx when it exists; skipped otherwise).")
@click.option("--out", default="bench/results.json", show_default=True, type=click.Path(dir_okay=False))
@stage_command
def main(data_dir, dataset, archs, steps, repeats, device_choice, infer_model, out) -> None:
    params = load_params()
    device = pick_device(device_choice, "--device")
    archs = list(archs) or list(MODELS)
    env = {"device": device_name(device),
           "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
    print(f"benchmark on {env['device']} ({env['cpu_threads']} CPU threads), torch {env['torch']}", flush=True)

    training = []
    for arch in archs:
        row = {"arch": arch} | training_throughput(params, dataset, arch, Path(data_dir), device, steps, repeats)
        training.append(row)
        print(f"  training {arch}: {row['ratio']}x", file=sys.stderr, flush=True)
    print("\ntraining throughput (images/s, recipe batch size; reference loop = torchvision dataset + per-sample "
          "transforms + DataLoader)")
    print(table(training, ["arch", "batch_size", "precision", "pipeline_img_s", "pipeline_fp32_img_s",
                           "reference_loop_img_s", "ratio", "ratio_fp32", "augment"]))

    inference = []
    for arch in archs:
        for batch in (1, 256):
            inference.append({"arch": arch, "batch": batch} | inference_throughput(arch, batch, device, 0.2, repeats))
    print("\ninference throughput (images/s; onnxruntime on its CPU provider)")
    print(table(inference, ["arch", "batch", "eager", "torchscript", "onnxruntime"]))

    results = {"environment": env, "training": training, "inference": inference}
    model_path = Path(infer_model) if infer_model else Path("artifacts/cnn.onnx")
    if model_path.exists():
        results["cold_infer"] = cold_infer(model_path, runs=10) | {"model": str(model_path)}
        print(f"\ncold `infer` of one PNG: {results['cold_infer']['infer_s']:.3f} s median of 10 "
              f"(python -c 'import onnxruntime': {results['cold_infer']['import_onnxruntime_s']:.3f} s)")
    else:
        print(f"\ncold `infer`: skipped, {model_path} not found (run `dvc repro` or pass --infer-model)")
    write_json(out, results)
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
