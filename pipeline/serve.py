"""The `serve` command: an HTTP API and a draw-a-digit page over exported models (a thin layer over Classifier)."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import click
import numpy as np

from pipeline.classifier import Classifier, Result
from pipeline.common import DISTRIBUTION, BadUsage, first_line, shown
from pipeline.datasets import IMAGE_SIZE
from pipeline.images import ImageError
from pipeline.runtime import DEVICES, ModelError

try:
    import anyio.to_thread
    import python_multipart
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from python_multipart.multipart import parse_options_header
    from starlette.exceptions import HTTPException
except ImportError as e:  # the [serve] extra is not installed: `cli` says so in one line
    MISSING: str | None = e.name
else:
    MISSING = None

CONFIG_ENV = "DIGITLENS_SERVE"  # the ServeConfig as JSON, for worker processes (--workers > 1)
FILES_FIELD = "files"
MB = 2**20
MAX_CONCURRENT = os.cpu_count() or 2
log = logging.getLogger("pipeline.serve")


@dataclass(frozen=True)
class ServeConfig:
    models: tuple[str, ...]
    device: str = "cpu"
    max_bytes: int = 10 * MB  # a request body larger than this is refused (413)
    max_files: int = 64  # images per request

    @classmethod
    def from_env(cls) -> ServeConfig:
        if CONFIG_ENV not in os.environ:
            raise RuntimeError(f"{CONFIG_ENV} is not set; start the server with the serve command")
        values = json.loads(os.environ[CONFIG_ENV])
        return cls(**values | {"models": tuple(values["models"])})


def load_models(config: ServeConfig) -> dict[str, Classifier]:
    """name (the file stem) -> Classifier; raises ModelError naming the file."""
    models: dict[str, Classifier] = {}
    for path in config.models:
        try:
            clf = Classifier(path, config.device)
        except ModelError as e:
            raise ModelError(f"{shown(path)}: {e}") from None
        if clf.name in models:
            raise ModelError(f"two models are named {clf.name!r} ({models[clf.name].path}, {path}); rename one")
        models[clf.name] = clf
    return models


class ApiError(Exception):
    """An answer other than 200: its status and a one-line message (plus the per-file records, if any)."""

    def __init__(self, status: int, message: str, results: list[dict] | None = None):
        super().__init__(message)
        self.status, self.message, self.results = status, message, results


def parse_top_k(value) -> int:
    """A positive integer from a query or form string, or a JSON number; else 422."""
    if isinstance(value, str):
        try:
            value = int(value.strip()) if value.strip().isascii() else value
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(422, f"top_k must be a positive integer (got {value!r})")
    return value


def multipart_parts(body: bytes, content_type: str) -> list[tuple[str, str | None, bytes]]:
    """(field name, file name or None for a plain field, content) of each part of a multipart/form-data body."""
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise ApiError(400, "multipart body without a boundary in its Content-Type")
    parts: list[dict] = []
    field, value, ended = bytearray(), bytearray(), []

    def header_end() -> None:
        parts[-1]["headers"][bytes(field).lower()] = bytes(value)
        field.clear()
        value.clear()

    callbacks = {
        "on_part_begin": lambda: parts.append({"headers": {}, "data": bytearray()}),
        "on_header_field": lambda data, start, end: field.extend(data[start:end]),
        "on_header_value": lambda data, start, end: value.extend(data[start:end]),
        "on_header_end": header_end,
        "on_part_data": lambda data, start, end: parts[-1]["data"].extend(data[start:end]),
        "on_end": lambda: ended.append(True),
    }
    try:
        python_multipart.MultipartParser(boundary, callbacks).write(body)
    except Exception as e:  # noqa: BLE001 - python-multipart's parse errors
        raise ApiError(400, f"malformed multipart body ({first_line(e)})") from None
    if not ended:
        raise ApiError(400, "incomplete multipart body (no closing boundary): was the upload cut short?")
    found = []
    for part in parts:
        options = parse_options_header(part["headers"].get(b"content-disposition", b""))[1]
        name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        found.append((name, None if filename is None else filename.decode("utf-8", "replace"), bytes(part["data"])))
    return found


def json_array(value) -> np.ndarray | ImageError:
    """One image of a JSON body: 28x28 numbers in [0, 1], light on dark (the range is checked by Classifier)."""
    try:
        a = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        return ImageError(f"not a {IMAGE_SIZE}x{IMAGE_SIZE} array of numbers")
    if a.shape != (IMAGE_SIZE, IMAGE_SIZE):
        return ImageError(f"array of shape {list(a.shape)}; give {IMAGE_SIZE}x{IMAGE_SIZE} numbers in [0, 1]")
    return a


def too_many(count: int, max_files: int) -> None:
    if count > max_files:
        raise ApiError(413, f"{count} images in one request; the limit is {max_files}")


def request_inputs(body: bytes, content_type: str, max_files: int) -> tuple[list[tuple[str, object]], object, bool]:
    """(name, source) pairs, the top_k given in the body (or None), and whether the inputs are raw."""
    if content_type.lower().startswith("multipart/form-data"):
        parts = multipart_parts(body, content_type)
        files = [(filename or "<file>", data) for field, filename, data in parts if field == FILES_FIELD
                 and filename is not None]
        if not files:
            others = sorted({field for field, filename, _ in parts if filename is not None})
            hint = f" (found files in {', '.join(map(repr, others))})" if others else ""
            raise ApiError(400, f"no file in the form field {FILES_FIELD!r}{hint}")
        too_many(len(files), max_files)
        top_k = next((data.decode("utf-8", "replace") for field, filename, data in parts
                      if field == "top_k" and filename is None), None)
        return files, top_k, False
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ApiError(400, f"body is not valid JSON ({first_line(e)})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) or not doc["images"]:
        raise ApiError(400, 'give {"images": [one or more 28x28 arrays of numbers in [0, 1]], "top_k": k}')
    too_many(len(doc["images"]), max_files)
    return [(f"images[{i}]", json_array(v)) for i, v in enumerate(doc["images"])], doc.get("top_k"), True


def predict(clf: Classifier, body: bytes, content_type: str, top_k, max_files: int) -> list[dict]:
    """The records of `infer --format json` for the images of one request (run in a worker thread)."""
    inputs, body_top_k, raw = request_inputs(body, content_type, max_files)
    given = top_k if top_k is not None else body_top_k  # the query's, else the form's or JSON's
    top_k = 1 if given is None else parse_top_k(given)
    good = [(name, source) for name, source in inputs if not isinstance(source, ImageError)]
    classified = iter(clf.classify([s for _, s in good], top_k, raw, names=[n for n, _ in good]))
    results = [Result(name, error=str(s)) if isinstance(s, ImageError) else next(classified) for name, s in inputs]
    records = [r.to_dict() for r in results]
    if not any(r.ok for r in results):
        first = results[0]
        what = f"{first.source}: {first.error}" if len(results) == 1 else \
            f"none of the {len(results)} images is usable (first, {first.source}: {first.error})"
        raise ApiError(400, what, records)
    return records


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) by its Content-Length or, when that lies or is absent, while reading."""
    declared = request.headers.get("content-length", "")
    too_large = f"request body over the {limit / MB:.3g} MB limit"
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, too_large)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, too_large)
        chunks.append(chunk)
    return b"".join(chunks)


