"""Every older LoRA layout in ../shared read offline with the 2025-26 families in the table: the right family (or the
refusal it always had), every key accounted for, none read as one of the new families.

Walked: the real files of ../shared/realdata/loras (SD1.x / SD2.x / SDXL), the key lists of real files in
newfamily_loras/keylists_invokeai (Flux.1, Qwen-Image, and the uncovered Anima / Krea 2) and the stripped headers of
real kohya files (newfamily_loras/invokeai_stripped_headers), as seeded synthetic files in their names and shapes.
The 2026 layouts are walked by test_load_2026.py. (keymaps/ holds checkpoint key maps, not LoRA layouts.)
"""

from __future__ import annotations

import json

import pytest
import torch

from flux_keylists import KEYLISTS, state_dict as flux_state_dict
from realdata import LORAS, SHARED
from lorablend.errors import LoraFormatError
from lorablend.io.load import load_adapter

HEADERS = SHARED / "newfamily_loras" / "invokeai_stripped_headers"
# a real file the readers refuse, and why (tests/io/test_load_realdata.py says more about each)
_REFUSED = {"MALFORMED": "lora_unet_unet_", "cloneofsimo": "cloneofsimo", "TRUNCATED": "(?i)truncat|shorter|ends",
            ".pt": "(?i)pickle|tensor list|cloneofsimo"}
_FAMILY_OF_FOLDER = {"sd1x": "sd1", "sd2x": "sd2", "sdxl": "sdxl"}


def _real_files() -> list[str]:
    if not LORAS.is_dir():
        return []
    return sorted(str(p.relative_to(LORAS)) for p in LORAS.glob("*/*") if p.suffix in (".safetensors", ".bin", ".pt"))


def _keylists() -> list[str]:
    return sorted(p.stem for p in KEYLISTS.glob("*.json")) if KEYLISTS.is_dir() else []


def _headers() -> list[str]:
    return sorted(p.name for p in HEADERS.glob("*.json")) if HEADERS.is_dir() else []


def _accounted(adapter, keys) -> None:
    assert {r.key for r in adapter.report.records} == set(keys)


@pytest.mark.parametrize("name", _real_files())
def test_every_real_file(name):
    refused = next((why for mark, why in _REFUSED.items() if mark in name), None)
    if refused is not None:
        with pytest.raises(Exception, match=refused):  # LoraFormatError or WeightFileError: each says why
            load_adapter(LORAS / name)
        return
    adapter = load_adapter(LORAS / name)
    assert adapter.family == _FAMILY_OF_FOLDER[name.split("/")[0]]
    assert adapter.report.complete, adapter.report.summary()


@pytest.mark.parametrize("stem", _keylists())
def test_every_invokeai_key_list(stem):
    if stem.startswith(("anima_", "krea2_")):  # Anima (Cosmos) and Krea 2: no covered family has their layers
        with pytest.raises(LoraFormatError, match="names a layer|names no layer|does not know"):
            load_adapter(flux_state_dict(stem))
        return
    sd = flux_state_dict(stem)
    if stem == "flux_lokr_bfl_format":
        # real BFL names, but factor shapes that multiply to no Flux layer: refused offline, key by key with a
        # target (tests/io/test_load_flux.py::test_the_lokr_excerpt_is_reported_key_by_key)
        with pytest.raises(LoraFormatError, match="shapes fit no"):
            load_adapter(sd)
        return
    if stem == "qwen_image_lora_kohya_format":
        # InvokeAI's mock LoKr shapes ([3072, 16] x [16, 3072] is no Kronecker factorisation of 3072 x 3072): the
        # names are Qwen-Image's, the shapes fit no model, and the refusal says so (the same names with real
        # shapes: tests/io/test_load_2026.py)
        with pytest.raises(LoraFormatError, match="shapes fit no"):
            load_adapter(sd)
        return
    if stem.startswith("qwen_image_"):  # attention of blocks 0-1 only: Flux.1, Chroma, Flux.2 klein 4B have it too
        with pytest.raises(LoraFormatError, match="ambiguous: its layers fit flux, qwen-image"):
            load_adapter(sd)  # refused, never read as the first family that fits
        adapter = load_adapter(sd, family="qwen-image")
        assert adapter.family == "qwen-image"
    else:
        adapter = load_adapter(sd)
        assert adapter.family == "flux", stem
    _accounted(adapter, sd)
    assert adapter.report.complete, adapter.report.summary()


@pytest.mark.parametrize("name", _headers())
def test_every_stripped_header(name):
    header = json.loads((HEADERS / name).read_text())
    g = torch.Generator().manual_seed(0)
    sd = {}
    for key, info in header.items():
        shape = list(info["shape"])
        if key.endswith("lora_down.weight"):
            shape[0] = 2
        elif key.endswith("lora_up.weight"):
            shape[1] = 2
        sd[key] = torch.tensor(4.0) if not shape else torch.randn(*shape, generator=g) * 0.05
    adapter = load_adapter(sd)
    assert adapter.family == ("sdxl" if name.startswith("sdxl") else "sd1")
    _accounted(adapter, sd)
    assert adapter.report.complete, adapter.report.summary()
