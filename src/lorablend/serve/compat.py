"""The APIs front-ends already speak, on the same runtime, queue and isolation as ``/v1/images``:
AUTOMATIC1111's web API (``POST /sdapi/v1/txt2img`` and ``/sdapi/v1/img2img``, ``GET /sdapi/v1/loras``, and the listings front-ends read at
start-up: ``sd-models``, ``samplers``; the others in ``a1111``) and OpenAI's images API (``POST /v1/images/generations``,
``GET /v1/models``). For the same seed and mix they give the image ``/v1/images`` gives.

>>> add_compat_routes(app, state)                                            # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool

from . import responses
from .a1111 import add_a1111_routes
from .catalog import LoraSource
from .schemas import Img2ImgRequest, OpenAIImageRequest, Txt2ImgRequest
from .state import ServerState, generate

SAMPLER = "DDIM / the pipeline's own scheduler"  # one sampler: the model's scheduler as loaded


def add_compat_routes(app: FastAPI, state: ServerState) -> None:
    """Add the A1111 and OpenAI routes to ``app`` (served by ``state``).

    >>> add_compat_routes(app, app.state.lorablend)                         # doctest: +SKIP
    """
    add_a1111_routes(app, state)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2ImgRequest, request: Request) -> dict:
        """AUTOMATIC1111's txt2img (LoRAs as ``<lora:name:weight>`` in the prompt)."""
        gen, result = await generate(state, body.generation(state.config), request)
        return responses.a1111(gen, result, body.model_dump())

    @app.post("/sdapi/v1/img2img")
    async def img2img(body: Img2ImgRequest, request: Request) -> dict:
        """AUTOMATIC1111's img2img (``init_images`` base64, ``denoising_strength``; LoRAs as in txt2img)."""
        gen, result = await generate(state, body.generation(state.config), request)
        return responses.a1111(gen, result, {**body.model_dump(), "init_images": None, "mask": None})

    @app.get("/sdapi/v1/loras")
    async def a1111_loras() -> list:
        """AUTOMATIC1111's LoRA list."""
        sources = await run_in_threadpool(state.catalog.scan)
        # paths relative to --lora-dir: the client needs no view of the server's disk
        return [{"name": s.name, "alias": s.name, "path": _shown_path(s, state.catalog.root), "metadata": {}}
                for s in sorted(sources.values(), key=_by_name)]

    @app.post("/v1/images/generations")
    async def openai_images(body: OpenAIImageRequest, request: Request) -> dict:
        """OpenAI's images API (``b64_json``; LoRAs as prompt tokens or an extra ``loras`` field)."""
        gen, result = await generate(state, body.generation(state.config), request)
        return responses.openai(gen, result)

    @app.get("/sdapi/v1/sd-models")
    async def a1111_models() -> list:
        """AUTOMATIC1111's model list: the one model this server runs."""
        return [{"title": state.model_name, "model_name": state.model_name, "hash": None, "sha256": None,
                 "filename": state.model_name, "config": None}]

    @app.get("/sdapi/v1/samplers")
    async def a1111_samplers() -> list:
        """AUTOMATIC1111's sampler list: the pipeline's own scheduler (a sampler_name in txt2img is ignored)."""
        return [{"name": SAMPLER, "aliases": [], "options": {}}]

    @app.get("/v1/models")
    async def openai_models() -> dict:
        """OpenAI's model list: the one model this server runs."""
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "lorablend"}]}


def _by_name(source: LoraSource) -> str:
    return source.name


def _shown_path(source: LoraSource, root: Path) -> str:
    try:
        return source.path.relative_to(root).as_posix()
    except ValueError:  # an upload: it lives in the server's private folder
        return f"{source.name}{source.path.suffix}"


__all__ = ["add_compat_routes"]
