"""``lorablend serve``: any LoRA mix per request over HTTP, on one pipeline, switched without reloading.

One file, one job: ``app`` (``create_app``, the native routes), ``compat`` (the A1111 and OpenAI routes),
``state`` (one server's objects and a request's way through them), ``worker`` (the pipeline's one thread:
batches and switches), ``cache`` (parsed adapters, LRU by bytes), ``catalog`` (names -> files in ``--lora-dir``),
``prompts`` (A1111 ``<lora:name:weight>`` tokens), ``schemas`` (request bodies), ``responses`` (answer shapes),
``security`` (token, paths, body size), ``metrics`` (Prometheus text), ``config`` (the settings), ``run`` (the
command's start-up).
Needs the ``serve`` extra (``pip install lorablend[serve]``: fastapi, uvicorn, python-multipart).

>>> from lorablend.serve import ServeSettings, create_app
>>> app = create_app(pipeline, ServeSettings(lora_dir="loras/"))               # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from ..errors import renamed_names
from .config import ServeSettings

__all__ = ["Generation", "ServeSettings", "create_app"]

# Old names (settings classes all end in ...Settings since 0.2), importable until 0.3 with a warning.
_renamed = renamed_names(__name__, {'ServeConfig': 'ServeSettings'}, globals())


def __getattr__(name: str) -> Any:
    """``create_app`` and ``Generation`` are imported on first use: ``lorablend.serve.config`` (the command line's
    flags) must import without the serve extra (fastapi)."""
    if name == "create_app":
        from .app import create_app
        return create_app
    if name == "Generation":
        from .batch import Generation
        return Generation
    return _renamed(name)
