"""A load benchmark of `serve`: start it on a free port, post single-image PNGs from concurrent clients, report."""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import click
import numpy as np

from digitlens.app import CANVAS_SIDE, SESSION_THREADS

START_TIMEOUT = 120  # seconds for the server to load its models and answer /readyz
WARMUP = 50  # requests sent before the measurement (and the first memory reading)
API_RUNS = 300  # Classifier.predict calls timed in this process, for the server's overhead
# What `cnn` should reach on a quiet 2-core machine (docs/serve.md)
TARGET_RATE, TARGET_P99_MS, TARGET_GROWTH_MB = 300, 100, 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(models: Sequence[str | os.PathLike], args: Sequence[str] = (),
                   log: str | os.PathLike | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """(base URL, process) of `serve` started on a free 127.0.0.1 port and answering /readyz; stopped on exit,
    its workers with it. Its output goes to `log` (default: discarded)."""
    port = free_port()
    command = [sys.executable, "-m", "digitlens.serve", "--port", str(port), *args]
    for m in models:
        command += ["--model", str(m)]
    url = f"http://127.0.0.1:{port}"
    with open(log or os.devnull, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with status {proc.returncode} before it was ready"
                                   + (f"; see {log}" if log else ""))
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/readyz", timeout=1) as r:
                if r.status == 200:  # (an error status raises HTTPError, an OSError)
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"serve was not ready after {START_TIMEOUT} s")
            time.sleep(0.1)
        yield url, proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (uvicorn shuts its workers down), then SIGKILL to the process group if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what it started
    proc.wait()


def server_processes(pid: int) -> list:
    """The server and its workers, as psutil processes."""
    import psutil

    server = psutil.Process(pid)
    return [server, *server.children(recursive=True)]


def rss_mb(pid: int) -> float:
    """Resident memory of the server and its workers, in MB."""
    return sum(p.memory_info().rss for p in server_processes(pid)) / 2**20


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of the server and its workers so far."""
    return sum(t.user + t.system for t in (p.cpu_times() for p in server_processes(pid)))


def api_cpu_ms(model: str, pngs: list[bytes], threads: int | None, runs: int = API_RUNS) -> float:
    """CPU milliseconds of one `Classifier.predict` of one of `pngs` in this process, with `threads` onnxruntime
    threads (None: its default, spinning): the work the server adds HTTP to."""
    from digitlens import Classifier

    clf = Classifier(model, threads=threads)
    for png in pngs:
        clf.predict(png)
    cpu = time.process_time()
    for i in range(runs):
        clf.predict(pngs[i % len(pngs)])
    return 1000 * (time.process_time() - cpu) / runs


def digit_pngs() -> list[bytes]:
    """The ten digits drawn white on black on the page's canvas, as the page sends them."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=200)
    out = []
    for d in range(10):
        img = Image.new("L", (CANVAS_SIDE, CANVAS_SIDE), 0)
        ImageDraw.Draw(img).text((CANVAS_SIDE / 2, CANVAS_SIDE / 2), str(d), fill=255, font=font, anchor="mm")
        buf = io.BytesIO()
        img.save(buf, "PNG")
        out.append(buf.getvalue())
    return out


async def load(url: str, pngs: list[bytes], requests: int, concurrency: int, max_seconds: float) -> dict:
    """Send `requests` single-image posts (at most `max_seconds`) from `concurrency` clients; latencies in ms.
    aiohttp, not httpx: it costs the client a third of the CPU per request, which the server shares here."""
    import aiohttp

    latencies, errors, sent = [], [], 0
    deadline = time.perf_counter() + max_seconds

    async def client(session):
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            form = aiohttp.FormData()
            form.add_field("files", pngs[sent % len(pngs)], filename="digit.png", content_type="image/png")
            sent += 1
            start = time.perf_counter()
            try:
                async with session.post(url, data=form) as r:
                    body = await r.read()
            except (TimeoutError, aiohttp.ClientError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            if r.status != 200:
                errors.append(f"status {r.status}: {body[:200].decode('utf-8', 'replace')}")
                continue
            latencies.append(1000 * (time.perf_counter() - start))

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"latencies": latencies, "errors": errors, "seconds": seconds, "client_cpu": cpu}


