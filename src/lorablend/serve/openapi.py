"""``/openapi.json`` as a client can trust it: FastAPI's schema plus what it cannot see — the token (Bearer, HTTP
basic as A1111 front-ends send it, or ``X-API-Key``), every error answer a route gives (401 / 403 / 404 / 405 /
409 / 413 / 422 / 503, one error shape), the ``/v1/loras`` bodies (JSON registration or a multipart upload), the
PNG answer of ``/v1/images``, ``/metrics`` as Prometheus text, and this server's limits as bounds (``maximum`` of
steps, sizes and image counts; the body limits in the description). ``schemathesis`` checks the server against it.

>>> install_openapi(app, settings)                                             # doctest: +SKIP
>>> app.openapi()["components"]["securitySchemes"]["bearer"]["scheme"]          # doctest: +SKIP
'bearer'
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .config import MAX_SIDE, ServeSettings

OPEN = ("/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc")  # no token wanted
ERROR = {"type": "object", "required": ["detail"],
         "properties": {"detail": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}}}
WHY = {401: "missing or wrong token", 403: "a path outside --lora-dir", 404: "unknown LoRA or route",
       405: "method not allowed", 409: "name taken, or a file of --lora-dir", 413: "body over the limit",
       422: "invalid request or LoRA file", 499: "client left", 503: "stopping or queue full: send it again (Retry-After)"}
GENERATION = ("/v1/images", "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/images/generations")


def open_path(path: str) -> bool:
    """Whether ``path`` is served without the token: the probe and the API docs (the docs page logs in itself,
    with its Authorize button). >>> open_path("/docs"), open_path("/v1/images")
    (True, False)
    """
    return (path.rstrip("/") or "/") in OPEN


def _errors_of(path: str, method: str) -> list[int]:
    """The error codes a route may answer (besides its own success)."""
    codes = [401, 405] if path not in OPEN else [405]
    if method in ("post", "put", "patch"):
        codes += [413, 422]
    if path in GENERATION:
        codes += [404, 503]
    if path.startswith("/v1/loras"):
        codes += [403, 404, 409, 422]
    if "{" in path or path == "/sdapi/v1/options":
        codes += [404, 422]
    return sorted(set(codes))


def _bounds(schemas: dict[str, Any], config: ServeSettings) -> None:
    """Write the server's limits into the request models' fields."""
    side = min(MAX_SIDE, config.max_pixels // 8 // 8 * 8)
    limits = {"steps": config.max_steps, "num_images": config.max_images, "n": config.max_images,
              "batch_size": config.max_images, "n_iter": config.max_images, "width": side, "height": side,
              "num_frames": config.max_frames}
    for name in ("ImageRequest", "Txt2ImgRequest", "Img2ImgRequest", "OpenAIImageRequest"):
        for field, props in schemas.get(name, {}).get("properties", {}).items():
            if field in limits:
                for option in props.get("anyOf", [props]):
                    if option.get("type") == "integer":
                        option["maximum"] = limits[field]


def _lora_bodies(schema: dict[str, Any]) -> None:
    op = schema["paths"]["/v1/loras"]["post"]
    op["requestBody"] = {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/LoraRegistration"}},
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
            "file": {"type": "string", "format": "binary"}, "name": {"type": "string", "maxLength": 128}}}}}}


def build_openapi(app: FastAPI, config: ServeSettings) -> dict[str, Any]:
    """The complete schema of ``app`` served with ``config``.

    >>> build_openapi(app, settings)["paths"]["/v1/images"]["post"]["responses"]["413"]["description"]  # doctest: +SKIP
    'body over the limit'
    """
    from .schemas import LoraRegistration

    schema = get_openapi(title=app.title, version=app.version, routes=app.routes, description=(
        f"Limits: {config.max_steps} steps, {config.max_pixels:,} pixels and {config.max_images} images per request; "
        f"bodies up to {config.max_body_bytes:,} bytes, uploads up to {config.max_upload_bytes:,}; "
        f"{config.max_queue} requests waiting at most. Token: Bearer, HTTP basic (as password) or X-API-Key."))
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {})["LoraRegistration"] = LoraRegistration.model_json_schema()
    components["schemas"]["Error"] = ERROR
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"},
                                     "basic": {"type": "http", "scheme": "basic"},
                                     "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
    _lora_bodies(schema)
    _bounds(components["schemas"], config)
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            op["security"] = [] if path in OPEN else [{"bearer": []}, {"basic": []}, {"apiKey": []}]
            responses = op.setdefault("responses", {})
            for code in sorted(set(_errors_of(path, method)) | ({422} if "422" in responses else set())):
                responses[str(code)] = {"description": WHY[code], "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    schema["paths"]["/v1/images"]["post"]["responses"]["200"]["content"]["image/png"] = {
        "schema": {"type": "string", "format": "binary"}}
    schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
    schema["components"]["schemas"].pop("HTTPValidationError", None)
    schema["components"]["schemas"].pop("ValidationError", None)
    return schema


def install_openapi(app: FastAPI, config: ServeSettings) -> None:
    """Serve :func:`build_openapi`'s schema at ``/openapi.json`` (built once, on first use).

    >>> install_openapi(app, settings)                                         # doctest: +SKIP
    """
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, config)
        return app.openapi_schema
    app.openapi = openapi  # FastAPI's documented way to give a custom schema


__all__ = ["OPEN", "build_openapi", "install_openapi", "open_path"]
