"""The hashes A1111 and kohya's tools use to identify a LoRA file.

``sshs_model_hash`` (kohya sd-scripts, "safetensors hash") is the sha256 hex digest of a safetensors
file's *data section*: every byte after the 8-byte header length and the JSON header. Because it skips
the header, editing metadata does not change it, and a writer can store the hash of its own data section
in its own header. A1111 shows it as the LoRA's hash when present.

>>> import hashlib
>>> blob = (2).to_bytes(8, "little") + b"{}" + b"data"
>>> data_section_hash(blob) == hashlib.sha256(b"data").hexdigest()
True
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_CHUNK = 1 << 20


def _header_length(prefix: bytes, source: str) -> int:
    if len(prefix) < 8:
        raise ValueError(f"{source}: not a safetensors file (shorter than its 8-byte header length)")
    return int.from_bytes(prefix[:8], "little")


def data_section_hash(blob: bytes | bytearray | memoryview) -> str:
    """sha256 hex of the bytes after the header of an in-memory safetensors serialization.

    >>> import torch, safetensors.torch
    >>> len(data_section_hash(safetensors.torch.save({"x": torch.zeros(2)})))
    64
    """
    view = memoryview(blob)
    n = _header_length(bytes(view[:8]), "<bytes>")
    if 8 + n > len(view):
        raise ValueError(f"<bytes>: header claims {n} bytes but only {len(view) - 8} follow; the data is truncated")
    return hashlib.sha256(view[8 + n:]).hexdigest()


def sshs_model_hash(path: str | os.PathLike) -> str:
    """The kohya/A1111 ``sshs_model_hash`` of a safetensors file, streamed (no full read into memory).

    >>> sshs_model_hash("style.safetensors")                               # doctest: +SKIP
    '7a1c…'
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        n = _header_length(f.read(8), str(path))
        if 8 + n > size:
            raise ValueError(f"{path}: header length {n} runs past the end of the file ({size} bytes); file truncated")
        f.seek(8 + n)
        digest = hashlib.sha256()
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
