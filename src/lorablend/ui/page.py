"""The playground at ``/`` of ``lorablend serve``: sign in with the token, choose LoRAs and weights, generate with
live progress, compare with the base, restore from history, download PNGs that carry their settings.

The page and its files need no token (they hold nothing secret, and a browser must load them before it can ask
for one); everything the page does goes through the API with the token in an ``Authorization`` header, kept in the
tab's ``sessionStorage`` — never in a URL.

>>> from fastapi import FastAPI
>>> add_page_routes(FastAPI())
"""

from __future__ import annotations

from typing import Any

from .assets import PAGE_HEADERS, asset

PUBLIC_PREFIXES = ("/ui/",)  # what TokenCheck lets through without a token, beside "/" and "/health"


def is_public_path(path: str) -> bool:
    """Whether ``path`` is one of the page's own files (served without a token).

    >>> is_public_path("/"), is_public_path("/ui/playground.js"), is_public_path("/v1/loras")
    (True, True, False)
    """
    return path in ("/", "/favicon.ico") or path.startswith(PUBLIC_PREFIXES)


def add_page_routes(app: Any, home: str = "playground.html") -> None:
    """``GET /`` (the ``home`` page) and ``GET /ui/<file>`` (the shipped files) on a FastAPI ``app``, each
    answer with the pages' security headers (``assets.PAGE_HEADERS``). >>> see the module"""
    from fastapi.responses import JSONResponse, Response

    def answer(name: str) -> Any:
        try:
            data, media_type = asset(name)
        except KeyError:
            return JSONResponse({"detail": "no such page file"}, status_code=404)
        return Response(data, media_type=media_type, headers=PAGE_HEADERS)

    @app.get("/", include_in_schema=False)
    async def home_page() -> Any:
        return answer(home)

    @app.get("/favicon.ico", include_in_schema=False)
    async def no_icon() -> Any:  # browsers ask for it on every page: answer "none" rather than a 404 in the log
        return Response(status_code=204)

    @app.get("/ui/{name}", include_in_schema=False)
    async def page_file(name: str) -> Any:
        return answer(name)


__all__ = ["add_page_routes", "is_public_path"]
