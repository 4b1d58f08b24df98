"""The HTTP API and the draw-a-digit page of `serve`: FastAPI routes over the Classifier."""

import asyncio
import logging
import os
import time
from importlib import resources
from typing import Annotated

import anyio.to_thread
from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from digitlens.classifier import Classifier, Result
from digitlens.errors import ModelError
from digitlens.metadata import IMAGE_SIZE
from digitlens.serve import MB, ServeConfig
from digitlens.text import one_line, shown

CANVAS_SIDE = 280  # pixels of the page's drawing area (index.html has it as {{CANVAS_SIDE}})
# Requests decoded and classified at once per worker: one per core keeps the CPUs busy, and bounds memory at
# MAX_CONCURRENT x the ~300 MB one image may take while it is prepared (docs/serve.md). Each session runs
# a request on one thread, without spinning: requests, not operators, run in parallel.
MAX_CONCURRENT = os.cpu_count() or 2
SESSION_THREADS = 1
JSON_BYTES_PER_NUMBER = 32  # room for a number of up to 31 characters, and a comma
CLIENT_GONE = 499  # nginx's status for a client that closed the connection before its request was complete
HEADERS = [(b"x-content-type-options", b"nosniff")]  # on every answer: browsers take each as the type it says
PAGE_POLICY = ("default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src 'self' blob: data:; "
               "frame-ancestors 'none'")  # the page: nothing from elsewhere, and no other site may frame it
log = logging.getLogger("digitlens.serve")


def load_models(config: ServeConfig) -> dict[str, Classifier]:
    """name (the file stem) -> Classifier; raises ModelError naming the file."""
    models: dict[str, Classifier] = {}
    for path in config.models:
        try:
            clf = Classifier(path, config.device, threads=SESSION_THREADS)
        except ModelError as e:
            raise ModelError(f"{shown(path)}: {e}") from None
        if clf.name in models:
            raise ModelError(f"two models are named {clf.name!r} ({models[clf.name].path}, {path}); rename one")
        models[clf.name] = clf
    return models


class Images(BaseModel):
    """The JSON request: arrays already in the model's form, classified as they are (as `infer --raw`)."""

    model_config = ConfigDict(json_schema_extra={"example": {"images": [[[0.0] * IMAGE_SIZE] * IMAGE_SIZE], "top_k": 3}})
    images: list[list[list[StrictFloat]] | list[list[list[StrictFloat]]]] = Field(
        min_length=1, description=f"arrays of the model's input size ({IMAGE_SIZE}x{IMAGE_SIZE} for the MNIST and "
                                  "Fashion-MNIST models: light on dark), values in [0, 1]: rows of grey values, or of "
                                  "[r, g, b] for a colour model; a wrong shape or value is that array's own error in "
                                  "the answer")
    top_k: int | None = Field(None, ge=1, strict=True, description="classes per image, most probable first (default 1)")


class NoUsableImage(Exception):
    """A request none of whose images could be classified: 400 with every image's record."""

    def __init__(self, results: list[Result]):
        first = results[0]
        name = one_line(shown(first.source))  # a file name may hold a line feed
        super().__init__(f"{name}: {first.error}" if len(results) == 1 else
                         f"none of the {len(results)} images is usable (first, {name}: {first.error})")
        self.records = [r.to_dict() for r in results]


def classify(clf: Classifier, sources: list, names: list[str], top_k: int, raw: bool) -> list[dict]:
    """The records of `infer --format json` for one request's images (run in a worker thread)."""
    results = list(clf.classify(sources, top_k, raw, names=names))
    if not any(r.ok for r in results):
        raise NoUsableImage(results)
    return [r.to_dict() for r in results]


def images_json(body: bytes) -> Images:
    """The JSON body, validated; not JSON at all is 400, JSON of the wrong shape a validation error (422)."""
    try:
        return Images.model_validate_json(body)
    except ValidationError as e:
        invalid = next((err for err in e.errors() if err["type"] == "json_invalid"), None)
        if invalid is not None:
            raise HTTPException(400, f"body is not valid JSON ({invalid['ctx'].get('error', invalid['msg'])})") from None
        raise RequestValidationError([err | {"loc": ("body", *err["loc"])} for err in e.errors()]) from None


def validation_message(errors: list[dict]) -> str:
    """The first validation error in one line: 'where: what (got value)'."""
    err = errors[0]
    # a loc part with brackets names the member of a union (grey or colour arrays) that was tried, not a place
    where = ".".join(str(p) for p in err["loc"] if p not in ("body", "query") and "[" not in str(p)) or "body"
    if where.endswith("top_k"):
        return f"top_k must be a positive integer (got {err.get('input')!r})"
    got = "" if err["type"] == "missing" else f" (got {one_line(repr(err.get('input')))[:80]})"
    return f"{where}: {err['msg']}{got}"


