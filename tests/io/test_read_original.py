"""io/read_original.py: transformer LoRAs in their original dotted names (BFL Flux, SAI MMDiT, ComfyUI prefixes)."""

from __future__ import annotations

import torch

from lorablend.io.read_original import is_original_key, module_of, parse_original


def test_an_original_name_groups_its_roles_under_the_original_module():
    t = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(2, 3),
         "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(9, 2)}
    groups, leftovers = parse_original(t)
    assert len(groups) == 1 and not leftovers
    assert groups[0].lookup[:2] == ("original", "double_blocks.0.img_attn.qkv")
    assert set(groups[0].parts) == {"down", "up"}


def test_original_keys_are_told_from_diffusers_keys():
    assert is_original_key("double_blocks.0.processor.qkv_lora1.down.weight")
    assert not is_original_key("unet.a.lora_A.weight")
    assert module_of("transformer_blocks.0.attn.to_k.lora_down.weight") == "transformer_blocks.0.attn.to_k"
