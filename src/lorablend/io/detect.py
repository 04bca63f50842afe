"""Which format a set of keys is in, read from the keys themselves (never from the file name).

``detect_format`` answers ``"kohya"`` (kohya / A1111 / LyCORIS names), ``"diffusers"`` (diffusers / PEFT
names), ``"cloneofsimo"`` (positional keys, refused by :mod:`lorablend.io.legacy`) or ``"unknown"``.
A file that mixes kohya and diffusers keys is named after the majority; ``split_keys`` still sends every
key to the reader that understands it.

>>> detect_format(["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"])
'kohya'
>>> detect_format(["unet.mid_block.attentions.0.proj_in.lora_A.weight"])
'diffusers'
"""

from __future__ import annotations

import re
from typing import Iterable

from .legacy import is_cloneofsimo
from .read_diffusers import is_diffusers_key
from .read_kohya import is_kohya_key

READ_FORMATS = ("diffusers", "kohya")  # the formats load_adapter reads (format= may force one)
FORMATS = READ_FORMATS  # the old name, kept for callers that import it

# Textual-inversion embeddings that trainers bundle into LoRA files (kohya "bundle_emb", cloneofsimo "<s1>",
# SDXL embedding files' "clip_l" / "clip_g", A1111 "string_to_param" / "emb_params").
_EMBEDDING = re.compile(r"^(bundle_emb\.|<[^>]+>$|clip_[lg]$|emb_params$|string_to_param\.)")


def embedding_reason(key: str) -> str | None:
    """Why a key is a textual-inversion embedding we do not load as part of the LoRA, or None."""
    if _EMBEDDING.match(key):
        return ("a textual-inversion embedding bundled with the LoRA; lorablend loads LoRA layers only: load the "
                "embedding with the pipeline's load_textual_inversion")
    return None


def split_keys(keys: Iterable[str]) -> tuple[list[str], list[str], list[str]]:
    """``(kohya_keys, diffusers_keys, other_keys)``."""
    kohya, diffusers, other = [], [], []
    for key in keys:
        if is_kohya_key(key):
            kohya.append(key)
        elif is_diffusers_key(key):
            diffusers.append(key)
        else:
            other.append(key)
    return kohya, diffusers, other


def detect_format(keys: Iterable[str]) -> str:
    """The on-disk LoRA format of these keys."""
    keys = list(keys)
    if is_cloneofsimo(keys):
        return "cloneofsimo"
    kohya, diffusers, _ = split_keys(keys)
    if not kohya and not diffusers:
        return "unknown"
    return "kohya" if len(kohya) >= len(diffusers) else "diffusers"


def diagnose(keys: list[str]) -> str:
    """A hint about a file none of whose keys name a layer, for the error message ('' when none applies)."""
    if any(k.startswith("lora_unet_unet_") for k in keys):
        return (" Its names start with 'lora_unet_unet_' (the 'unet' prefix doubled) and glue '_lora_down' onto "
                "the module name: a broken hand conversion of a diffusers file. Load the original diffusers file, "
                "or convert that one again with a real converter.")
    if keys and all(k.startswith(("model.diffusion_model.", "cond_stage_model.", "first_stage_model.")) for k in keys):
        return " These are the keys of a full Stable Diffusion checkpoint, not of a LoRA."
    if any(k.startswith(("lora_transformer_", "transformer.", "lora_unet_double_blocks", "diffusion_model.")) for k in keys):
        return " The names look like a LoRA for another architecture (Flux, SD3, a DiT), not SD1.x / SD2.x / SDXL."
    return ""
