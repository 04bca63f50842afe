"""The pages' static files, shipped in the package (``ui/static``), and the headers every page answer carries.

A page is served with a Content-Security-Policy that allows only this server's own scripts, styles and requests
(no inline script, no other origin), so a LoRA name or a prompt shown on the page can never run as code, and with
``Referrer-Policy: no-referrer`` and ``X-Frame-Options: DENY``.

>>> body, media_type = asset("page.css")
>>> media_type
'text/css; charset=utf-8'
"""

from __future__ import annotations

from importlib import resources

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self' blob:; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8"}


def asset_names() -> list[str]:
    """The files a page may load (``/ui/<name>``): exactly those shipped, nothing else is ever read.

    >>> "playground.js" in asset_names()
    True
    """
    return sorted(p.name for p in resources.files(__package__).joinpath("static").iterdir()
                  if p.name.rsplit(".", 1)[-1] in ("html", "js", "css"))


def asset(name: str) -> tuple[bytes, str]:
    """A shipped file's bytes and media type; ``KeyError`` for a name that is not one (no path is built from it).

    >>> asset("../__init__.py")
    Traceback (most recent call last):
    ...
    KeyError: "no page asset '../__init__.py'"
    """
    if name not in asset_names():
        raise KeyError(f"no page asset {name!r}")
    data = resources.files(__package__).joinpath("static", name).read_bytes()
    return data, MEDIA_TYPES["." + name.rsplit(".", 1)[-1]]


__all__ = ["CONTENT_SECURITY_POLICY", "PAGE_HEADERS", "asset", "asset_names"]
