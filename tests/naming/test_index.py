"""naming/index.py: ModuleIndex — every adaptable layer of a model and every name other tools use for it; the one
rule for which component denoises."""

from __future__ import annotations

import torch

from lorablend.naming import DENOISER_COMPONENTS, components_of, denoiser_component, index_from_components
from lorablend.naming.standard import standard_index


def test_every_layer_round_trips_through_its_kohya_name():
    for family in ("sd1", "sdxl"):
        index = standard_index(family)
        bad = [k for k in index.modules if index.lookup_kohya(index.kohya_name(k)) != k]
        assert not bad, (family, bad[:3])


def test_ldm_names_resolve_to_diffusers_keys():
    index = standard_index("sdxl")
    assert index.lookup_kohya("lora_unet_input_blocks_4_1_proj_in") == "unet.down_blocks.1.attentions.0.proj_in"
    assert index.lookup("unet", "down_blocks.1.attentions.0.proj_in") == "unet.down_blocks.1.attentions.0.proj_in"
    assert index.lookup("unet", "no.such.layer") is None


def test_the_denoiser_is_the_unet_or_the_transformer():
    assert denoiser_component({"unet": torch.nn.Linear(1, 1), "text_encoder": None}) == "unet"
    assert denoiser_component({"transformer": torch.nn.Linear(1, 1)}) == "transformer"
    assert denoiser_component({"vae": torch.nn.Linear(1, 1)}) is None
    assert {"unet", "transformer"} <= set(DENOISER_COMPONENTS)


def test_a_live_pipeline_indexes_as_its_family_with_block_labels(tiny_pipes):
    index = index_from_components(components_of(tiny_pipes["sdxl"]))
    assert index.family == "sdxl" and index.components == ["unet", "text_encoder", "text_encoder_2"]
    assert index.block("unet.mid_block.attentions.0.proj_in") == "M00"
    assert "BASE" in index.block_labels() and "M00" in index.block_labels()
