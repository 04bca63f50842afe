"""The server's settings, in one place: what the command line sets and what the app, the worker and the checks
read. Plain data, checked once at start-up so a bad setting fails before the model is loaded.

>>> ServeSettings(lora_dir=".", max_batch=4).max_batch
4
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Bounds on one request: above these a request is refused (422) rather than tying up the one pipeline.
MAX_WEIGHT = 10.0  # |LoRA weight| and |scale|: A1111 users go up to ~2; 10 leaves room, 1e30 is refused
MAX_PROMPT_CHARS = 4000
MAX_SIDE = 2048
MAX_GUIDANCE = 50.0
MAX_SEED = 2**63 - 1


@dataclass
class ServeSettings:
    """Settings of one server.

    ``lora_dir``: the folder of LoRA files served by stem name (every path a client names is resolved inside it).
    ``token``: when set, every route except ``/health`` wants ``Authorization: Bearer <token>`` (or HTTP basic
    auth with the token as password, as A1111 front-ends send). ``cache_bytes``: the adapter cache's bound.
    ``max_batch``: images generated together for requests with the same mix and settings. ``max_images``:
    images one request may ask for. ``max_steps``: inference steps one request may ask for.
    ``max_upload_bytes``: a LoRA upload's size limit; ``max_body_bytes``: every other request body's.

    >>> ServeSettings(lora_dir=".", cache_bytes=0).check()
    Traceback (most recent call last):
    ...
    ValueError: --cache-bytes 0: must be a positive number of bytes, e.g. 4000000000
    """

    lora_dir: str | os.PathLike
    token: str | None = None
    cache_bytes: int = 4 * 2**30
    max_batch: int = 4
    max_images: int = 8
    max_steps: int = 150
    max_upload_bytes: int = 2 * 2**30
    max_body_bytes: int = 1 * 2**20
    default_steps: int = 30

    def check(self) -> "ServeSettings":
        """Raise ``ValueError`` naming the setting and the fix; return self when every setting is usable.

        >>> ServeSettings(lora_dir=".").check().max_batch
        4
        """
        folder = Path(self.lora_dir)
        if not folder.is_dir():
            raise ValueError(f"--lora-dir {self.lora_dir}: not a folder; pass the folder that holds your LoRA files")
        for flag, value in (("--cache-bytes", self.cache_bytes), ("--max-batch", self.max_batch),
                            ("max_images", self.max_images), ("max_steps", self.max_steps),
                            ("max_upload_bytes", self.max_upload_bytes), ("max_body_bytes", self.max_body_bytes),
                            ("default_steps", self.default_steps)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                example = " of bytes, e.g. 4000000000" if flag == "--cache-bytes" else ", e.g. 4"
                raise ValueError(f"{flag} {value}: must be a positive number{example}")
        if self.token is not None and not self.token.strip():
            raise ValueError("--token is empty; pass a non-empty token or none at all")
        return self


__all__ = ["MAX_GUIDANCE", "MAX_PROMPT_CHARS", "MAX_SEED", "MAX_SIDE", "MAX_WEIGHT", "ServeSettings"]

# Old names (settings classes all end in ...Settings since 0.2), importable until 0.3 with a warning.
from ..errors import renamed_names  # noqa: E402  (only for the old names below)

__getattr__ = renamed_names(__name__, {'ServeConfig': 'ServeSettings'}, globals())