def report(run: dict, rss_before: float, rss_after: float, server_cpu: float, api_ms: float, api_one_ms: float) -> str:
    lat = np.array(run["latencies"] or [float("nan")])
    p50, p95, p99 = np.percentile(lat, [50, 95, 99])
    lines = [
        f"requests   {len(run['latencies']) + len(run['errors'])} in {run['seconds']:.1f} s: "
        f"{len(run['latencies']) / run['seconds']:.0f} requests/s answered 200",
        f"latency    p50 {p50:.1f} ms  p95 {p95:.1f} ms  p99 {p99:.1f} ms  max {lat.max():.1f} ms",
        f"client     {1000 * run['client_cpu'] / max(1, len(run['latencies'])):.2f} ms CPU per request (this "
        "machine's CPUs also ran the client)",
        f"server     {1000 * server_cpu / max(1, len(run['latencies'])):.2f} ms CPU per request; "
        f"Classifier.predict of the same images {api_ms:.2f} ms CPU in this process "
        f"(server / API: {1000 * server_cpu / max(1, len(run['latencies'])) / api_ms:.2f}x)",
        f"           with one thread, as the server's sessions: {api_one_ms:.2f} ms "
        f"(server / API: {1000 * server_cpu / max(1, len(run['latencies'])) / api_one_ms:.2f}x)",
        f"errors     {len(run['errors'])}" + (f" (first: {run['errors'][0]})" if run["errors"] else ""),
        f"server RSS {rss_before:.0f} MB before, {rss_after:.0f} MB after ({rss_after - rss_before:+.0f} MB)",
    ]
    rate = len(run["latencies"]) / run["seconds"]
    met = rate >= TARGET_RATE and p99 < TARGET_P99_MS and not run["errors"] and rss_after - rss_before < TARGET_GROWTH_MB
    lines.append(f"targets    >= {TARGET_RATE} requests/s, p99 < {TARGET_P99_MS} ms, 0 errors, memory growth < "
                 f"{TARGET_GROWTH_MB} MB (cnn, a quiet 2-core machine): {'met' if met else 'NOT met'}")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]},
               help="Benchmark `serve`: start it on a free 127.0.0.1 port, post single-image PNG requests (digits "
                    "white on black on the page's 280x280 canvas) from concurrent clients, and print requests/s, latency "
                    "percentiles, the server's CPU per request against the Python API's, errors and the server's "
                    "memory before and after.")
@click.option("--model", "models", required=True, multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="An exported .onnx file; the first one is the one posted to.")
@click.option("--requests", default=5000, show_default=True, type=click.IntRange(min=1))
@click.option("--concurrency", default=8, show_default=True, type=click.IntRange(min=1), help="Clients at once.")
@click.option("--max-seconds", default=120.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Stop sending after this long, however many requests were sent.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1), help="serve --workers.")
def main(models, requests, concurrency, max_seconds, workers) -> None:
    for module, extra in (("aiohttp", "test"), ("uvicorn", "serve"), ("fastapi", "serve")):
        if importlib.util.find_spec(module) is None:
            raise click.ClickException(f"the load test needs {module}: pip install '.[{extra}]'")
    pngs = digit_pngs()
    name = Path(models[0]).stem
    with tempfile.NamedTemporaryFile(prefix="serve-", suffix=".log", delete=False) as f:
        log = f.name
    try:
        with running_server(models, ["--workers", str(workers)], log=log) as (url, proc):
            predict = f"{url}/v1/models/{name}/predict"
            asyncio.run(load(predict, pngs, WARMUP, concurrency, max_seconds))
            before, cpu = rss_mb(proc.pid), cpu_seconds(proc.pid)
            run = asyncio.run(load(predict, pngs, requests, concurrency, max_seconds))
            after, cpu = rss_mb(proc.pid), cpu_seconds(proc.pid) - cpu
        api_ms, api_one_ms = (api_cpu_ms(models[0], pngs, t) for t in (None, SESSION_THREADS))  # the server stopped
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"serve {name}, {workers} worker(s), {concurrency} concurrent clients, {os.cpu_count()} CPUs "
               f"(server log: {log})")
    click.echo(report(run, before, after, cpu, api_ms, api_one_ms))
    sys.exit(1 if run["errors"] else 0)


if __name__ == "__main__":
    main()
