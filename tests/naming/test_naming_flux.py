"""The transformer families in naming: Flux.1 and SD3 / SD3.5 — their configs, components, detection, block
vocabulary and the original-name (BFL / SAI) table with its row spans."""

from __future__ import annotations

import json

import pytest
import torch

from lorablend.naming import (
    COMPONENTS, TEXT_COMPONENTS, FamilyEvidence, detect_family, expand_block_weights, index_from_components,
    module_index,
)
from lorablend.naming.configs import FLUX_DEV_TRANSFORMER, STANDARD
from lorablend.naming.fused import flux_source_names, sd3_source_names
from lorablend.naming.meta import build_meta_components, folder_meta_components

from realdata import CONFIGS

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


@pytest.mark.skipif(not (CONFIGS / "flux1-dev").is_dir(), reason="real FLUX.1-dev config not found")
def test_flux_config_holds_the_published_numbers():
    real = json.loads((CONFIGS / "flux1-dev" / "transformer" / "config.json").read_text())
    assert {k: real[k] for k in FLUX_DEV_TRANSFORMER} == FLUX_DEV_TRANSFORMER
    with torch.device("meta"):  # the real config, built whole on the meta device: the shipped index agrees
        from diffusers import FluxTransformer2DModel

        live = index_from_components({"transformer": FluxTransformer2DModel.from_config(real)}, family="flux")
    shipped = module_index(family="flux")
    assert {k: i.weight_shape for k, i in live.modules.items()} == {
        k: i.weight_shape for k, i in shipped.modules.items() if i.component == "transformer"}


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


def test_schnell_has_no_guidance_embedder_names():
    table = flux_source_names({**FLUX_DEV_TRANSFORMER, "guidance_embeds": False})
    assert "guidance_in.in_layer" not in table and "time_in.in_layer" in table


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


def test_detection_of_the_transformer_families():
    assert detect_family(FamilyEvidence(transformer="flux")) == "flux"
    assert detect_family(FamilyEvidence(transformer_width=3072)) == "flux"
    assert detect_family(FamilyEvidence(transformer_width=1536)) == "sd3"
    assert detect_family(FamilyEvidence(transformer_width=1536, dual_attention=True)) == "sd35-medium"
    assert detect_family(FamilyEvidence(transformer="sd3", transformer_width=2432)) == "sd35-large"
    assert detect_family(FamilyEvidence(transformer="sd3", transformer_width=32)) == "sd3"  # a tiny test model
    # a pipeline with a second (T5) text encoder is not SDXL when its denoiser is a transformer
    assert detect_family(FamilyEvidence(second_text_encoder=True, transformer="flux")) == "flux"


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


def test_a_transformer_pipeline_folder_is_built_from_its_configs(tmp_path):
    tiny = {"_class_name": "FluxTransformer2DModel", "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 8,
            "num_attention_heads": 2, "joint_attention_dim": 16, "pooled_projection_dim": 8, "in_channels": 4,
            "axes_dims_rope": [2, 2, 4]}
    t5 = {"architectures": ["T5EncoderModel"], "d_model": 16, "d_ff": 32, "d_kv": 8, "num_heads": 2, "num_layers": 1,
          "vocab_size": 64}
    for component, cfg in (("transformer", tiny), ("text_encoder_2", t5)):
        (tmp_path / component).mkdir()
        (tmp_path / component / "config.json").write_text(json.dumps(cfg))
    comps = folder_meta_components(tmp_path)
    assert type(comps["transformer"]).__name__ == "FluxTransformer2DModel"
    assert type(comps["text_encoder_2"]).__name__ == "T5EncoderModel"
    assert module_index(comps).family == "flux"
    with pytest.raises(ValueError, match="unknown denoiser"):
        build_meta_components({}, [], denoiser="hidream")
