"""Formats we recognise but refuse: their keys give positions, not module names.

* cloneofsimo ``lora_diffusion`` files (``unet:0:up``, ``unet:0:down``, ``text_encoder:3:up``, optional token
  embeddings such as ``<s1>``): the index is the order in which that tool walked the model's modules, which
  depends on its version and target classes (see the ``unet`` metadata entry). Rebuilding it would mean
  guessing; a wrong guess silently puts every layer on the wrong module.
* A bare list of tensors (the oldest cloneofsimo ``.pt``: ``torch.save([up, down, up, down, ...])``): no names
  at all.

Both are refused with a :class:`~lorablend.errors.LoraFormatError` that names the format and the way out.

>>> is_cloneofsimo(["unet:0:up", "unet:0:down"])
True
"""

from __future__ import annotations

import re
from typing import Iterable, NoReturn

from ..errors import LoraFormatError

_CLONEOFSIMO_KEY = re.compile(r"^[A-Za-z_0-9]+:\d+:(up|down)$")
_CONVERT_HINT = (
    "apply it with cloneofsimo's lora_diffusion (patch_pipe), which knows its module order, and save the patched "
    "layers in a named format, or use a LoRA from a current trainer"
)


def is_cloneofsimo(keys: Iterable[str]) -> bool:
    """True when the keys are cloneofsimo's positional ``component:index:up|down`` keys."""
    return any(_CLONEOFSIMO_KEY.match(k) for k in keys)


def refuse_cloneofsimo(keys: Iterable[str], label: str) -> NoReturn:
    keys = list(keys)
    positional = [k for k in keys if _CLONEOFSIMO_KEY.match(k)]
    components = sorted({k.split(":", 1)[0] for k in positional})
    embeddings = [k for k in keys if k.startswith("<") and k.endswith(">")]
    extra = f" and {len(embeddings)} token embedding(s) {embeddings[:3]}" if embeddings else ""
    raise LoraFormatError(
        f"{label}: a cloneofsimo lora_diffusion file ({len(positional) // 2} positional up/down pairs such as "
        f"{positional[0]!r} for {components}{extra}). Its keys number modules in the order that tool visited them "
        f"instead of naming them, so they cannot be mapped without guessing; {_CONVERT_HINT}"
    )


def refuse_tensor_list(obj: list | tuple, label: str) -> NoReturn:
    import torch

    n = len(obj)
    kinds = {type(x).__name__ for x in obj}
    if n and all(isinstance(x, torch.Tensor) for x in obj):
        raise LoraFormatError(
            f"{label}: a bare list of {n} tensors with no names (the oldest cloneofsimo lora_diffusion .pt "
            f"format: up/down weights in module order). Without names the layers cannot be mapped to modules; "
            f"{_CONVERT_HINT}"
        )
    raise LoraFormatError(
        f"{label}: holds a {type(obj).__name__} of {n} items ({', '.join(sorted(kinds))}), not a dict of named "
        f"tensors; a LoRA file maps key names to tensors"
    )
