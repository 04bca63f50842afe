"""Every Flux.1 file layout, read from files with the real names, shapes and layouts (flux_keylists): every key
accounted for, and each module's ΔW equal to an independent formula of the file's own tensors — the fused q/k/v and
linear1 rows split exactly, the final modulation's (shift, scale) rows swapped into diffusers' (scale, shift)."""

from __future__ import annotations

import pytest
import torch

from lorablend.io import load_adapter
from lorablend.naming import module_index

from conftest import assert_same_computed
from flux_keylists import ALPHA, keylist, probe, requires_keylists, state_dict

pytestmark = requires_keylists

# layout -> (format we report, modules it touches)
LAYOUTS = {
    "flux_lora_kohya_format": ("kohya", 494),
    "flux_lora_kohya_with_te1_format": ("kohya", 566),
    "flux_dora_onetrainer_format": ("kohya", 506),
    "flux_lora_diffusers_format": ("diffusers", 494),
    "flux_lora_diffusers_no_proj_mlp_format": ("diffusers", 342),
    "flux_lora_aitoolkit_format": ("original", 418),
    "flux_control_lora_format": ("original", 656),
    "flux_lora_xlabs_format": ("original", 24),
}
T = "transformer."


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_key_of_every_flux_layout_is_mapped(layout):
    sd = state_dict(layout)
    adapter = load_adapter(sd)
    fmt, modules = LAYOUTS[layout]
    assert adapter.family == "flux" and adapter.format == fmt
    assert adapter.report.counts() == {"mapped": len(sd), "unsupported": 0, "unknown": 0}, adapter.report.summary()
    assert [r.key for r in adapter.report.records] == list(sd)  # each key once, in the file's order
    assert len(adapter.deltas) == modules
    index = module_index(family="flux")
    for key, delta in adapter.deltas.items():  # every delta fits its module (the control LoRA's img_in: widened)
        if key not in adapter.widened_inputs:
            assert delta.fit_problem(index.modules[key].weight_shape) is None, key


def _full(sd, name, scale):
    return scale * sd[f"{name}.lora_up.weight"].float() @ sd[f"{name}.lora_down.weight"].float()


def test_kohya_qkv_is_one_lora_over_the_fused_rows_split_exactly():
    sd = state_dict("flux_lora_kohya_format", rank=None)  # the file's own rank 16
    adapter = load_adapter(sd)
    scale = ALPHA / 16
    qkv = _full(sd, "lora_unet_double_blocks_0_img_attn_qkv", scale)  # (9216, 3072): q, k, v rows
    for i, proj in enumerate(("to_q", "to_k", "to_v")):
        delta = adapter.deltas[f"{T}transformer_blocks.0.attn.{proj}"]
        assert delta.kind == "lora" and delta.rank == 16 and delta.scale == scale
        assert delta.down is sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]  # shared, not copied
        assert_same_computed(delta.delta_weight(), qkv[3072 * i: 3072 * (i + 1)])
    txt = _full(sd, "lora_unet_double_blocks_18_txt_attn_qkv", scale)
    assert_same_computed(adapter.deltas[f"{T}transformer_blocks.18.attn.add_v_proj"].delta_weight(), txt[6144:])
    linear1 = _full(sd, "lora_unet_single_blocks_37_linear1", scale)  # (21504, 3072): q, k, v, proj_mlp
    block = f"{T}single_transformer_blocks.37."
    for path, rows in (("attn.to_q", slice(0, 3072)), ("attn.to_v", slice(6144, 9216)), ("proj_mlp", slice(9216, None))):
        assert_same_computed(adapter.deltas[block + path].delta_weight(), linear1[rows])
    mod = _full(sd, "lora_unet_double_blocks_3_img_mod_lin", scale)  # shift/scale/gate x 2: diffusers' order
    assert_same_computed(adapter.deltas[f"{T}transformer_blocks.3.norm1.linear"].delta_weight(), mod)
    record = next(r for r in adapter.report.records if r.key.startswith("lora_unet_double_blocks_0_img_attn_qkv."))
    assert record.target == f"{T}transformer_blocks.0.attn.to_q" and "to_v rows 6144:9216" in record.reason


