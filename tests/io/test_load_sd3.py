"""SD3 / SD3.5 LoRA files: diffusers / PEFT names and kohya sd-scripts' (SAI MMDiT names, fused q/k/v rows), the
family told apart by shapes (SD3 medium 1536 wide, SD3.5 large 2432, SD3.5 medium's dual attention), every key
accounted for and each ΔW equal to its formula. Names and widths are those of the real models; values are seeded."""

from __future__ import annotations

import pytest
import torch

from lorablend.io import load_adapter
from lorablend.naming import module_index

from conftest import assert_same_computed

T = "transformer."
WIDTH = {"sd3": 1536, "sd35-medium": 1536, "sd35-large": 2432}


def _pair(out, inp, rank=2, seed=0):
    g = torch.Generator().manual_seed(seed + out + inp)
    return torch.randn(rank, inp, generator=g).bfloat16(), torch.randn(out, rank, generator=g).bfloat16()


def diffusers_file(family: str, paths: list[str]) -> dict[str, torch.Tensor]:
    idx = module_index(family=family)
    sd = {}
    for i, path in enumerate(paths):
        out, inp = idx.modules[path].weight_shape[:2]
        down, up = _pair(out, inp, seed=i)
        sd[f"{path}.lora_A.weight"], sd[f"{path}.lora_B.weight"] = down, up
    return sd


@pytest.mark.parametrize("family", ["sd3", "sd35-large"])
def test_diffusers_names_of_each_sd3_family_are_told_apart_by_width(family):
    idx = module_index(family=family)
    last = idx.unet_config["num_layers"] - 1
    paths = [f"{T}transformer_blocks.{i}.attn.{p}" for i in (0, last) for p in ("to_q", "to_k", "add_v_proj")]
    paths += [f"{T}transformer_blocks.0.ff_context.net.2", f"{T}context_embedder",
              "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
              "text_encoder_2.text_model.encoder.layers.31.mlp.fc2", "text_encoder_3.encoder.block.0.layer.0.SelfAttention.k"]
    sd = diffusers_file(family, paths)
    adapter = load_adapter(sd)
    assert adapter.family == family and adapter.report.complete, adapter.report.summary()
    for path in paths:
        assert_same_computed(adapter.deltas[path].delta_weight(),
                             sd[f"{path}.lora_B.weight"].float() @ sd[f"{path}.lora_A.weight"].float())


def test_dual_attention_layers_mean_sd35_medium():
    paths = [f"{T}transformer_blocks.3.attn2.to_q", f"{T}transformer_blocks.3.attn.to_q"]
    assert load_adapter(diffusers_file("sd35-medium", paths)).family == "sd35-medium"
    # without attn2 (or q/k norm) layers an SD3.5 medium file fits SD3 medium as well: the older family is chosen
    assert load_adapter(diffusers_file("sd35-medium", paths[1:])).family == "sd3"


def test_peft_save_of_a_transformer_alone():
    sd = {f"base_model.model.{k[len(T):]}": v
          for k, v in diffusers_file("sd3", [f"{T}transformer_blocks.5.attn.to_out.0"]).items()}
    adapter = load_adapter(sd)
    assert adapter.family == "sd3" and list(adapter.deltas) == [f"{T}transformer_blocks.5.attn.to_out.0"]


def kohya_file(names: dict[str, tuple[int, int]], alpha=1.0) -> dict[str, torch.Tensor]:
    sd = {}
    for i, (name, (out, inp)) in enumerate(names.items()):
        down, up = _pair(out, inp, seed=10 + i)
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


@pytest.mark.parametrize("family", ["sd3", "sd35-large"])
def test_kohya_sd3_names_split_qkv_rows_and_swap_the_pre_only_modulation(family):
    h = WIDTH[family]
    last = module_index(family=family).unet_config["num_layers"] - 1
    names = {"lora_unet_joint_blocks_0_x_block_attn_qkv": (3 * h, h),
             "lora_unet_joint_blocks_0_context_block_attn_qkv": (3 * h, h),
             "lora_unet_joint_blocks_0_x_block_attn_proj": (h, h),
             "lora_unet_joint_blocks_0_x_block_mlp_fc1": (4 * h, h),
             "lora_unet_joint_blocks_0_context_block_adaLN_modulation_1": (6 * h, h),
             f"lora_unet_joint_blocks_{last}_context_block_adaLN_modulation_1": (2 * h, h),
             "lora_unet_final_layer_adaLN_modulation_1": (2 * h, h),
             "lora_unet_t_embedder_mlp_0": (h, 256),
             "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
             "lora_te2_text_model_encoder_layers_0_mlp_fc1": (5120, 1280),
             "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_1": (10240, 4096)}
    sd = kohya_file(names)
    adapter = load_adapter(sd)
    assert adapter.family == family and adapter.report.complete, adapter.report.summary()

    def full(name):
        return 0.5 * sd[f"{name}.lora_up.weight"].float() @ sd[f"{name}.lora_down.weight"].float()  # alpha 1, rank 2

    qkv = full("lora_unet_joint_blocks_0_context_block_attn_qkv")
    for i, proj in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
        assert_same_computed(adapter.deltas[f"{T}transformer_blocks.0.attn.{proj}"].delta_weight(), qkv[i * h:(i + 1) * h])
    assert_same_computed(adapter.deltas[f"{T}transformer_blocks.0.attn.to_k"].delta_weight(),
                         full("lora_unet_joint_blocks_0_x_block_attn_qkv")[h:2 * h])
    mod = full("lora_unet_joint_blocks_0_context_block_adaLN_modulation_1")  # AdaLayerNormZero: same order
    assert_same_computed(adapter.deltas[f"{T}transformer_blocks.0.norm1_context.linear"].delta_weight(), mod)
    for name, path in ((f"lora_unet_joint_blocks_{last}_context_block_adaLN_modulation_1",
                        f"transformer_blocks.{last}.norm1_context.linear"),
                       ("lora_unet_final_layer_adaLN_modulation_1", "norm_out.linear")):
        shift_scale = full(name)  # SAI: (shift, scale); diffusers' AdaLayerNormContinuous: (scale, shift)
        assert_same_computed(adapter.deltas[T + path].delta_weight(), torch.cat([shift_scale[h:], shift_scale[:h]]))
    assert f"{T}time_text_embed.timestep_embedder.linear_1" in adapter.deltas
    assert "text_encoder_3.encoder.block.0.layer.1.DenseReluDense.wi_1" in adapter.deltas  # lora_te3_: T5


def test_kohya_dual_attention_names():
    sd = kohya_file({"lora_unet_joint_blocks_2_x_block_attn2_qkv": (3 * 1536, 1536),
                     "lora_unet_joint_blocks_2_x_block_attn2_proj": (1536, 1536)})
    adapter = load_adapter(sd)
    assert adapter.family == "sd35-medium" and adapter.report.complete
    assert sorted(adapter.deltas) == [f"{T}transformer_blocks.2.attn2.{p}" for p in ("to_k", "to_out.0", "to_q", "to_v")]


def test_a_name_of_a_layer_the_model_lacks_says_where_it_exists():
    sd = kohya_file({"lora_unet_joint_blocks_2_x_block_attn2_proj": (1536, 1536)})
    adapter = load_adapter(sd, target=module_index(family="sd3"))
    assert adapter.report.counts()["unsupported"] == 3
    assert "SD3.5 medium" in adapter.report.unsupported[0].reason
