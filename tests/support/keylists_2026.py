"""Synthetic LoRA files in the exact layouts of real 2025-26 files (Qwen-Image, Wan, Flux.2, Z-Image, Chroma, and
the uncovered HiDream / HunyuanVideo), values of our own (seeded).

The layouts are ../shared/realdata/newfamily_loras/2026/keylists (names, shapes, dtypes of real files or of the key
sets real trainers write; never copied into this project). Every axis is the file's own except the rank, which is a
free choice of the trainer: ``rank`` replaces it (a real rank-16 Qwen-Image LoRA is ~600 MB of values). Where an
excerpt printed no shapes (``null``), or the source says its shapes are hand-written mocks, a key's shape comes from
the module its name means in the expected family's data (``shape_of``): those files test names, the expanded
ones (real shapes) test names and shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from realdata import SHARED

KEYLISTS_2026 = SHARED / "newfamily_loras" / "2026" / "keylists"
requires_2026 = pytest.mark.skipif(not KEYLISTS_2026.is_dir(), reason=f"2026 key lists not found at {KEYLISTS_2026}")

# file-name prefix -> the family its files are for (None: a family lorablend does not cover); longest prefix wins
EXPECTED_FAMILY = {
    "chroma_": "chroma",
    "flux2-dev_": "flux2-dev",
    "flux2-klein-4b_": "flux2-klein-4b",
    "flux2-klein-9b_": "flux2-klein-9b",
    "flux2-klein_": "flux2-klein-9b",  # diffusers#13137 "Flux 2 Klein": its keys name double_blocks.5 (4B has 0-4)
    "flux2_": "flux2-dev",  # "variant not stated"; names only
    "qwenimage_": "qwen-image",
    "wan21-14b_": "wan-14b",
    "wan21-i2v": "wan-i2v-14b",
    "wan21-t2v-1.3b_": "wan-1.3b",
    "wan21-t2v-14b_": "wan-14b",
    "wan22-i2v-a14b_": "wan-14b",
    "wan22-t2v-a14b_": "wan-14b",
    "wan22-ti2v-5b_": "wan-5b",
    "zimage_": "z-image",
    "hidream_": None,
    "hunyuanvideo_": None,
}
_DOWN = ("lora_down.weight", "lora_A.weight", "lora_A.default.weight", "lora.down.weight")
_UP = ("lora_up.weight", "lora_B.weight", "lora_B.default.weight", "lora.up.weight")
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def layouts() -> list[str]:
    """The stems of every key list (sorted)."""
    return sorted(p.stem for p in KEYLISTS_2026.glob("*.json"))


def layout(stem: str) -> dict:
    """One key list as stored."""
    return json.loads((KEYLISTS_2026 / f"{stem}.json").read_text())


def expected_family(stem: str) -> str | None:
    """The family a layout is for (None: uncovered)."""
    prefix = max((p for p in EXPECTED_FAMILY if stem.startswith(p)), key=len)
    return EXPECTED_FAMILY[prefix]


def _dtype(entry: dict, key: str) -> torch.dtype:
    text = str((entry.get("dtypes") or {}).get(key) or "BF16").split()[0]
    return _DTYPES.get(text, torch.bfloat16)


def _kronecker(out: int, inp: int) -> tuple[list[int], list[int]]:
    # w1 with 12 rows where it divides: w2's rows then divide a fused layer's q / k / v widths (LoKr rows split
    # exactly, as LyCORIS' own small w1 factors do on Flux's 9216-row qkv)
    a = next(f for f in (12, 8, 4, 2, 1) if out % f == 0)
    b = next(f for f in (8, 4, 2, 1) if inp % f == 0)
    return [a, b], [out // a, inp // b]


def _names_only_shape(key: str, module_shape: tuple[int, ...], rank: int) -> list[int]:
    """The shape of one tensor of a module whose weight is ``module_shape`` (an excerpt printed none)."""
    out = module_shape[0]
    inp = module_shape[1] if len(module_shape) > 1 else 1
    suffix = key.rsplit(".", 1)[-1]
    if key.endswith(_DOWN):
        return [rank, inp]
    if key.endswith(_UP):
        return [out, rank]
    if suffix == "alpha":
        return []
    if suffix in ("lokr_w1", "lokr_w2"):
        return _kronecker(out, inp)[0 if suffix == "lokr_w1" else 1]
    if suffix == "dora_scale":
        return [1, inp]  # OneTrainer / LyCORIS A1111 layout: per input column
    if suffix in ("lora_magnitude_vector", "diff_b"):
        return [out]
    return list(module_shape)  # diff: the whole weight (a norm's vector)


def shape_from_family(family: str):
    """``shape_of(key)`` for :func:`state_dict`: the weight shape of the module a key's name means in ``family``'s
    data (a fused name: all its rows), else the family's first attention projection (a name no module has: the
    file is to report it)."""
    from lorablend.naming import standard_index

    idx = standard_index(family)

    def shape_of(key: str) -> tuple[int, ...]:
        module = key
        for suffix in ("lora_A.weight", "lora_B.weight", "lora_down.weight", "lora_up.weight", "lora.down.weight",
                       "lora.up.weight", "lora_magnitude_vector"):
            if module.endswith("." + suffix):
                module = module[: -len(suffix) - 1]
                break
        else:
            module = module.rsplit(".", 1)[0]
        for prefix in ("diffusion_model.", "transformer."):
            module = module[len(prefix):] if module.startswith(prefix) else module
        module = "lora_unet_" + module[len("lycoris_"):] if module.startswith("lycoris_") else module
        key_ = idx.lookup("transformer", module) or idx.lookup_kohya(module)
        if key_ is not None:
            return idx.modules[key_].weight_shape
        rows = idx.lookup_rows(module)
        if rows is not None:
            first = idx.modules[rows[0][0]].weight_shape
            stop = max((b for _, spans in rows if spans for _, b in spans), default=first[0])
            return (stop, *first[1:])
        return next(i.weight_shape for i in idx.modules.values() if i.kind == "linear" and "att" in i.path)

    return shape_of


def complete(entry: dict) -> dict[str, list[int] | None]:
    """The keys to build: an excerpt that printed only PEFT DoRA magnitudes gets the lora_A / lora_B beside each
    (the real file has them; the excerpt shows the keys ComfyUI left)."""
    keys = dict(entry["state_dict_shapes"])
    for key in list(keys):
        if key.endswith(".lora_magnitude_vector"):
            module = key[: -len(".lora_magnitude_vector")]
            keys.setdefault(module + ".lora_A.weight", None)
            keys.setdefault(module + ".lora_B.weight", None)
    return keys


def state_dict(stem: str, shape_of=None, rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded state dict in one layout: its names, shapes (rank axis -> ``rank``) and dtypes. ``shape_of(key)``
    gives the weight shape of the module a key means, for keys whose shapes the layout does not hold."""
    entry = layout(stem)
    mocks = "MOCKS" in entry.get("docstring", "")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in complete(entry).items():
        if shape is None or mocks:
            shape = _names_only_shape(key, shape_of(key), rank)
        shape = list(shape)
        if key.endswith(_DOWN):
            shape[0] = rank
        elif key.endswith(_UP):
            shape[1] = rank
        if key.endswith(".alpha"):
            out[key] = torch.tensor(float(rank) * 2, dtype=_dtype(entry, key))
            continue
        t = torch.randn(*shape, generator=g) * 0.05
        if key.endswith(("dora_scale", "lora_magnitude_vector")):
            t = t.abs() + 1.0
        out[key] = t.to(_dtype(entry, key))
    return out