def _bfl_named(rank=4, seed=3):
    """A kohya file over the whole BFL vocabulary (every top-level layer too) with real widths."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"final_layer_adaLN_modulation_1": (6144, 3072), "final_layer_linear": (64, 3072), "img_in": (3072, 64),
              "txt_in": (3072, 4096), "time_in_in_layer": (3072, 256), "vector_in_out_layer": (3072, 3072),
              "guidance_in_in_layer": (3072, 256)}
    sd = {}
    for name, (out, inp) in shapes.items():
        sd[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, inp, generator=g).bfloat16()
        sd[f"lora_unet_{name}.lora_up.weight"] = torch.randn(out, rank, generator=g).bfloat16()
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(float(rank))
    return sd


def test_the_final_modulation_rows_are_swapped_into_diffusers_order():
    sd = _bfl_named()
    adapter = load_adapter(sd)
    assert adapter.report.complete, adapter.report.summary()
    full = _full(sd, "lora_unet_final_layer_adaLN_modulation_1", 1.0)  # BFL rows: shift, then scale
    norm_out = adapter.deltas[f"{T}norm_out.linear"]
    assert norm_out.kind == "lora"  # a permutation of up's rows: still one low-rank pair
    assert_same_computed(norm_out.delta_weight(), torch.cat([full[3072:], full[:3072]]))  # diffusers: scale, shift
    top = {"lora_unet_img_in": "x_embedder", "lora_unet_txt_in": "context_embedder",
           "lora_unet_time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
           "lora_unet_vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
           "lora_unet_guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
           "lora_unet_final_layer_linear": "proj_out"}
    for name, path in top.items():
        assert_same_computed(adapter.deltas[T + path].delta_weight(), _full(sd, name, 1.0))


def test_onetrainer_dora_on_transformer_clip_l_and_t5():
    sd = state_dict("flux_dora_onetrainer_format")
    adapter = load_adapter(sd)
    assert adapter.kinds() == {"dora": 506}
    assert set(adapter.components()) == {"transformer", "text_encoder", "text_encoder_2"}
    t5 = "lora_te2_encoder_block_0_layer_1_DenseReluDense_wi_0"
    delta = adapter.deltas["text_encoder_2.encoder.block.0.layer.1.DenseReluDense.wi_0"]  # T5: text_encoder_2
    assert delta.axis == "in"  # OneTrainer's dora_scale is (1, in): one norm per input column
    w0 = torch.randn(10240, 4096, generator=torch.Generator().manual_seed(7)) * 0.02
    merged = w0 + ALPHA / 2 * sd[f"{t5}.lora_up.weight"].float() @ sd[f"{t5}.lora_down.weight"].float()
    expected = merged * sd[f"{t5}.dora_scale"].float() / merged.norm(dim=0, keepdim=True) - w0
    assert_same_computed(delta.delta_weight(base=w0), expected)
    assert "text_encoder.text_model.encoder.layers.11.self_attn.q_proj" in adapter.deltas  # lora_te1_: CLIP-L
    assert f"{T}transformer_blocks.0.attn.to_add_out" in adapter.deltas  # lora_transformer_: diffusers paths


def test_control_lora_keeps_biases_norm_scales_and_the_widened_input():
    sd = state_dict("flux_control_lora_format")
    adapter = load_adapter(sd)
    assert adapter.needs_control and adapter.widened_inputs == {f"{T}x_embedder": 128}
    img_in = adapter.deltas[f"{T}x_embedder"]
    assert img_in.shape == (3072, 128)  # 64 latent channels + 64 of the control image
    record = next(r for r in adapter.report.records if r.key == "img_in.lora_A.weight")
    assert record.status == "mapped" and "needs a control pipeline" in record.reason and "64 to 128" in record.reason
    assert_same_computed(img_in.delta_bias(), sd["img_in.lora_B.bias"].float())  # no alpha: scale 1
    q_bias = sd["double_blocks.4.img_attn.qkv.lora_B.bias"].float()
    assert_same_computed(adapter.deltas[f"{T}transformer_blocks.4.attn.to_k"].delta_bias(), q_bias[3072:6144])
    norm = adapter.deltas[f"{T}single_transformer_blocks.9.attn.norm_k"]
    assert norm.kind == "set" and torch.equal(norm.value, sd["single_blocks.9.norm.key_norm.scale"])
    base = torch.ones(128)
    assert_same_computed(norm.delta_weight(base=base), sd["single_blocks.9.norm.key_norm.scale"].float() - 1)
    out_bias = sd["final_layer.adaLN_modulation.1.lora_B.bias"].float()
    assert_same_computed(adapter.deltas[f"{T}norm_out.linear"].delta_bias(), torch.cat([out_bias[3072:], out_bias[:3072]]))
    assert adapter.kinds() == {"lora": 504, "set": 152}


def test_control_lora_on_a_control_transformer_needs_no_widening():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):  # FLUX.1 Depth-dev's transformer: 128 input channels, the rest FLUX.1-dev's
        depth = FluxTransformer2DModel(in_channels=128, out_channels=64, guidance_embeds=True)
    adapter = load_adapter(state_dict("flux_control_lora_format"), target={"transformer": depth})
    assert adapter.report.complete and not adapter.needs_control


def test_xlabs_streams_and_projections():
    sd = state_dict("flux_lora_xlabs_format")
    adapter = load_adapter(sd)
    qkv = sd["double_blocks.10.processor.qkv_lora2.up.weight"].float() @ sd["double_blocks.10.processor.qkv_lora2.down.weight"].float()
    assert_same_computed(adapter.deltas[f"{T}transformer_blocks.10.attn.add_k_proj"].delta_weight(), qkv[3072:6144])
    proj = sd["double_blocks.1.processor.proj_lora1.up.weight"].float() @ sd["double_blocks.1.processor.proj_lora1.down.weight"].float()
    assert_same_computed(adapter.deltas[f"{T}transformer_blocks.1.attn.to_out.0"].delta_weight(), proj)  # lora1: image


def test_aitoolkit_names_resolve_like_kohya_ones():
    sd = state_dict("flux_lora_aitoolkit_format", seed=4)
    adapter = load_adapter(sd)
    name = "diffusion_model.single_blocks.5.linear1"
    full = sd[f"{name}.lora_B.weight"].float() @ sd[f"{name}.lora_A.weight"].float()  # no alpha: scale 1
    assert_same_computed(adapter.deltas[f"{T}single_transformer_blocks.5.proj_mlp"].delta_weight(), full[9216:])
    name = "diffusion_model.single_blocks.5.linear2"
    full = sd[f"{name}.lora_B.weight"].float() @ sd[f"{name}.lora_A.weight"].float()
    assert_same_computed(adapter.deltas[f"{T}single_transformer_blocks.5.proj_out"].delta_weight(), full)


def test_the_lokr_excerpt_is_reported_key_by_key():
    # InvokeAI's BFL LoKr excerpt: real names, but its factor shapes multiply to no Flux layer
    # (kron((32, 96), (32, 32)) is (1024, 3072), img_attn.proj is (3072, 3072)): every key says so.
    sd = {k: torch.ones(s) for k, s in keylist("flux_lokr_bfl_format").items()}
    adapter = load_adapter(sd, target=module_index(family="flux"))
    assert adapter.report.counts() == {"mapped": 0, "unsupported": 18, "unknown": 0}
    reasons = {r.key: r.reason for r in adapter.report.records}
    assert "its ΔW has 1024 rows but double_blocks.0.img_attn.qkv has 9216" in reasons["diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1"]
    assert "(1024, 3072) but the module's weight is (3072, 3072)" in reasons["diffusion_model.double_blocks.0.img_attn.proj.alpha"]


def _lokr(w1_shape, w2_shape, seed=5):
    g = torch.Generator().manual_seed(seed)
    name = "diffusion_model.double_blocks.2.img_attn.qkv"
    return name, {f"{name}.lokr_w1": torch.randn(*w1_shape, generator=g).bfloat16(),
                  f"{name}.lokr_w2": torch.randn(*w2_shape, generator=g).bfloat16(), f"{name}.alpha": torch.tensor(1.0)}


@pytest.mark.parametrize("w1, w2, kind", [((96, 48), (96, 64), "lokr"), ((32, 96), (288, 32), "full")])
def test_lokr_over_fused_rows_splits_exactly(w1, w2, kind):
    # (96, 48) x (96, 64): w2's 96 rows divide 3072, so q/k/v take w1's rows and stay LoKr; (32, 96) x (288, 32):
    # 288 rows do not divide 3072 (3072 = 10 2/3 x 288), so q/k/v are the exact rows of ΔW as dense diffs
    name, sd = _lokr(w1, w2)
    adapter = load_adapter(sd, family="flux")  # (one double block's qkv: Flux.2 klein 4B and Chroma have it too)
    full = torch.kron(sd[f"{name}.lokr_w1"].float(), sd[f"{name}.lokr_w2"].float())  # full-dim LoKr: scale 1
    for i, proj in enumerate(("to_q", "to_k", "to_v")):
        delta = adapter.deltas[f"{T}transformer_blocks.2.attn.{proj}"]
        assert delta.kind == kind
        assert_same_computed(delta.delta_weight(), full[3072 * i: 3072 * (i + 1)])


def test_loha_over_fused_rows_splits_its_a_factors():
    g = torch.Generator().manual_seed(6)
    name = "lora_unet_single_blocks_0_linear1"
    sd = {f"{name}.hada_w1_a": torch.randn(21504, 2, generator=g), f"{name}.hada_w1_b": torch.randn(2, 3072, generator=g),
          f"{name}.hada_w2_a": torch.randn(21504, 2, generator=g), f"{name}.hada_w2_b": torch.randn(2, 3072, generator=g),
          f"{name}.alpha": torch.tensor(1.0)}
    adapter = load_adapter(sd)
    full = 0.5 * (sd[f"{name}.hada_w1_a"] @ sd[f"{name}.hada_w1_b"]) * (sd[f"{name}.hada_w2_a"] @ sd[f"{name}.hada_w2_b"])
    mlp = adapter.deltas[f"{T}single_transformer_blocks.0.proj_mlp"]
    assert mlp.kind == "loha" and mlp.w1_b is sd[f"{name}.hada_w1_b"]
    assert_same_computed(mlp.delta_weight(), full[9216:])


def test_kohya_diffs_bias_diffs_and_norm_diffs_are_applied():
    g = torch.Generator().manual_seed(8)
    sd = {"lora_unet_double_blocks_0_img_attn_qkv.diff": torch.randn(9216, 3072, generator=g).bfloat16(),
          "lora_unet_double_blocks_0_img_attn_qkv.diff_b": torch.randn(9216, generator=g).bfloat16(),
          "lora_unet_double_blocks_0_img_attn_norm_key_norm.diff": torch.randn(128, generator=g).bfloat16(),
          "diffusion_model.single_blocks.3.norm.query_norm.diff": torch.randn(128, generator=g).bfloat16(),
          "diffusion_model.single_blocks.3.linear2.diff_b": torch.randn(3072, generator=g).bfloat16(),
          "diffusion_model.single_blocks.3.linear2.diff": torch.randn(3072, 15360, generator=g).bfloat16()}
    adapter = load_adapter(sd)
    assert adapter.report.complete, adapter.report.summary()
    k = adapter.deltas[f"{T}transformer_blocks.0.attn.to_k"]
    assert k.kind == "full" and torch.equal(k.delta_weight(), sd["lora_unet_double_blocks_0_img_attn_qkv.diff"][3072:6144].float())
    assert torch.equal(k.delta_bias(), sd["lora_unet_double_blocks_0_img_attn_qkv.diff_b"][3072:6144].float())
    norm = adapter.deltas[f"{T}transformer_blocks.0.attn.norm_k"]
    assert torch.equal(norm.delta_weight(), sd["lora_unet_double_blocks_0_img_attn_norm_key_norm.diff"].float())
    assert f"{T}single_transformer_blocks.3.attn.norm_q" in adapter.deltas
    assert adapter.deltas[f"{T}single_transformer_blocks.3.proj_out"].changes_bias


def test_peft_prefixes_and_fal_kontext_names():
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(2, 3072, generator=g), torch.randn(3072, 2, generator=g)
    qkv_b = torch.randn(9216, 2, generator=g)
    sd = {"base_model.model.single_transformer_blocks.1.attn.to_q.lora_A.weight": a,
          "base_model.model.single_transformer_blocks.1.attn.to_q.lora_B.weight": b,
          "base_model.model.double_blocks.1.txt_attn.qkv.lora_A.weight": a,  # fal's Kontext files: BFL names
          "base_model.model.double_blocks.1.txt_attn.qkv.lora_B.weight": qkv_b}
    adapter = load_adapter(sd)
    assert adapter.family == "flux" and adapter.report.complete, adapter.report.summary()
    assert_same_computed(adapter.deltas[f"{T}single_transformer_blocks.1.attn.to_q"].delta_weight(), b @ a)
    assert_same_computed(adapter.deltas[f"{T}transformer_blocks.1.attn.add_q_proj"].delta_weight(), qkv_b[:3072] @ a)


def test_a_fused_layer_of_the_wrong_height_is_refused_with_why():
    sd = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 3072),
          "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(6144, 2),
          "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(2, 3072),
          "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(3072, 2)}
    adapter = load_adapter(sd, family="flux")  # (block 0's attention alone: Flux.2 klein 4B has it too)
    bad = adapter.report.unsupported
    assert [r.key for r in bad] == list(sd)[:2]
    assert "its ΔW has 6144 rows but lora_unet_double_blocks_0_img_attn_qkv has 9216" in bad[0].reason


def test_same_module_from_two_spellings_is_claimed_once():
    g = torch.Generator().manual_seed(10)
    sd = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(2, 3072, generator=g),
          "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(9216, 2, generator=g),
          "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.randn(2, 3072, generator=g),
          "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": torch.randn(3072, 2, generator=g)}
    adapter = load_adapter(sd, family="flux")  # (block 0's attention alone: Flux.2 klein 4B has it too)
    assert adapter.report.counts()["mapped"] == 2 and "already targets transformer.transformer_blocks.0.attn.to_k" in (
        adapter.report.unsupported[0].reason)


def test_probe_agrees_with_the_dense_delta():
    sd = state_dict("flux_lora_kohya_format")
    delta = load_adapter(sd).deltas[f"{T}transformer_blocks.0.attn.to_q"]
    x = torch.randn(3072, 3, generator=torch.Generator().manual_seed(1))
    assert_same_computed(probe(delta, 3072), delta.delta_weight() @ x)


def test_comfyui_text_encoder_prefixes():
    g = torch.Generator().manual_seed(11)
    clip = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    t5 = "text_encoders.t5xxl.transformer.encoder.block.3.layer.0.SelfAttention.o"
    sd = {f"{clip}.lora_down.weight": torch.randn(2, 768, generator=g), f"{clip}.lora_up.weight": torch.randn(768, 2, generator=g),
          f"{t5}.lora_down.weight": torch.randn(2, 4096, generator=g), f"{t5}.lora_up.weight": torch.randn(4096, 2, generator=g),
          "diffusion_model.img_in.lora_down.weight": torch.randn(2, 64, generator=g),
          "diffusion_model.img_in.lora_up.weight": torch.randn(3072, 2, generator=g)}
    adapter = load_adapter(sd)
    assert adapter.family == "flux" and adapter.report.complete, adapter.report.summary()
    assert {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj", f"{T}x_embedder",
            "text_encoder_2.encoder.block.3.layer.0.SelfAttention.o"} == set(adapter.deltas)  # Flux: T5 is the 2nd
