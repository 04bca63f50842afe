"""``create_app``: the server as an ASGI app (FastAPI) over one ``lorablend.DiffusionPipeline``.

Run it with ``lorablend serve`` or any ASGI server, or mount it in your own app (a mounted app gets no startup
event: the worker then starts with the first request). Routes here: ``GET /health``, ``GET /metrics``,
``GET|POST /v1/loras``, ``DELETE /v1/loras/{name}``, ``POST /v1/images``; A1111's and OpenAI's in ``compat``.
Every route but ``/health`` wants the token when one is set.

>>> from lorablend.serve import ServeSettings, create_app
>>> app = create_app(pipeline, ServeSettings(lora_dir="loras/"))               # doctest: +SKIP
>>> uvicorn.run(app, host="127.0.0.1", port=8000)                           # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
import shutil
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError

from ..errors import LoraCompatibilityError, LoraFormatError
from . import responses
from .catalog import LoraSource, check_name
from .compat import add_compat_routes
from .config import ServeSettings
from .errors import STATUS, NameTaken, UnknownLora
from .metrics import MetricsMiddleware
from .openapi import install_openapi, open_path
from .schemas import ImageRequest, LoraRegistration, invalid
from ..ui.page import add_page_routes, is_public_path
from .security import LORA_SUFFIXES, BodyLimit, TokenCheck, resolve_inside
from .state import ServerState, generate


QUOTE_CHARS = 120  # an error quotes at most this much of any input text
QUOTE_ITEMS = 8  # ... and this many items of a list or object, this deep
QUOTE_DEPTH = 3


def _plain(value: Any, depth: int = 0) -> Any:
    """A bounded excerpt of a validation error's input that JSON can carry: long text cut (its length said), long
    lists and objects cut to their first items, non-finite numbers and odd types as text. Never the whole input:
    a 50 MB body must not come back in its 422.

    >>> _plain("x" * 1000).endswith("… (1000 characters in all)")
    True
    """
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, bytes)):
        text = value if isinstance(value, str) else value.decode("utf-8", "replace")
        return text if len(text) <= QUOTE_CHARS else f"{text[:QUOTE_CHARS]}… ({len(text)} characters in all)"
    if isinstance(value, (dict, list, tuple)) and depth >= QUOTE_DEPTH:
        return f"({type(value).__name__} of {len(value)} items)"
    if isinstance(value, dict):
        items = list(value.items())
        out = {_plain(str(k), depth + 1): _plain(v, depth + 1) for k, v in items[:QUOTE_ITEMS]}
        if len(items) > QUOTE_ITEMS:
            out["…"] = f"{len(items) - QUOTE_ITEMS} more keys"
        return out
    if isinstance(value, (list, tuple)):
        out = [_plain(v, depth + 1) for v in list(value)[:QUOTE_ITEMS]]
        return out + [f"… {len(value) - QUOTE_ITEMS} more items"] if len(value) > QUOTE_ITEMS else out
    if value is None or isinstance(value, (int, float, bool)):
        return value
    return _plain(repr(value), depth)


RETRY_AFTER_S = "5"  # what a 503 tells a client to wait before sending the request again


def _error(status: int) -> Any:
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
        return JSONResponse({"detail": _plain(str(exc)) if len(str(exc)) > 4000 else str(exc)}, status_code=status,
                            headers=headers)
    return handler


def _install_errors(app: FastAPI) -> None:
    for exc_type, status in (*STATUS.items(), (LoraFormatError, 422), (LoraCompatibilityError, 422)):
        app.add_exception_handler(exc_type, _error(status))

    async def unprocessable(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the input, and a NaN or inf input cannot be written as JSON: say it in text
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", ""),
                   "input": _plain(e.get("input"))} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)
    app.add_exception_handler(RequestValidationError, unprocessable)

    async def internal(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}): {exc}"}, status_code=500)
    app.add_exception_handler(Exception, internal)


def create_app(pipe: Any, config: ServeSettings, *, compiled: Any = None, title: str = "lorablend") -> FastAPI:
    """The server for ``pipe`` (a ``lorablend.DiffusionPipeline``) with these settings; an ASGI app.
    ``compiled``: the handle of ``pipe.compile_denoiser()`` when the denoiser was compiled.

    >>> app = create_app(DiffusionPipeline.from_pretrained("sd15/"), ServeSettings(lora_dir="loras/"))  # doctest: +SKIP
    """
    state = ServerState(pipe, config, compiled)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(state.close)

    app = FastAPI(title=title, lifespan=lifespan)
    app.state.lorablend = state
    _install_errors(app)
    _routes(app, state)
    add_compat_routes(app, state)
    install_openapi(app, config)  # the token schemes, every error answer, the limits; /docs needs no token
    add_page_routes(app)  # the playground at /: its files need no token, everything it does needs one
    # the last added wraps the others: metrics see every answer (401 and 413 too); the token is checked
    # before any body byte is read; the body limit cuts an upload off as it arrives
    app.add_middleware(BodyLimit, limit_for=lambda path, content_type: config.max_upload_bytes if (
        path.rstrip("/").endswith("/v1/loras") and content_type.startswith("multipart/")) else config.max_body_bytes,
                       upload_limit=config.max_upload_bytes)
    app.add_middleware(TokenCheck, token=config.token, public=lambda path: open_path(path) or is_public_path(path))
    app.add_middleware(MetricsMiddleware, metrics=state.metrics, routes=lambda: app.routes)
    return app


def _routes(app: FastAPI, state: ServerState) -> None:
    config = state.config

    @app.get("/health")
    async def health() -> dict:
        """Liveness: ``{"status": "ok"}``; needs no token."""
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        """Prometheus text: requests, latency, switch time, cache hits / misses / evictions, queue depth."""
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/loras")
    async def list_loras() -> dict:
        """Every LoRA served: name, origin, format, family, rank, bytes, whether parsed and loaded."""
        sources = await run_in_threadpool(state.catalog.scan)
        rows = await run_in_threadpool(lambda: [state.describe(s) for s in sorted(sources.values(), key=_by_name)])
        return {"loras": rows}

    @app.post("/v1/loras", status_code=201)
    async def add_lora(request: Request) -> dict:
        """Register a file inside --lora-dir (JSON ``{"path", "name"?}``) or an upload (multipart ``file``,
        ``name``?): 201 with the load report."""
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            return await _upload(state, request)
        try:
            body = LoraRegistration.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from None
        path = resolve_inside(config.lora_dir, body.path)
        if not path.is_file():
            raise UnknownLora(f"path {body.path!r}: no such file in --lora-dir; GET /v1/loras lists what is there")
        return await run_in_threadpool(_register, state, body.name or path.stem, path, "registered")

    @app.delete("/v1/loras/{name:path}")
    async def delete_lora(name: str) -> dict:
        """Forget a registered or uploaded LoRA (and unload it)."""
        source = await run_in_threadpool(state.catalog.unregister, name)

        def unload() -> None:
            with state.worker.lock:  # the pipeline changes only between batches
                state.cache.drop(name)
            if source.origin == "upload":
                source.path.unlink(missing_ok=True)
        await run_in_threadpool(unload)
        return {"deleted": name}

    @app.post("/v1/images")
    async def images(body: ImageRequest, request: Request) -> Any:
        """Generate: image/png for one image, else JSON with base64 PNGs, seed, mix and timings."""
        gen, result = await generate(state, body.generation(config), request)
        if len(result.images) == 1 and body.response_format != "json":
            return Response(responses.png_bytes(result.images[0]), media_type="image/png",
                            headers=responses.native_headers(gen, result))
        return responses.native(gen, result)

def _by_name(source: LoraSource) -> str:
    return source.name


def _check_free(state: ServerState, name: str) -> None:
    """422 for a name a client may not give, 409 for one in use."""
    try:
        check_name(name)
    except ValueError as exc:
        raise invalid("name", str(exc), name) from None
    if name in state.catalog.scan():
        raise NameTaken(f"LoRA name {name!r} is taken; pick another name, or DELETE /v1/loras/{name} first")


def _register(state: ServerState, name: str, path: Path, origin: str, shown: str | None = None) -> dict:
    """Parse (refusing damage with the reader's message, naming the file as the client named it: ``shown``), then
    serve under ``name``; the 201 answer. (An upload's name was checked before its file was written.)"""
    if origin != "upload":
        _check_free(state, name)
    try:
        entry = state.cache.get(LoraSource(name, path, origin))
    except (LoraFormatError, LoraCompatibilityError) as exc:
        if shown is None:
            raise
        raise type(exc)(str(exc).replace(str(path), shown)) from None
    if origin != "upload":  # an upload is a file of the upload folder: the catalog reads it from there
        state.catalog.register(name, path, origin)
    adapter = entry.adapter
    report = adapter.report
    ranks = [d.rank for d in adapter.deltas.values() if d.rank is not None]
    return {"name": name, "origin": origin, "format": adapter.format, "family": adapter.family,
            "rank": max(ranks, default=None), "bytes": path.stat().st_size, "layers": len(adapter.deltas),
            "report": {"counts": report.counts(), "complete": report.complete,
                       "not_mapped": [{"key": r.key, "status": r.status, "reason": r.reason}
                                      for r in (report.unsupported + report.unknown)[:50]]}}


async def _upload(state: ServerState, request: Request) -> dict:
    """A multipart upload (``file``, optional ``name``): written to the upload folder as ``<name><suffix>`` (a
    partial file first, renamed once whole), parsed, served; removed again when refused."""
    form = await request.form()
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise invalid("file", "send the LoRA as a multipart file field named 'file'")
    filename = Path(upload.filename or "upload.safetensors")
    name = form.get("name") or filename.stem
    if not isinstance(name, str):
        raise invalid("name", "'name' must be a text field")
    suffix = filename.suffix.lower() if filename.suffix.lower() in LORA_SUFFIXES else ".safetensors"
    partial = state.upload_dir / f".{uuid.uuid4().hex}.partial"

    def save_and_register() -> dict:
        _check_free(state, name)  # before a byte is written: an upload never replaces another
        path = state.upload_dir / f"{name}{suffix}"
        try:
            with open(partial, "wb") as out:
                shutil.copyfileobj(upload.file, out, 1 << 20)
            if path.exists():
                raise NameTaken(f"LoRA name {name!r} is taken (an upload of that name arrived first); pick another")
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
        try:
            return _register(state, name, path, "upload", shown=upload.filename or filename.name)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    try:
        return await run_in_threadpool(save_and_register)
    finally:
        await form.close()


__all__ = ["create_app"]
