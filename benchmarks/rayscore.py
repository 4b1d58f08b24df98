"""Images per second of `infer-ray` (Ray Data, a local instance) against `infer` (one process) on the same PNG files.

    python -m benchmarks.rayscore                       # 10,000 MNIST test digits as PNGs, tuned_cnn
    python -m benchmarks.rayscore --images 2000 --model artifacts/cnn.onnx

Both commands run as a user would run them (fresh processes, start-up included) on the same files; the figures
say how much of Ray's time is starting it. Take them on a quiet machine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
from PIL import Image

from pipeline.datasets import load_split

BIN = Path(sys.executable).parent


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    return time.perf_counter() - start, result


@click.command(help="Time infer and infer-ray on the same folder of PNG digits.")
@click.option("--images", "count", default=10_000, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--model", default="artifacts/tuned_cnn.onnx", show_default=True, type=click.Path(exists=True))
@click.option("--data", "data_dir", default="data/mnist", show_default=True, type=click.Path(exists=True))
def main(count: int, model: str, data_dir: str) -> None:
    with tempfile.TemporaryDirectory(prefix="rayscore-") as work:
        folder = Path(work) / "images"
        folder.mkdir()
        for i, image in enumerate(load_split(data_dir, "test")[0][:count]):
            Image.fromarray(255 - image).save(folder / f"{i:05d}.png")  # dark on light, as people's are
        infer_s, infer_run = timed([str(BIN / "infer"), str(folder), "--model", model, "--format", "json"])
        if infer_run.returncode:
            raise click.ClickException(f"infer failed: {infer_run.stderr[-500:]}")
        out = Path(work) / "ray.jsonl"
        ray_s, ray_run = timed([str(BIN / "infer-ray"), str(folder), "--model", model, "--out", str(out)])
        if ray_run.returncode:
            raise click.ClickException(f"infer-ray failed: {ray_run.stderr[-500:]}")
        expected = {r["file"]: r["predictions"] for r in json.loads(infer_run.stdout)}
        got = {r["file"]: r["predictions"] for r in map(json.loads, out.read_text().splitlines())}
        same = got == expected
        start_s, _ = timed([sys.executable, "-c", "import ray; ray.init(include_dashboard=False); ray.shutdown()"])
    click.echo(f"{count:,} PNG files, {Path(model).name}, {os.cpu_count()} CPUs")
    click.echo(f"  infer      {infer_s:6.1f} s  {count / infer_s:7.0f} images/s")
    click.echo(f"  infer-ray  {ray_s:6.1f} s  {count / ray_s:7.0f} images/s  (starting and stopping Ray alone: "
               f"{start_s:.1f} s; without it {count / max(ray_s - start_s, 1e-9):.0f} images/s)")
    click.echo(f"  the same predictions: {'yes' if same else 'NO'}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
