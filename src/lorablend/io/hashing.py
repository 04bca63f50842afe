"""The hashes A1111 and kohya's tools use to identify a LoRA file, under the name callers have always imported.

``sshs_model_hash`` (kohya sd-scripts, "safetensors hash") is the sha256 hex digest of a safetensors file's
*data section*; it lives with the format in ``io/safetensors.py`` (one header reader, one hash), and is named
here so that ``from lorablend.io.hashing import sshs_model_hash`` keeps working.

>>> import hashlib, torch
>>> from lorablend.io.safetensors import serialize
>>> header, chunks = serialize({"x": torch.zeros(2)})
>>> data_section_hash(header + b"".join(chunks)) == hashlib.sha256(b"".join(chunks)).hexdigest()
True
"""

from __future__ import annotations

from .safetensors import data_section_hash, sshs_model_hash

__all__ = ["data_section_hash", "sshs_model_hash"]
