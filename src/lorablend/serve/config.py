"""The server's settings, in one place: what the command line sets and what the app, the worker and the checks
read. Plain data, checked once at start-up so a bad setting fails before the model is loaded.

>>> ServeSettings(lora_dir=".", max_batch=4).max_batch
4
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    Limits (each a flag of ``lorablend serve`` and a bound in ``/openapi.json``): ``max_batch`` images generated
    together; ``max_images`` images one request may ask for; ``max_steps`` inference steps; ``max_pixels``
    width × height of one image (a video's frame); ``max_frames`` frames of one video; ``max_queue`` requests waiting (more: 503); ``max_upload_bytes`` a LoRA upload;
    ``max_body_bytes`` every other request body. ``drain_seconds``: how long a stopping server lets queued and
    running requests finish before answering them 503. ``upload_dir``: where uploaded LoRAs are kept (they survive
    a restart); None: a private temporary folder removed at stop. ``mixed_batches``: batch different mixes
    together (per-sample LoRA weights).

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
    max_pixels: int = 1024 * 1024
    max_frames: int = 81
    max_queue: int = 64
    drain_seconds: float = 10.0
    upload_dir: str | os.PathLike | None = None
    mixed_batches: bool = True

    def check(self) -> "ServeSettings":
        """Raise ``ValueError`` naming the setting and the fix; return self when every setting is usable.

        >>> ServeSettings(lora_dir=".").check().max_batch
        4
        """
        folder = Path(self.lora_dir)
        if not folder.is_dir():
            raise ValueError(f"--lora-dir {self.lora_dir}: not a folder; pass the folder that holds your LoRA files")
        for flag, value in (("--cache-bytes", self.cache_bytes), ("--max-batch", self.max_batch),
                            ("--max-images", self.max_images), ("--max-steps", self.max_steps),
                            ("--max-upload-bytes", self.max_upload_bytes), ("--max-body-bytes", self.max_body_bytes),
                            ("--default-steps", self.default_steps), ("--max-pixels", self.max_pixels),
                            ("--max-frames", self.max_frames), ("--max-queue", self.max_queue)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                example = " of bytes, e.g. 4000000000" if flag == "--cache-bytes" else ", e.g. 4"
                raise ValueError(f"{flag} {value}: must be a positive number{example}")
        if not isinstance(self.drain_seconds, (int, float)) or not 0 <= self.drain_seconds <= 3600:
            raise ValueError(f"--drain-seconds {self.drain_seconds}: use 0 to 3600 seconds, e.g. 10")
        if self.upload_dir is not None and Path(self.upload_dir).exists() and not Path(self.upload_dir).is_dir():
            raise ValueError(f"--upload-dir {self.upload_dir}: not a folder; name a folder (created when missing)")
        if self.token is not None and not self.token.strip():
            raise ValueError("--token is empty; pass a non-empty token or none at all")
        return self


LIMIT_FLAGS = {  # ServeSettings field -> (type, help): each a flag of `lorablend serve` (None: the default here)
    "max_steps": (int, "inference steps one request may ask for (default 150)"),
    "max_pixels": (int, "width x height of one image (default 1048576: 1024x1024)"),
    "max_images": (int, "images one request may ask for (default 8)"),
    "max_frames": (int, "frames of one video on a video pipeline (Wan; default 81)"),
    "max_queue": (int, "requests waiting for the pipeline; more answer 503 + Retry-After (default 64)"),
    "max_body_bytes": (int, "bytes of a request body other than an upload (default 1 MiB)"),
    "max_upload_bytes": (int, "bytes of a LoRA upload (default 2 GiB)"),
    "drain_seconds": (float, "on Ctrl-C / SIGTERM: seconds queued and running requests get to finish before they are "
                             "answered 503 (default 10; a 2nd Ctrl-C answers them at once)"),
    "upload_dir": (str, "folder where uploaded LoRAs are kept, served again after a restart (default: a private "
                        "temporary folder, removed when the server stops)"),
}


def add_limit_flags(parser: Any) -> None:
    """Add ``--max-steps`` … ``--upload-dir`` (:data:`LIMIT_FLAGS`) to an argparse parser.

    >>> import argparse; p = argparse.ArgumentParser(); add_limit_flags(p); p.parse_args(["--max-steps", "9"]).max_steps
    9
    """
    for name, (kind, text) in LIMIT_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=text,
                            metavar="DIR" if name == "upload_dir" else "N")


def limits_given(args: Any) -> dict[str, Any]:
    """The limit flags set on the command line, as ServeSettings fields.

    >>> import argparse; limits_given(argparse.Namespace(max_queue=3, max_steps=None))
    {'max_queue': 3}
    """
    return {k: getattr(args, k) for k in LIMIT_FLAGS if getattr(args, k, None) is not None}


__all__ = ["LIMIT_FLAGS", "add_limit_flags", "limits_given", "MAX_GUIDANCE", "MAX_PROMPT_CHARS", "MAX_SEED", "MAX_SIDE", "MAX_WEIGHT", "ServeSettings"]

# Old names (settings classes all end in ...Settings since 0.2), importable until 0.3 with a warning.
from ..errors import renamed_names  # noqa: E402  (only for the old names below)

__getattr__ = renamed_names(__name__, {'ServeConfig': 'ServeSettings'}, globals())
