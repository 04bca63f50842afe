"""Per-module ΔW of the 2025-26 layouts at real sizes against diffusers' own readers (the parity oracle without
weights): diffusers' ``lora_conversion_utils`` turns the same synthetic file (real names and widths, rank 2, fp32)
into PEFT lora_A / lora_B per module; each module's ΔW (alphas folded as diffusers folds them) must equal ours,
probed as ΔW @ X (no 5120 x 13824 matrix is built), within fp32 rounding. Where diffusers refuses or drops a layout,
the test says what we read instead (LoKr by its formula).
"""

from __future__ import annotations

import pytest
import torch

from keylists_2026 import requires_2026, shape_from_family, state_dict
from lorablend.io.load import load_adapter

pytestmark = requires_2026
convert = pytest.importorskip("diffusers.loaders.lora_conversion_utils")

# layout -> (family, diffusers' converter for it)
CASES = {
    "wan21-i2v-14b_comfy__musubi-convert-lora-other-expanded": ("wan-i2v-14b", "_convert_non_diffusers_wan_lora_to_diffusers"),
    "wan22-ti2v-5b_kohya__musubi-tuner-expanded": ("wan-5b", "_convert_musubi_wan_lora_to_diffusers"),
    "qwenimage_kohya__musubi-tuner-expanded": ("qwen-image", "_convert_non_diffusers_qwen_lora_to_diffusers"),
    "flux2-klein-4b_kohya__musubi-tuner-expanded": ("flux2-klein-4b", "_convert_kohya_flux2_lora_to_diffusers"),
    "zimage_kohya__musubi-tuner-expanded": ("z-image", "_convert_non_diffusers_z_image_lora_to_diffusers"),
}


def _probe_ours(delta, x: torch.Tensor) -> torch.Tensor:
    low = delta.low_rank_factors()
    if low is not None:
        return low[0].float() @ (low[1].float() @ x)
    return delta.delta_weight().reshape(delta.shape[0], -1) @ x


@pytest.mark.parametrize("stem", sorted(CASES))
def test_every_module_matches_diffusers(stem):
    family, converter = CASES[stem]
    sd = {k: v.float() for k, v in state_dict(stem, shape_from_family(family)).items()}
    ours = load_adapter(sd)
    assert ours.family == family and ours.report.complete
    theirs = getattr(convert, converter)(dict(sd))
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in theirs})
    assert modules and {f"transformer.{m.removeprefix('transformer.')}" for m in modules} == set(ours.deltas)
    g = torch.Generator().manual_seed(0)
    for module in modules:
        a, b = theirs[f"{module}.lora_A.weight"], theirs[f"{module}.lora_B.weight"]
        x = torch.randn(a.shape[1], 3, generator=g)
        delta = ours.deltas[f"transformer.{module.removeprefix('transformer.')}"]
        torch.testing.assert_close(_probe_ours(delta, x), b @ (a @ x), rtol=1e-5, atol=1e-6, msg=module)


def test_lokr_on_fused_flux2_rows_is_the_kronecker_product():
    # diffusers reads this Flux.2 klein LoKr (BFL names, fused qkv) into its own fused LoKr layers; ours splits the
    # qkv rows onto to_q / to_k / to_v exactly: each is its rows of alpha/r · kron(w1, w2)
    stem = "flux2-klein_bfl-lokr__diffusers-issue13137"
    sd = {k: v.float() for k, v in state_dict(stem, shape_from_family("flux2-klein-9b")).items()}
    ours = load_adapter(sd)
    assert ours.family == "flux2-klein-9b" and ours.report.complete
    w1, w2 = sd["double_blocks.0.img_attn.qkv.lokr_w1"], sd["double_blocks.0.img_attn.qkv.lokr_w2"]
    # LyCORIS' scale: alpha / w2's rank when w2 is factored; a whole w2 (as here) has scale 1. Rows r of
    # kron(w1, w2) are w1's rows r // p against w2 (p = w2's rows): each module's 4096 rows, without the whole kron
    p = w2.shape[0]
    for i, proj in enumerate(("to_q", "to_k", "to_v")):
        got = ours.deltas[f"transformer.transformer_blocks.0.attn.{proj}"].delta_weight()
        rows = torch.kron(w1[4096 * i // p: 4096 * (i + 1) // p], w2)
        torch.testing.assert_close(got, rows, rtol=1e-5, atol=1e-6)


def test_zimage_lokr_diffusers_refuses_is_read():
    # diffusers#13221: diffusers' Z-Image reader leaves these LoKr keys over and raises; every key maps here
    stem = "zimage_lokr__diffusers-issue13221"
    sd = {k: v.float() for k, v in state_dict(stem, shape_from_family("z-image")).items()}
    with pytest.raises(ValueError, match="should be empty"):
        convert._convert_non_diffusers_z_image_lora_to_diffusers(dict(sd))
    ours = load_adapter(sd)
    assert ours.family == "z-image" and ours.report.complete and len(ours.deltas) == 24
    w1, w2 = sd["layers.0.attention.to_k.lokr_w1"], sd["layers.0.attention.to_k.lokr_w2"]
    torch.testing.assert_close(ours.deltas["transformer.layers.0.attention.to_k"].delta_weight(), torch.kron(w1, w2))