class AccessLog:
    """ASGI middleware: one log line per request (client, method, path, status, time, and why, if it failed)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            client = scope.get("client") or ("-", 0)
            why = scope.get("state", {}).get("error")
            log.info("%s:%s \"%s %s\" %d %.1f ms%s", client[0], client[1], scope["method"], scope["path"],
                     status[0], 1000 * (time.perf_counter() - start), f": {why}" if why else "")


def error_response(request: Request, status: int, message: str, **extra) -> JSONResponse:
    request.state.error = message
    return JSONResponse({"error": message, **extra}, status)


PREDICT_DOC = {
    "parameters": [{"name": "top_k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1},
                    "description": "classes per image, most probable first (default 1; also a form or JSON field)"}],
    "requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": [FILES_FIELD], "properties": {
            FILES_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}},
            "top_k": {"type": "integer", "minimum": 1}}}},
        "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
            "images": {"type": "array", "description": "28x28 arrays, values in [0, 1], light on dark (MNIST form)",
                       "items": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}},
            "top_k": {"type": "integer", "minimum": 1}}}},
    }},
}
ERROR_DOC = {"content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}, "results": {"type": "array"}}}}}}
PREDICT_RESPONSES = {
    200: {"description": "one record per image: its predictions, or its error"},
    400: ERROR_DOC | {"description": "no usable image (each one's error in `results`), or a malformed body"},
    404: ERROR_DOC | {"description": "no such model"},
    413: ERROR_DOC | {"description": "body over the size limit, or too many images"},
    415: ERROR_DOC | {"description": "neither multipart/form-data nor application/json"},
    422: ERROR_DOC | {"description": "bad top_k"},
}


def create_app(config: ServeConfig) -> FastAPI:
    """The app, its models loaded (one onnxruntime session each, shared by all requests)."""
    models = load_models(config)
    page = (resources.files("pipeline") / "static" / "index.html").read_text(encoding="utf-8")
    # docs_url and redoc_url would load Swagger UI / ReDoc from a CDN; the schema stays at /openapi.json
    app = FastAPI(title="digitlens", version="1", docs_url=None, redoc_url=None,
                  description="Classify images with exported MNIST / Fashion-MNIST models.")
    app.state.models = models
    app.add_middleware(AccessLog)
    # Requests decoded and classified at once: one per core keeps the CPUs busy, and bounds memory at
    # MAX_CONCURRENT x the ~300 MB one image may take while it is prepared (docs/serve.md)
    model_work = anyio.CapacityLimiter(MAX_CONCURRENT)

    def model(name: str) -> Classifier:
        if name not in models:
            raise ApiError(404, f"no model {name!r}; loaded: {', '.join(models)}")
        return models[name]

    def describe(name: str) -> dict:
        return {"name": name, **models[name].info.to_dict()}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(request, e.status, e.message, **({"results": e.results} if e.results else {}))

    @app.exception_handler(HTTPException)  # Starlette's own: no such path (404), wrong method (405)
    async def http_error(request: Request, e: HTTPException):
        response = error_response(request, e.status_code, str(e.detail))
        response.headers.update(e.headers or {})
        return response

    @app.exception_handler(ModelError)
    async def model_failed(request: Request, e: ModelError):
        return error_response(request, 500, f"the model failed: {e}")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):  # uvicorn logs the traceback
        return error_response(request, 500, f"internal error ({type(e).__name__})")

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page, headers={"Content-Security-Policy":
                                           "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
                                           "img-src 'self' blob: data:"})

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: the models are loaded")
    async def readyz():  # the app exists only once every model has loaded, so answering means ready
        return {"status": "ready", "models": list(models)}

    @app.get("/v1/models", summary="The loaded models and their metadata")
    async def list_models():
        return {"models": [describe(name) for name in models]}

    @app.get("/v1/models/{name}", summary="One model's metadata", responses={404: ERROR_DOC})
    async def one_model(name: str):
        return describe(model(name).name)

    @app.post("/v1/models/{name}/predict", summary="Classify images", openapi_extra=PREDICT_DOC,
              responses=PREDICT_RESPONSES)
    async def predict_route(name: str, request: Request):
        clf = model(name)
        content_type = request.headers.get("content-type", "")  # the multipart boundary is case-sensitive
        if not content_type.lower().startswith(("multipart/form-data", "application/json")):
            raise ApiError(415, f"send multipart/form-data (field {FILES_FIELD!r}) or application/json "
                                f"(field 'images'), not {content_type or 'no Content-Type'}")
        top_k = request.query_params.get("top_k")
        if top_k is not None:
            top_k = parse_top_k(top_k)  # before reading the body
        body = await read_body(request, config.max_bytes)
        records = await anyio.to_thread.run_sync(predict, clf, body, content_type, top_k, config.max_files,
                                                 limiter=model_work)
        return JSONResponse(records)

    return app


def app_from_env() -> FastAPI:
    """The app factory each worker process calls (uvicorn --factory), the config read from CONFIG_ENV."""
    return create_app(ServeConfig.from_env())


def log_config() -> dict:
    """uvicorn's logging, timestamped, with this module's request lines beside uvicorn's own."""
    config = json.loads(json.dumps(uvicorn.config.LOGGING_CONFIG))
    config["formatters"]["default"]["fmt"] = "%(asctime)s %(levelprefix)s %(message)s"
    config["loggers"][log.name] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    config["loggers"]["python_multipart"] = {"level": "ERROR"}  # its parse errors are in the request's line
    return config