class DeclaredSizeLimit:
    """ASGI middleware: a body whose Content-Length is over the limit gets this API's JSON 413 before it is read.
    (The route's max_body_size refuses it too, but answers in plain text; it still counts bodies sent without
    a Content-Length.)"""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        declared = dict(scope.get("headers", ())).get(b"content-length", b"") if scope["type"] == "http" else b""
        if declared.isdigit() and int(declared) > self.max_bytes:
            scope.setdefault("state", {})["error"] = too_large(self.max_bytes)
            return await JSONResponse({"error": too_large(self.max_bytes)}, 413)(scope, receive, send)
        await self.app(scope, receive, send)


def too_large(max_bytes: int) -> str:
    return f"request body over the {max_bytes / MB:.3g} MB limit"


class AccessLog:
    """ASGI middleware: one log line per request (client, method, path, status, time, and why, if it failed),
    every client-given string escaped so that it cannot end or rewrite the line; HEADERS on every answer; and
    the JSON 500 of an unexpected error (Starlette would answer it outside every middleware: no headers, no
    reason in the line), its traceback to the log only."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                scope.setdefault("state", {})["answered"] = True
                message = message | {"headers": [*message.get("headers", ()), *HEADERS]}
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception as e:
            log.error("internal error in %s %s", scope["method"], one_line(scope["path"]), exc_info=True)
            if scope.get("state", {}).get("answered"):  # an answer has begun: it can only be cut short
                raise
            message = f"internal error ({type(e).__name__})"
            scope.setdefault("state", {})["error"] = message
            await JSONResponse({"error": message}, 500)(scope, receive, send_and_note)
        finally:
            client = scope.get("client") or ("-", 0)
            why = scope.get("state", {}).get("error")
            log.info("%s:%s \"%s %s\" %d %.1f ms%s", client[0], client[1], scope["method"], one_line(scope["path"]),
                     status[0], 1000 * (time.perf_counter() - start), f": {one_line(why)}" if why else "")


class DeadlineHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with the deadlines uvicorn lacks (it times only the idle gap between
    requests): a request's head must arrive within `head_seconds` of the connection or of its first byte, its
    body within `body_seconds` of the head; a late one closes the connection, so that a client sending a byte a
    second (slowloris) holds nothing long. The seconds are the server process's, set by create_app."""

    head_seconds, body_seconds = ServeConfig.head_seconds, ServeConfig.body_seconds
    deadline: asyncio.TimerHandle | None = None

    def arm(self, seconds: float, what: str) -> None:
        self.disarm()
        self.deadline = self.loop.call_later(seconds, self.expire, seconds, what)

    def disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def expire(self, seconds: float, what: str) -> None:
        client = self.client or ("-", 0)
        log.info("%s:%s connection closed: %s not complete after %g s", client[0], client[1], what, seconds)
        self.transport.close()  # an app still reading the body gets a disconnect: its request logs 499

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.arm(self.head_seconds, "no request (head)")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.arm(self.head_seconds, "request head")

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self.arm(self.body_seconds, "request body")

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.disarm()

    def connection_lost(self, exc) -> None:
        self.disarm()
        super().connection_lost(exc)


def json_bytes_per_image(clf: Classifier) -> int:
    return clf.info.size**2 * clf.info.channels * JSON_BYTES_PER_NUMBER


async def json_body(request: Request, limit: int, clf: Classifier) -> bytes:
    """The body, refused (413) past `limit`, which is tighter than the route's: JSON costs far more memory to
    parse than its bytes (8 MB of "[]," took 220 MB), so it is never read, let alone parsed, beyond it."""
    arrays, side = limit // json_bytes_per_image(clf), clf.info.size
    shape = f"{side}x{side}" + ("x3" if clf.info.channels == 3 else "")
    message = f"a JSON body over {limit / MB:.3g} MB (room for {arrays} arrays of {shape} numbers)" if arrays else \
        too_large(limit)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, message)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, message)
        chunks.append(chunk)
    return b"".join(chunks)


def error_response(request: Request, status: int, message: str, **extra) -> JSONResponse:
    request.state.error = message
    return JSONResponse({"error": message, **extra}, status)


