"""naming's public index (``module_index``): name tables built from the real module trees, checked against an
independent LDM<->diffusers key map; the transformer families (Flux.1, SD3 / SD3.5): components, real widths,
block vocabulary and the original-name (BFL / SAI) table with its row spans."""

from __future__ import annotations

import json

import pytest

from lorablend.naming import COMPONENTS, TEXT_COMPONENTS, expand_block_weights, module_index
from lorablend.naming.configs import STANDARD
from lorablend.naming.fused import sd3_source_names
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


TRANSFORMER_FAMILIES = ("flux", "sd3", "sd35-medium", "sd35-large")


def test_components_and_text_encoders():
    assert COMPONENTS == ("unet", "transformer", "transformer_2", "text_encoder", "text_encoder_2", "text_encoder_3")
    assert TEXT_COMPONENTS == ("text_encoder", "text_encoder_2", "text_encoder_3")
    flux = module_index(family="flux")
    assert flux.components == ["transformer", "text_encoder", "text_encoder_2"]  # CLIP-L, T5-XXL
    assert flux.modules["text_encoder_2.encoder.block.23.layer.1.DenseReluDense.wo"].weight_shape == (4096, 10240)
    assert flux.modules["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"].weight_shape == (768, 768)
    sd3 = module_index(family="sd3")
    assert sd3.components == ["transformer", "text_encoder", "text_encoder_2", "text_encoder_3"]  # CLIP-L, G, T5
    assert sd3.modules["text_encoder_2.text_projection"].weight_shape == (1280, 1280)
    assert sd3.modules["text_encoder_3.encoder.block.0.layer.0.SelfAttention.q"].weight_shape == (4096, 4096)


def test_real_widths_and_kinds_of_the_flux_transformer():
    idx = module_index(family="flux")
    shapes = {k.removeprefix("transformer."): i.weight_shape for k, i in idx.modules.items()}
    assert shapes["transformer_blocks.0.ff.net.0.proj"] == (12288, 3072)
    assert shapes["single_transformer_blocks.37.proj_out"] == (3072, 15360)
    assert shapes["transformer_blocks.18.norm1.linear"] == (18432, 3072)
    assert shapes["norm_out.linear"] == (6144, 3072) and shapes["x_embedder"] == (3072, 64)
    assert idx.modules["transformer.transformer_blocks.0.attn.norm_added_k"].kind == "norm"
    assert sum(1 for i in idx.modules.values() if i.kind == "norm") == 19 * 4 + 38 * 2


@pytest.mark.parametrize("family", TRANSFORMER_FAMILIES)
def test_the_original_names_cover_every_transformer_module_once(family):
    idx = module_index(family=family)
    covered: dict[str, list[tuple[int, int]]] = {}
    for name in idx.source_names():
        if ".processor." in name:  # XLabs' spellings of the same layers
            continue
        for key, spans in idx.lookup_rows(name):
            rows = idx.modules[key].weight_shape[0]
            covered.setdefault(key, []).extend(spans or [(0, rows)])
            if spans:  # the spans of one module give exactly its rows
                assert sum(b - a for a, b in spans) == rows, (name, key)
    transformer = {k for k, i in idx.modules.items() if i.component == "transformer"}
    assert set(covered) == transformer
    assert all(len(v) in (1, 2) for v in covered.values())


def test_fused_rows_of_flux_in_order():
    idx = module_index(family="flux")
    linear1 = idx.lookup_rows("single_blocks.3.linear1")
    assert [(k.rsplit(".", 1)[-1], s) for k, s in linear1] == [
        ("to_q", ((0, 3072),)), ("to_k", ((3072, 6144),)), ("to_v", ((6144, 9216),)), ("proj_mlp", ((9216, 21504),))]
    assert idx.lookup_rows("lora_unet_double_blocks_7_txt_attn_qkv")[2] == (
        "transformer.transformer_blocks.7.attn.add_v_proj", ((6144, 9216),))
    assert idx.lookup_rows("double_blocks.7.processor.qkv_lora2") == idx.lookup_rows("double_blocks.7.txt_attn.qkv")
    # BFL's modulations are shift / scale / gate, as diffusers' AdaLayerNormZero chunks them: whole
    assert idx.lookup_rows("double_blocks.0.img_mod.lin") == (("transformer.transformer_blocks.0.norm1.linear", None),)
    assert idx.lookup_rows("single_blocks.0.modulation.lin") == (
        ("transformer.single_transformer_blocks.0.norm.linear", None),)
    # the final layer's are (shift, scale); diffusers' AdaLayerNormContinuous reads (scale, shift)
    assert idx.lookup_rows("final_layer.adaLN_modulation.1") == (
        ("transformer.norm_out.linear", ((3072, 6144), (0, 3072))),)
    assert idx.lookup_rows("double_blocks.19.img_attn.qkv") is None


