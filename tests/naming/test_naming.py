"""Name tables: built from the real module trees and checked against an independent LDM<->diffusers key map."""

from __future__ import annotations

import json

import pytest

from lorablend.naming import expand_block_weights, module_index
from realdata import KEYMAPS, requires_realdata


@requires_realdata
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_ldm_paths_agree_with_ai_toolkit_keymap(family):
    keymap = json.loads((KEYMAPS / f"stable_diffusion_{family}.json").read_text())["ldm_diffusers_keymap"]
    idx = module_index(family=family)
    unet = [i for i in idx.modules.values() if i.component == "unet"]
    checked = 0
    for info in unet:
        ldm_key = f"model.diffusion_model.{info.ldm_path}.weight"
        assert ldm_key in keymap, f"{info.target_key} -> {info.ldm_path} is not an LDM key"
        assert keymap[ldm_key] == f"unet_{info.path}.weight", (info.target_key, info.ldm_path, keymap[ldm_key])
        checked += 1
    # every LDM conv/linear weight in the map is reached by one of our modules
    ours = {f"model.diffusion_model.{i.ldm_path}.weight" for i in unet}
    theirs = {k for k, v in keymap.items() if k.startswith("model.diffusion_model.") and k.endswith(".weight")
              and not any(t in v for t in ("norm", ".in_layers_0", "out_layers_0"))}
    theirs = {k for k in theirs if not any(s in keymap[k] for s in ("norm",))}
    assert theirs <= ours, sorted(theirs - ours)[:5]
    assert checked == len(unet) > 250


def test_kohya_names_resolve_in_both_styles():
    idx = module_index(family="sdxl")
    assert idx.lookup_kohya("lora_unet_input_blocks_4_1_proj_in") == "unet.down_blocks.1.attentions.0.proj_in"
    assert idx.lookup_kohya("lora_unet_down_blocks_1_attentions_0_proj_in") == "unet.down_blocks.1.attentions.0.proj_in"
    assert idx.lookup_kohya("lora_unet_label_emb_0_0") == "unet.add_embedding.linear_1"
    assert idx.lookup_kohya("lora_unet_time_embed_2") == "unet.time_embedding.linear_2"
    assert idx.lookup_kohya("lora_unet_output_blocks_2_2_conv") == "unet.up_blocks.0.upsamplers.0.conv"
    assert idx.lookup_kohya("lora_unet_out_2") == "unet.conv_out"
    assert idx.lookup_kohya("lora_te2_text_projection") == "text_encoder_2.text_projection"
    assert (idx.lookup_kohya("lora_te2_text_model_encoder_layers_31_self_attn_q_proj")
            == "text_encoder_2.text_model.encoder.layers.31.self_attn.q_proj")
    # transformers 5 may drop the text_model prefix: both spellings resolve
    assert idx.lookup_kohya("lora_te1_encoder_layers_0_mlp_fc1") == "text_encoder.text_model.encoder.layers.0.mlp.fc1"
    sd1 = module_index(family="sd1")
    assert sd1.lookup_kohya("lora_unet_input_blocks_1_1_proj_in") == "unet.down_blocks.0.attentions.0.proj_in"
    assert sd1.lookup_kohya("lora_unet_up_blocks_0_upsamplers_0_conv") == "unet.up_blocks.0.upsamplers.0.conv"
    assert sd1.lookup_kohya("lora_unet_output_blocks_2_1_conv") == "unet.up_blocks.0.upsamplers.0.conv"
    assert sd1.lookup_kohya("lora_te_text_model_encoder_layers_11_self_attn_out_proj") is not None
    assert sd1.lookup_kohya("lora_unet_down_blocks_0_attentions_0_proj") is None  # no guessing


def test_kohya_name_round_trip_for_every_module():
    for family in ("sd1", "sdxl"):
        idx = module_index(family=family)
        for key in idx.modules:
            for sgm in (True, False):
                assert idx.lookup_kohya(idx.kohya_name(key, sgm=sgm)) == key


def test_module_counts_match_kohya_tables():
    # ecosystem_tools.md §1.1: attention-only LoRA targets 192 SD1.5 and 722 SDXL UNet modules
    for family, expected in (("sd1", 192), ("sdxl", 722)):
        idx = module_index(family=family)
        attn = [k for k in idx.modules if k.startswith("unet.") and ".attentions." in k
                and (".transformer_blocks." in k or k.endswith(("proj_in", "proj_out")))]
        assert len(attn) == expected


def test_block_labels_cover_resnets_and_samplers():
    idx = module_index(family="sdxl")
    assert idx.block("unet.down_blocks.0.resnets.1.conv1") == "IN02"
    assert idx.block("unet.down_blocks.0.downsamplers.0.conv") == "IN03"
    assert idx.block("unet.mid_block.resnets.1.conv2") == "M00"
    assert idx.block("unet.up_blocks.2.resnets.2.conv1") == "OUT08"
    assert idx.block("text_encoder_2.text_model.encoder.layers.0.mlp.fc1") == "BASE"
    assert len([b for b in idx.block_labels() if b.startswith(("IN", "OUT", "M"))]) == 19


def test_block_weight_lists_follow_lbw_order():
    idx = module_index(family="sd1")
    w = expand_block_weights([0.0] + [1.0] * 12 + [0.5] + [2.0] * 12, "sd1", idx.block_labels())
    assert w["BASE"] == 0.0 and w["M00"] == 0.5 and w["OUT11"] == 2.0 and w["TIME"] == 1.0
    with pytest.raises(ValueError, match="26"):
        expand_block_weights([1.0] * 5, "sd1", idx.block_labels())
    with pytest.raises(ValueError, match="IN42"):
        expand_block_weights({"IN42": 1.0}, "sd1", idx.block_labels())