ERROR = {"content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}, "results": {"type": "array"}}}}}}
PREDICT_RESPONSES = {
    200: {"description": "one record per image: its predictions, or its error"},
    400: ERROR | {"description": "no usable image (each one's error in `results`), a malformed body, no file in `files`"},
    404: ERROR | {"description": "no such model"},
    413: ERROR | {"description": "body over the size limit, or too many images"},
    415: ERROR | {"description": "neither multipart/form-data nor application/json"},
    422: ERROR | {"description": "bad top_k, or JSON that is not {\"images\": [arrays], \"top_k\": k}"},
}


def create_app(config: ServeConfig) -> FastAPI:
    """The app, its models loaded (one onnxruntime session each, shared by all requests)."""
    models = load_models(config)
    DeadlineHttpTools.head_seconds, DeadlineHttpTools.body_seconds = config.head_seconds, config.body_seconds
    page = (resources.files("digitlens") / "static" / "index.html").read_text(encoding="utf-8")
    page = page.replace("{{CANVAS_SIDE}}", str(CANVAS_SIDE))
    # docs_url and redoc_url would load Swagger UI / ReDoc from a CDN; the schema stays at /openapi.json
    app = FastAPI(title="digitlens", version="1", docs_url=None, redoc_url=None,
                  description="Classify images with exported MNIST / Fashion-MNIST models.")
    app.state.models = models
    app.add_middleware(DeclaredSizeLimit, max_bytes=config.max_bytes)
    app.add_middleware(AccessLog)  # added last: the outermost, so it logs every answer
    model_work = anyio.CapacityLimiter(MAX_CONCURRENT)

    async def model(name: str) -> Classifier:  # async: a plain def would run in a worker thread
        if name not in models:
            raise HTTPException(404, f"no model {name!r}; loaded: {', '.join(models)}")
        return models[name]

    def record(name: str) -> dict:
        return {"name": name, **models[name].info.to_dict()}

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, e: ClientDisconnect):  # nobody to answer: one log line, no traceback
        return error_response(request, CLIENT_GONE, "the client disconnected before its request was complete")

    @app.exception_handler(HTTPException)  # ours, and Starlette's: no such path (404), wrong method (405), ...
    async def http_error(request: Request, e: HTTPException):
        if isinstance(e.__cause__, ClientDisconnect):  # FastAPI's form parsing wraps it in a 400
            return await client_gone(request, e.__cause__)
        body_limit = e.status_code == 413 and e.detail == "Content Too Large"  # Starlette's body limiter
        message = too_large(config.max_bytes) if body_limit else str(e.detail)
        response = error_response(request, e.status_code, message)
        response.headers.update(e.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return error_response(request, 422, validation_message(list(e.errors())))

    @app.exception_handler(NoUsableImage)
    async def no_usable_image(request: Request, e: NoUsableImage):
        return error_response(request, 400, str(e), results=e.records)

    @app.exception_handler(ModelError)
    async def model_failed(request: Request, e: ModelError):
        return error_response(request, 500, f"the model failed: {e}")

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: the models are loaded")
    async def readyz():  # the app exists only once every model has loaded, so answering means ready
        return {"status": "ready", "models": list(models)}

    for path, check in (("/healthz", healthz), ("/readyz", readyz)):  # load balancers ask with HEAD
        app.add_api_route(path, check, methods=["HEAD"], include_in_schema=False)

    @app.get("/v1/models", summary="The loaded models and their metadata")
    async def list_models():
        return {"models": [record(name) for name in models]}

    @app.get("/v1/models/{name}", summary="One model's metadata", responses={404: ERROR})
    async def one_model(clf: Annotated[Classifier, Depends(model)]):
        return record(clf.name)

    # The JSON form cannot be a second body parameter beside the multipart one (FastAPI takes one body
    # encoding per route), so its schema is added from the Images model and the body parsed in the route.
    @app.post("/v1/models/{name}/predict", summary="Classify images", responses=PREDICT_RESPONSES,
              max_body_size=config.max_bytes,
              openapi_extra={"requestBody": {"content": {"application/json": {"schema": Images.model_json_schema()}}}})
    async def predict(
        request: Request,
        clf: Annotated[Classifier, Depends(model)],
        files: Annotated[list[UploadFile] | None, File(description="image files (PNG, JPEG, GIF, BMP, TIFF, WEBP)")] = None,
        top_k: Annotated[int | None, Query(ge=1, description="classes per image (default 1); wins over the body's")] = None,
        form_top_k: Annotated[int | None, Form(alias="top_k", ge=1, description="classes per image (default 1)")] = None,
    ):
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            limit = min(config.max_bytes, config.max_files * json_bytes_per_image(clf))
            body = images_json(await json_body(request, limit, clf))
            sources, names, raw, given = body.images, [f"images[{i}]" for i in range(len(body.images))], True, body.top_k
        elif kind == "multipart/form-data":
            if not files:
                form = await request.form()  # already parsed: what the client sent instead
                others = sorted({k for k, v in form.multi_items() if not isinstance(v, str)})
                hint = f" (found files in {', '.join(map(repr, others))})" if others else ""
                raise HTTPException(400, f"no file in the form field 'files'{hint}")
            sources, names, raw, given = [f.file for f in files], [f.filename or "<file>" for f in files], False, form_top_k
        else:
            raise HTTPException(415, "send multipart/form-data (field 'files') or application/json (field 'images'), "
                                     f"not {kind or 'no Content-Type'}")
        if len(sources) > config.max_files:
            raise HTTPException(413, f"{len(sources)} images in one request; the limit is {config.max_files}")
        records = await anyio.to_thread.run_sync(classify, clf, sources, names, top_k or given or 1, raw,
                                                 limiter=model_work)
        return JSONResponse(records)

    return app


def app_from_env() -> FastAPI:
    """The app factory each worker process calls (uvicorn --factory), the config read from CONFIG_ENV."""
    return create_app(ServeConfig.from_env())
