"""``lorablend view SWEEP_DIR``: a page over a sweep folder — the grid with its axes (prompt × seed × mix), filters
by axis value, a cell's full image and manifest line — for a finished sweep or one still running (the page
refreshes until the sweep is done).

The server only reads: ``sweep.json``, ``manifest.jsonl`` and the PNGs under ``images/`` (a path outside that
folder, or not a ``.png``, is a 404). It listens on 127.0.0.1; another address needs a token, as ``serve`` does.

>>> app = create_viewer_app("sweep-out")                                   # doctest: +SKIP
>>> uvicorn.run(app, host="127.0.0.1", port=8001)                          # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request  # (module level: FastAPI reads the routes' annotations from here)
from fastapi.responses import FileResponse, JSONResponse

from ..serve.security import token_ok
from ..sweep.manifest import read_manifest
from .assets import PAGE_HEADERS
from .page import add_page_routes


def _planned(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """``sweep.json``'s settings and its planned cells (None for a sweep written before plans were recorded)."""
    try:
        marker = json.loads((folder / "sweep.json").read_text())
    except (OSError, ValueError):
        return {}, None
    plan = marker.get("plan")
    return marker.get("settings") or {}, (plan.get("cells") if isinstance(plan, dict) else None)


def sweep_view(folder: str | os.PathLike) -> dict[str, Any]:
    """What the viewer shows of ``folder``: every cell (planned or made) with ``done`` (its image is on disk), the
    LoRA names, the total and whether the sweep is finished. ``FileNotFoundError`` when it is no sweep folder.

    >>> sweep_view("no-such-folder")
    Traceback (most recent call last):
    ...
    FileNotFoundError: no-such-folder: no sweep here (no sweep.json); pass the -o folder of a lorablend sweep
    """
    root = Path(folder)
    if not (root / "sweep.json").is_file():
        raise FileNotFoundError(f"{folder}: no sweep here (no sweep.json); pass the -o folder of a lorablend sweep")
    settings, plan = _planned(root)
    lines = read_manifest(root / "manifest.jsonl")
    cells = []
    for record in (plan if plan is not None else list(lines.values())):
        line = lines.get(record.get("key"))
        done = line is not None and (root / line.get("file", "")).is_file()
        cells.append({**record, **(line or {}), "done": done, "line": line})
    names = [name for _, name in settings.get("loras", [])] or sorted({n for c in cells for n in c.get("loras", {})})
    made = sum(c["done"] for c in cells)
    grid = root / "grid.png"
    finished = (made == len(cells)) if plan is not None else (
        grid.is_file() and grid.stat().st_mtime >= (root / "manifest.jsonl").stat().st_mtime
        if (root / "manifest.jsonl").is_file() else False)
    return {"folder": root.name, "names": names, "cells": cells, "total": len(cells), "finished": finished}


def image_path(folder: str | os.PathLike, relative: str) -> Path:
    """The PNG ``relative`` names inside ``folder/images``; ``FileNotFoundError`` for anything else.

    >>> image_path("sweep-out", "../sweep.json")
    Traceback (most recent call last):
    ...
    FileNotFoundError: ../sweep.json: not an image of this sweep
    """
    images = (Path(folder) / "images").resolve()
    path = (Path(folder) / relative).resolve()
    if path.suffix != ".png" or images not in path.parents or not path.is_file():
        raise FileNotFoundError(f"{relative}: not an image of this sweep")
    return path


def create_viewer_app(folder: str | os.PathLike, *, token: str | None = None) -> Any:
    """The viewer as an ASGI app over ``folder`` (checked now: ``FileNotFoundError`` if it is no sweep); with a
    ``token``, the API answers 401 without ``Authorization: Bearer <token>`` (the page asks for it). >>> see the module"""
    sweep_view(folder)
    app = FastAPI(title="lorablend sweep viewer", docs_url=None, redoc_url=None, openapi_url=None)
    add_page_routes(app, home="viewer.html")

    def refused(request: Request) -> JSONResponse | None:
        if token is None or token_ok(token, request.headers.get("authorization"), request.headers.get("x-api-key")):
            return None
        return JSONResponse({"detail": "missing or wrong token: sign in with the viewer's --token"}, status_code=401,
                            headers={"WWW-Authenticate": 'Bearer realm="lorablend"'})

    @app.get("/api/sweep")
    async def api_sweep(request: Request) -> Any:
        return refused(request) or JSONResponse({**sweep_view(folder), "auth": token is not None},
                                                headers=PAGE_HEADERS)

    @app.get("/api/image/{relative:path}")
    async def api_image(relative: str, request: Request) -> Any:
        if (no := refused(request)) is not None:
            return no
        try:
            return FileResponse(image_path(folder, relative), media_type="image/png", headers=PAGE_HEADERS)
        except FileNotFoundError as exc:
            return JSONResponse({"detail": str(exc)[:300]}, status_code=404)

    return app


__all__ = ["create_viewer_app", "image_path", "sweep_view"]
