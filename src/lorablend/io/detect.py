"""Which format a set of keys is in, read from the keys themselves (never from the file name).

``detect_format`` answers ``"kohya"`` (kohya / A1111 / LyCORIS / OneTrainer flat names), ``"original"`` (a
transformer's own dotted names: BFL Flux / SAI MMDiT, as ai-toolkit, ComfyUI, XLabs, BFL control LoRAs and LyCORIS
write them; :mod:`.read_original`), ``"diffusers"`` (diffusers / PEFT names), ``"cloneofsimo"`` (positional keys,
refused by :mod:`lorablend.io.legacy`) or ``"unknown"``. A file that mixes layouts is named after the majority;
``sort_keys`` still sends every key to the reader that understands it.

>>> detect_format(["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"])
'kohya'
>>> detect_format(["unet.mid_block.attentions.0.proj_in.lora_A.weight"])
'diffusers'
>>> detect_format(["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"])
'original'
"""

from __future__ import annotations

import re
from typing import Iterable

from .legacy import is_cloneofsimo
from .read_diffusers import is_diffusers_key
from .read_kohya import is_kohya_key
from .read_original import is_original_key, module_of

READ_FORMATS = ("diffusers", "kohya", "original")  # the formats load_adapter reads (format= may force one)
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


def sort_keys(keys: Iterable[str]) -> dict[str, list[str]]:
    """Each key under the reader that understands it: ``kohya``, ``original``, ``diffusers``, or ``other``.

    >>> sort_keys(["lora_unet_x.alpha", "double_blocks.0.img_in.scale", "x"])["original"]
    ['double_blocks.0.img_in.scale']
    """
    out: dict[str, list[str]] = {"kohya": [], "original": [], "diffusers": [], "other": []}
    for key in keys:
        if is_kohya_key(key):
            out["kohya"].append(key)
        elif is_original_key(key):  # before diffusers: its lora_A / lora_B spellings are theirs too
            out["original"].append(key)
        elif is_diffusers_key(key):
            out["diffusers"].append(key)
        else:
            out["other"].append(key)
    _alphas_with_their_module(out)
    return out


def _alphas_with_their_module(out: dict[str, list[str]]) -> None:
    """An ``alpha`` goes to the reader of its module's other keys: a dotted path with kohya tensor names
    (``transformer_blocks.0.attn.to_k.lora_down.weight`` + ``.alpha``, OneTrainer's ``transformer.…``) is
    read_original's, while ``unet.….alpha`` beside ``lora_A`` stays with read_diffusers, and so does a bare
    ``layers.0.attention.qkv.alpha`` beside ``….lora.down.weight``."""
    for reader, source in (("original", "diffusers"), ("original", "other"), ("diffusers", "other")):
        modules = {module_of(k) for k in out[reader]}
        moved = {k for k in out[source] if k.endswith(".alpha") and k[: -len(".alpha")] in modules}
        if moved:
            out[reader] += [k for k in out[source] if k in moved]
            out[source] = [k for k in out[source] if k not in moved]


def detect_format(keys: Iterable[str]) -> str:
    """The on-disk LoRA format of these keys."""
    keys = list(keys)
    if is_cloneofsimo(keys):
        return "cloneofsimo"
    counts = {fmt: len(found) for fmt, found in sort_keys(keys).items() if fmt != "other"}
    if not any(counts.values()):
        return "unknown"
    return max(counts, key=lambda fmt: counts[fmt])  # ties: kohya, then original, then diffusers


def diagnose(keys: list[str]) -> str:
    """A hint about a file none of whose keys name a layer, for the error message ('' when none applies)."""
    if any(k.startswith("lora_unet_unet_") for k in keys):
        return (" Its names start with 'lora_unet_unet_' (the 'unet' prefix doubled) and glue '_lora_down' onto "
                "the module name: a broken hand conversion of a diffusers file. Load the original diffusers file, "
                "or convert that one again with a real converter.")
    if keys and all(k.startswith(("model.diffusion_model.", "cond_stage_model.", "first_stage_model.")) for k in keys):
        return " These are the keys of a full Stable Diffusion checkpoint, not of a LoRA."
    if any(k.startswith(("lora_transformer_", "transformer.", "lora_unet_", "lycoris_", "diffusion_model."))
           for k in keys):
        return (" The names look like a LoRA for a transformer lorablend does not know (it reads SD1.x, SD2.x, SDXL, "
                "Flux.1, SD3 / SD3.5, Qwen-Image, Wan 2.1 / 2.2, Flux.2, Z-Image and Chroma).")
    return ""
