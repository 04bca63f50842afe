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

from .app import create_app
from .config import ServeSettings
from .worker import Generation

__all__ = ["Generation", "ServeSettings", "create_app"]

# Old names (settings classes all end in ...Settings since 0.2), importable until 0.3 with a warning.
from ..errors import renamed_names  # noqa: E402  (only for the old names below)

__getattr__ = renamed_names(__name__, {'ServeConfig': 'ServeSettings'}, globals())
