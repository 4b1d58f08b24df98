"""Where the quick run's time goes: `dvc exp run -S train.epochs=1 -S data.train_limit=2000` in a fresh clone of
this checkout's HEAD, every stage command timed, summed per stage kind, and DVC's own time (the rest).

    python -m benchmarks.quickrun                     # clone HEAD into a temporary folder, time the quick run there
    python -m benchmarks.quickrun --keep /tmp/qr      # ... and keep the clone

Each stage's `python` is a shim (first on PATH) that records the command's wall time. Take the figures on a quiet
machine: a second busy process on 2 cores can double them.
"""
from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["-S", "train.epochs=1", "-S", "data.train_limit=2000"]
SHIM = """#!/bin/sh
start=$(date +%s.%N)
"{python}" "$@"
rc=$?
echo "$start $(date +%s.%N) $*" >> "{log}"
exit $rc
"""


def stage_kind(args: str) -> str:
    """'-m pipeline.stages.train --dataset ...' -> 'train'."""
    words = args.split()
    return words[words.index("-m") + 1].rsplit(".", 1)[-1] if "-m" in words else words[0]


@click.command(help="Time the quick run (one epoch on 2,000 images, every model) in a fresh clone of HEAD.")
@click.option("--mirror", type=click.Path(exists=True, file_okay=False), default=str(ROOT.parent / "shared" / "datasets"),
              show_default=True, help="The data sets' local mirror ($DATASET_MIRROR).")
@click.option("--keep", type=click.Path(file_okay=False), help="Clone here and keep it (default: a temporary folder).")
def main(mirror: str, keep: str | None) -> None:
    work = Path(keep or tempfile.mkdtemp(prefix="quickrun-"))
    clone, shims, log = work / "repo", work / "bin", work / "stages.log"
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        shims.mkdir(parents=True, exist_ok=True)
        (shims / "python").write_text(SHIM.format(python=sys.executable, log=log))
        (shims / "python").chmod(0o755)
        env = {**os.environ, "PATH": f"{shims}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               "DATASET_MIRROR": str(Path(mirror).resolve())}
        start = time.perf_counter()
        result = subprocess.run(["dvc", "exp", "run", *QUICK], cwd=clone, env=env, capture_output=True, text=True)
        total = time.perf_counter() - start
        if result.returncode:
            raise click.ClickException(f"the quick run failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
        kinds: dict[str, list[float]] = collections.defaultdict(list)
        for line in log.read_text().splitlines():
            begin, end, args = line.split(" ", 2)
            kinds[stage_kind(args)].append(float(end) - float(begin))
        stages = sum(len(t) for t in kinds.values())
        in_stages = sum(sum(t) for t in kinds.values())
        print(f"quick run: {total:.0f} s wall, {stages} stages ({' '.join(QUICK)})")
        print(f"{'stage kind':<12} {'stages':>6} {'total s':>8} {'mean s':>7}")
        for kind, times in kinds.items():
            print(f"{kind:<12} {len(times):>6} {sum(times):>8.1f} {sum(times) / len(times):>7.2f}")
        print(f"{'DVC itself':<12} {'':>6} {total - in_stages:>8.1f} {(total - in_stages) / stages:>7.2f}  (per stage)")
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
