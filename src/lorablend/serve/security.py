"""What a client may not do: call without the token (401), name a file outside ``--lora-dir`` (403), send a
body over the size limit (413). Each check is a small function or ASGI wrapper the app installs.

>>> resolve_inside("/srv/loras", "../etc/passwd")
Traceback (most recent call last):
...
lorablend.serve.errors.Forbidden: path '../etc/passwd': '..' is not allowed; name a file inside --lora-dir, e.g. style.safetensors
"""

from __future__ import annotations

import base64
import hmac
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any, Callable


from .errors import BodyTooLarge, Forbidden

LORA_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def resolve_inside(folder: str | os.PathLike, relative: str) -> Path:
    """The real path of ``relative`` inside ``folder``; raises :class:`Forbidden` for ``..``, an absolute path,
    or a path whose symlinks lead out of the folder (checked on the resolved path, so no link trick escapes).

    >>> resolve_inside("/srv/loras", "/etc/passwd")
    Traceback (most recent call last):
    ...
    lorablend.serve.errors.Forbidden: path '/etc/passwd': absolute paths are not allowed; name a file inside --lora-dir, e.g. style.safetensors
    """
    hint = "name a file inside --lora-dir, e.g. style.safetensors"
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise Forbidden(f"path {relative!r}: not a usable file name; {hint}")
    if os.path.isabs(relative) or relative.startswith(("/", "\\")) or (len(relative) > 1 and relative[1] == ":"):
        raise Forbidden(f"path {relative!r}: absolute paths are not allowed; {hint}")
    if ".." in PurePosixPath(relative.replace("\\", "/")).parts:
        raise Forbidden(f"path {relative!r}: '..' is not allowed; {hint}")
    root = Path(folder).resolve()
    real = (root / relative).resolve()
    if real != root and root not in real.parents:
        raise Forbidden(f"path {relative!r}: leads outside --lora-dir (through a symlink); {hint}")
    return real


def inside(folder: Path, path: Path) -> bool:
    """True when ``path`` (symlinks followed) lies inside ``folder`` (already resolved).

    >>> inside(Path("/srv"), Path("/srv/a.safetensors"))
    True
    """
    real = path.resolve()
    return folder in real.parents


def token_ok(expected: str | None, authorization: str | None, api_key: str | None = None) -> bool:
    """Whether a request carries the token: ``Authorization: Bearer T`` (OpenAI clients), HTTP basic auth with
    the token as password (A1111 front-ends' ``--api-auth``), or ``X-API-Key: T``. Compared in constant time.

    >>> token_ok("s3cret", "Bearer s3cret"), token_ok("s3cret", "Bearer nope"), token_ok(None, None)
    (True, False, True)
    """
    if expected is None:
        return True
    offered: list[str] = [api_key] if api_key else []
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            offered.append(value.strip())
        elif scheme.lower() == "basic":
            try:
                offered.append(base64.b64decode(value.strip(), validate=True).decode().partition(":")[2])
            except (ValueError, UnicodeDecodeError):
                pass
    want = expected.encode()
    return any(hmac.compare_digest(o.encode(), want) for o in offered)


def _json_reply(status: int, detail: str) -> tuple[dict, dict]:
    body = json.dumps({"detail": detail}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    return start, {"type": "http.response.body", "body": body}


class BodyLimit:
    """ASGI wrapper: refuse a body over ``limit_for(path)`` bytes with 413, by its Content-Length when it says so,
    else as soon as the bytes received pass the limit (a chunked upload is cut off there, never buffered whole).

    >>> app = BodyLimit(inner_app, lambda path, content_type: 2**20, upload_limit=2**30)   # doctest: +SKIP
    """

    def __init__(self, app: Any, limit_for: Callable[[str, str], int], upload_limit: int | None = None) -> None:
        self.app = app
        self.limit_for = limit_for  # (path, content type) -> bytes
        self.upload_limit = upload_limit  # which limit is the upload's (to name its flag)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        limit = self.limit_for(scope.get("path", ""), headers.get(b"content-type", b"").decode("latin-1").lower())
        declared = headers.get(b"content-length")
        flag = "--max-upload-bytes" if limit == self.upload_limit else "--max-body-bytes"
        too_big = (f"request body over the limit of {limit:,} bytes; send a smaller one (the server's {flag} sets "
                   "the limit)")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            for message in _json_reply(413, too_big):
                await send(message)
            return
        seen = 0
        started = False

        async def counted_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(too_big)
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message.get("type") == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge as exc:
            if started:
                raise
            for message in _json_reply(413, exc.detail):
                await send(message)


class TokenCheck:
    """ASGI wrapper: answer 401 unless the request carries the token (see :func:`token_ok`); ``/health`` stays
    open for load balancers and probes. Checked before any body is read.

    >>> app = TokenCheck(inner_app, token="s3cret")                         # doctest: +SKIP
    """

    def __init__(self, app: Any, token: str | None, public: Callable[[str], bool] | None = None) -> None:
        self.app = app
        self.token = token
        self.public = public or (lambda path: False)  # paths served to anyone (the page's own static files)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or self.token is None or path.rstrip("/").endswith("/health") or self.public(path):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        auth, key = headers.get(b"authorization"), headers.get(b"x-api-key")
        if token_ok(self.token, auth.decode("latin-1") if auth else None, key.decode("latin-1") if key else None):
            return await self.app(scope, receive, send)
        start, body = _json_reply(401, "missing or wrong token: send 'Authorization: Bearer <token>' (the "
                                       "server's --token or LORABLEND_TOKEN)")
        start["headers"].append((b"www-authenticate", b'Bearer realm="lorablend"'))
        await send(start)
        await send(body)


__all__ = ["BodyLimit", "TokenCheck", "LORA_SUFFIXES", "inside", "resolve_inside", "token_ok"]
