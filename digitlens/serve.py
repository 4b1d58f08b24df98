"""The `serve` command: the HTTP API and draw-a-digit page of digitlens/app.py (the [serve] extra) on uvicorn."""
from __future__ import annotations

import gc
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from digitlens.errors import ModelError
from digitlens.runtime import DEVICES
from digitlens.text import DISTRIBUTION, BadUsage

CONFIG_ENV = "DIGITLENS_SERVE"  # the ServeConfig as JSON, for worker processes (--workers > 1)
MB = 2**20


@dataclass(frozen=True)
class ServeConfig:
    models: tuple[str, ...]
    device: str = "cpu"
    max_bytes: int = 10 * MB  # a request body larger than this is refused (413)
    max_files: int = 64  # images per request
    max_connections: int = 64  # open connections per worker; more get 503 (uvicorn's limit_concurrency)
    head_seconds: float = 10.0  # a request's line and headers must arrive within this
    body_seconds: float = 60.0  # and its body within this of its headers (10 MB at 170 kB/s)

    @classmethod
    def from_env(cls) -> ServeConfig:
        if CONFIG_ENV not in os.environ:
            raise RuntimeError(f"{CONFIG_ENV} is not set; start the server with the serve command")
        values = json.loads(os.environ[CONFIG_ENV])
        return cls(**values | {"models": tuple(values["models"])})


def between(low: float, high: float, unit: str):
    """A click callback refusing a number outside [low, high] (NaN and infinities too, unlike FloatRange)."""

    def check(ctx, param, value: float) -> float:
        if not low <= value <= high:  # NaN fails both comparisons
            raise BadUsage(f"--{param.name.replace('_', '-')}: give a number of {unit} from {low:g} to {high:g} "
                           f"(got {value:g})")
        return value
    return check


def log_config(logger: str) -> dict:
    """uvicorn's logging, timestamped, with the app's request lines beside uvicorn's own."""
    import uvicorn

    config = json.loads(json.dumps(uvicorn.config.LOGGING_CONFIG))
    config["formatters"]["default"]["fmt"] = "%(asctime)s %(levelprefix)s %(message)s"
    config["loggers"][logger] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    config["loggers"]["python_multipart"] = {"level": "ERROR"}  # its parse errors are in the request's line
    return config


@click.command(context_settings={"help_option_names": ["-h", "--help"]},
               help="Serve exported ONNX models over HTTP: a JSON API (/v1/models, /v1/models/NAME/predict), "
                    "health checks (/healthz, /readyz), the OpenAPI schema (/openapi.json) and a page to draw "
                    "digits on or drop images onto (/). A model's name is its file name without .onnx.")
@click.option("--model", "models", required=True, multiple=True, type=click.Path(path_type=Path),
              help="An exported .onnx file; repeat for several models.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 for every interface (mind who can reach it).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Processes, each with its own copy of the models.")
@click.option("--max-upload-mb", default=ServeConfig.max_bytes / MB, show_default=True, type=float,
              callback=between(0.01, 1024, "megabytes"), help="Largest request body (0.01 to 1024); larger ones get 413.")
@click.option("--max-files", default=ServeConfig.max_files, show_default=True, type=click.IntRange(min=1),
              help="Most images in one request; more get 413.")
@click.option("--max-connections", default=ServeConfig.max_connections, show_default=True,
              type=click.IntRange(1, 10_000), help="Connections served at once per worker; a request on one more "
                                                   "gets 503.")
@click.option("--head-timeout", default=ServeConfig.head_seconds, show_default=True, type=float,
              callback=between(0.1, 3600, "seconds"),
              help="Seconds (0.1 to 3600) for a request's line and headers to arrive; a slower client is disconnected.")
@click.option("--body-timeout", default=ServeConfig.body_seconds, show_default=True, type=float,
              callback=between(0.1, 3600, "seconds"),
              help="Seconds (0.1 to 3600) for a request's body to arrive after its headers; a slower client is "
                   "disconnected.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(DEVICES),
              help="cuda needs onnxruntime-gpu; refused, not silently run on the CPU, when it is missing.")
@click.version_option(package_name=DISTRIBUTION, prog_name="serve")
def main(models, host, port, workers, max_upload_mb, max_files, max_connections, head_timeout, body_timeout,
         device) -> None:
    import uvicorn

    from digitlens.app import DeadlineHttpTools, create_app, log

    config = ServeConfig(tuple(str(p.resolve()) for p in models), device, int(max_upload_mb * MB), max_files,
                         max_connections, head_timeout, body_timeout)
    # uvicorn refuses a request once its connections (the asking one included) reach limit_concurrency
    server = {"host": host, "port": port, "log_config": log_config(log.name), "access_log": False,
              "http": DeadlineHttpTools, "limit_concurrency": max_connections + 1}
    try:
        app = create_app(config)  # also checks every model before a worker starts
    except ModelError as e:
        raise BadUsage(str(e)) from None
    click.echo(f"serving {', '.join(app.state.models)}; the page is at http://{host}:{port}/", err=True)
    if workers == 1:
        uvicorn.run(app, **server)
        return
    del app
    gc.collect()  # the app's routes refer back to it: free the supervisor's copy of the models now
    os.environ[CONFIG_ENV] = json.dumps(asdict(config))
    uvicorn.run("digitlens.app:app_from_env", factory=True, workers=workers, **server)


def cli() -> None:
    """The console script: `main`, or one line naming the extra to install when FastAPI or uvicorn is missing."""
    try:
        import uvicorn  # noqa: F401

        import digitlens.app  # noqa: F401
    except ImportError as e:
        click.echo(f"Error: serve needs the [serve] extra ({e.name} is not installed): pip install '.[serve]'",
                   err=True)
        sys.exit(1)
    main()


if __name__ == "__main__":
    cli()