@click.command(context_settings={"help_option_names": ["-h", "--help"]},
               help="Serve exported ONNX models over HTTP: a JSON API (/v1/models, /v1/models/NAME/predict), "
                    "health checks (/healthz, /readyz), the OpenAPI schema (/openapi.json) and a page to draw "
                    "digits on (/). A model's name is its file name without .onnx.")
@click.option("--model", "models", required=True, multiple=True, type=click.Path(path_type=Path),
              help="An exported .onnx file; repeat for several models.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 for every interface (mind who can reach it).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Processes, each with its own copy of the models.")
@click.option("--max-upload-mb", default=ServeConfig.max_bytes / MB, show_default=True,
              type=click.FloatRange(min=0, min_open=True), help="Largest request body; larger ones get 413.")
@click.option("--max-files", default=ServeConfig.max_files, show_default=True, type=click.IntRange(min=1),
              help="Most images in one request; more get 413.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(DEVICES),
              help="cuda needs onnxruntime-gpu; refused, not silently run on the CPU, when it is missing.")
@click.version_option(package_name=DISTRIBUTION, prog_name="serve")
def main(models, host, port, workers, max_upload_mb, max_files, device) -> None:
    config = ServeConfig(tuple(str(p.resolve()) for p in models), device, int(max_upload_mb * MB), max_files)
    try:
        app = create_app(config)  # also checks every model before a worker starts
    except ModelError as e:
        raise BadUsage(str(e)) from None
    click.echo(f"serving {', '.join(app.state.models)}; the page is at http://{host}:{port}/", err=True)
    if workers == 1:
        uvicorn.run(app, host=host, port=port, log_config=log_config(), access_log=False)
        return
    del app
    os.environ[CONFIG_ENV] = json.dumps(asdict(config))
    uvicorn.run("pipeline.serve:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_config=log_config(), access_log=False)


def cli() -> None:
    """The console script: `main`, or one line naming the extra to install when FastAPI or uvicorn is missing."""
    if MISSING:
        click.echo(f"Error: serve needs the [serve] extra ({MISSING} is not installed): pip install '.[serve]'",
                   err=True)
        sys.exit(1)
    main()


if __name__ == "__main__":
    cli()
