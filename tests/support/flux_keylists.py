"""LoRA state dicts with the exact names, shapes and layouts of real Flux.1 files, values of our own (seeded).

The key lists are InvokeAI's test data (../shared/realdata/newfamily_loras/keylists_invokeai: names and shapes of
real third-party files, no weights; never copied into this project). The keylists hold no dtypes: tensors are
bf16, Flux's native dtype, alphas fp32 scalars. ``rank`` replaces the rank axis of every low-rank factor (a real
rank-16 Flux LoRA is ~150 MB of values); every other axis — the 3072 / 9216 / 12288 / 21504 widths — is the
file's own.
"""

from __future__ import annotations

import json

import pytest
import torch

from realdata import SHARED

KEYLISTS = SHARED / "newfamily_loras" / "keylists_invokeai"
requires_keylists = pytest.mark.skipif(not KEYLISTS.is_dir(), reason=f"key lists not found at {KEYLISTS}")

_DOWN = ("lora_down.weight", "lora_A.weight", ".down.weight")
_UP = ("lora_up.weight", "lora_B.weight", ".up.weight")
ALPHA = 4.0


def keylist(name: str) -> dict[str, list[int]]:
    """``{key: shape}`` of one real file (``flux_lora_kohya_format`` …)."""
    return json.loads((KEYLISTS / f"{name}.json").read_text())["state_dict_shapes"]


def state_dict(name: str, rank: int | None = 2, seed: int = 0, only: str = "") -> dict[str, torch.Tensor]:
    """The file's keys (those starting with ``only``) with seeded bf16 values: its shapes, the rank axis set to
    ``rank`` (None keeps the file's)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in keylist(name).items():
        if not key.startswith(only):
            continue
        shape = list(shape)
        if key.endswith("alpha"):
            out[key] = torch.tensor(ALPHA)
            continue
        if rank is not None and key.endswith(_DOWN):
            shape[0] = rank
        elif rank is not None and key.endswith(_UP):
            shape[1] = rank
        t = torch.randn(*shape, generator=g) * 0.1
        if key.endswith(("dora_scale", ".scale")):
            t = t.abs() + 1.0  # magnitudes and norm scales are positive
        out[key] = t.to(torch.bfloat16)
    return out


def probe(delta, columns: int, seed: int = 1) -> torch.Tensor:
    """``ΔW @ X`` for a seeded X: compares two deltas of a 3072-wide layer without building either ΔW when they
    are low-rank (``up @ (down @ X)``)."""
    x = torch.randn(columns, 3, generator=torch.Generator().manual_seed(seed))
    low = delta.low_rank_factors()
    if low is not None:
        return low[0] @ (low[1] @ x)
    return delta.delta_weight().reshape(delta.shape[0], -1) @ x


def few_blocks(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Block 0 of each kind and every layer outside the blocks."""
    return {k: v for k, v in sd.items() if "blocks" not in k or any(s in k for s in ("blocks.0.", "blocks_0_"))}

