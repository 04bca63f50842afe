"""naming/fused.py: the original names of fused transformer layers (BFL Flux, SAI MMDiT) -> diffusers modules and
the output rows each takes. Checked on the real model configs: a fused layer's pieces tile its rows exactly once."""

from __future__ import annotations

import pytest

from lorablend.naming.configs import FLUX_DEV_TRANSFORMER, SD3_MEDIUM_TRANSFORMER
from lorablend.naming.fused import WIDENED_INPUTS, flux_source_names, sd3_source_names, source_names


def _tiles(pieces) -> bool:
    if len(pieces) == 1 and pieces[0].spans is None:  # the source layer whole
        return True
    rows = sorted(span for p in pieces for span in p.spans)
    total = max(p.source_rows for p in pieces)
    return rows[0][0] == 0 and rows[-1][1] == total and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))


@pytest.mark.parametrize("build, config", [(flux_source_names, FLUX_DEV_TRANSFORMER),
                                           (sd3_source_names, SD3_MEDIUM_TRANSFORMER)])
def test_every_original_layer_is_tiled_by_its_pieces_rows(build, config):
    table = build(config)
    assert table
    bad = [name for name, pieces in table.items() if not _tiles(pieces)]
    assert not bad, bad[:5]


def test_flux_qkv_and_linear1_split_at_the_real_widths():
    t = flux_source_names(FLUX_DEV_TRANSFORMER)
    qkv = t["double_blocks.0.img_attn.qkv"]
    assert [(p.path, p.spans) for p in qkv] == [("transformer_blocks.0.attn.to_q", ((0, 3072),)),
                                                ("transformer_blocks.0.attn.to_k", ((3072, 6144),)),
                                                ("transformer_blocks.0.attn.to_v", ((6144, 9216),))]
    assert [(p.path.rsplit(".", 1)[-1], p.spans) for p in t["single_blocks.37.linear1"]][-1] == (
        "proj_mlp", ((9216, 21504),))
    assert "double_blocks.19.img_attn.qkv" not in t  # FLUX.1-dev has 19 double blocks


def test_a_unet_has_no_original_names_and_flux_may_widen_its_x_embedder():
    assert source_names("unet", {}) == {} and source_names(None, {}) == {}
    assert "x_embedder" in WIDENED_INPUTS["flux"]


def test_schnell_has_no_guidance_embedder_names():
    table = flux_source_names({**FLUX_DEV_TRANSFORMER, "guidance_embeds": False})
    assert "guidance_in.in_layer" not in table and "time_in.in_layer" in table