def test_original_names_of_modules_for_writers():
    flux = module_index(family="flux")
    assert flux.original_name("transformer.transformer_blocks.4.attn.add_k_proj") == (
        "double_blocks.4.txt_attn.qkv", ((3072, 6144),))
    assert flux.original_name("transformer.norm_out.linear") == ("final_layer.adaLN_modulation.1", ((3072, 6144), (0, 3072)))
    assert flux.original_name("transformer.transformer_blocks.4.attn.to_out.0") == ("double_blocks.4.img_attn.proj", None)
    assert flux.original_name("text_encoder.text_model.encoder.layers.0.mlp.fc1") is None
    for name in flux.source_names():  # every module's name leads back to it
        for key, spans in flux.lookup_rows(name):
            found = flux.original_name(key)
            assert flux.lookup_rows(found[0]) == flux.lookup_rows(name) or ".processor." in name


def test_sd3_names_dual_attention_and_the_pre_only_last_block():
    medium = module_index(family="sd35-medium")
    assert medium.lookup_rows("joint_blocks.12.x_block.attn2.qkv")[1][0] == "transformer.transformer_blocks.12.attn2.to_k"
    assert medium.lookup_rows("joint_blocks.13.x_block.attn2.qkv") is None  # dual attention in layers 0-12 only
    assert medium.modules["transformer.transformer_blocks.0.norm1.linear"].weight_shape == (9 * 1536, 1536)
    table = sd3_source_names(STANDARD["sd3"][0])
    assert "joint_blocks.23.context_block.mlp.fc1" not in table  # the last context block is pre-only
    assert table["joint_blocks.22.context_block.adaLN_modulation.1"][0].spans is None
    large = module_index(family="sd35-large")
    assert large.lookup_rows("lora_unet_joint_blocks_37_context_block_adaLN_modulation_1") == (
        ("transformer.transformer_blocks.37.norm1_context.linear", ((2432, 4864), (0, 2432))),)
    assert large.lookup_rows("x_embedder.proj") == (("transformer.pos_embed.proj", None),)


def _tiny_sd3(**extra):
    from diffusers import SD3Transformer2DModel

    cfg = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
               joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
               pos_embed_max_size=8, **extra)
    return SD3Transformer2DModel(**cfg)


def test_live_tiny_transformers_are_indexed_with_their_family():
    from diffusers import FluxTransformer2DModel

    flux = FluxTransformer2DModel(num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
                                  joint_attention_dim=16, pooled_projection_dim=8, in_channels=4,
                                  axes_dims_rope=(2, 2, 4))
    idx = module_index({"transformer": flux})
    assert idx.family == "flux" and idx.block("transformer.single_transformer_blocks.1.attn.to_q") == "S01"
    assert idx.lookup_rows("single_blocks.1.linear1")[3] == (
        "transformer.single_transformer_blocks.1.proj_mlp", ((48, 112),))
    assert module_index(flux).family == "flux"  # a bare transformer is its own component
    assert module_index({"transformer": _tiny_sd3()}).family == "sd3"
    assert module_index({"transformer": _tiny_sd3(dual_attention_layers=(0,), qk_norm="rms_norm")}).family == "sd35-medium"


def test_block_labels_and_weights():
    flux = module_index(family="flux")
    labels = flux.block_labels()
    assert labels[:3] == ["BASE", "TIME", "EMBED"] and labels[-1] == "FINAL"
    assert labels[3:22] == [f"D{i:02d}" for i in range(19)] and labels[22:60] == [f"S{i:02d}" for i in range(38)]
    assert flux.block("text_encoder_2.encoder.block.0.layer.0.SelfAttention.q") == "BASE"
    weights = expand_block_weights([0.0] + [1.0] * 19 + [0.5] * 38, "flux", labels)
    assert weights["BASE"] == 0.0 and weights["S37"] == 0.5 and weights["TIME"] == 1.0
    sd3 = module_index(family="sd3")
    assert sd3.block("transformer.transformer_blocks.23.attn.to_q") == "J23"
    assert len(expand_block_weights([1.0] * 25, "sd3", sd3.block_labels())) == len(sd3.block_labels())


def test_kohya_names_of_the_transformer_families():
    flux = module_index(family="flux")
    assert flux.kohya_name("transformer.transformer_blocks.0.attn.to_q") == "lora_transformer_transformer_blocks_0_attn_to_q"
    assert flux.kohya_name("text_encoder.text_model.encoder.layers.0.mlp.fc1") == "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    assert flux.kohya_name("text_encoder_2.encoder.block.0.layer.0.SelfAttention.q") == (
        "lora_te2_encoder_block_0_layer_0_SelfAttention_q")
    sd3 = module_index(family="sd3")
    assert sd3.lookup_kohya("lora_te3_encoder_block_0_layer_0_SelfAttention_q") == (
        "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q")
