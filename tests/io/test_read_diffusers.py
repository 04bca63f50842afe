"""io/read_diffusers.py: diffusers / PEFT keys sorted into modules and roles; the alphas its metadata carries."""

from __future__ import annotations

import json

import torch

from lorablend.io.read_diffusers import component_configs, is_diffusers_key, parse_diffusers


def test_lora_a_b_keys_become_one_module_with_a_dotted_lookup():
    t = {"unet.a.to_q.lora_A.weight": torch.zeros(2, 3), "unet.a.to_q.lora_B.weight": torch.zeros(3, 2)}
    groups, leftovers = parse_diffusers(t, {})
    assert len(groups) == 1 and not leftovers
    assert groups[0].parts == {"down": "unet.a.to_q.lora_A.weight", "up": "unet.a.to_q.lora_B.weight"}
    assert groups[0].lookup[0] == "dotted" and ("unet", "a.to_q") in groups[0].lookup[1]


def test_peft_metadata_gives_each_module_its_alpha():
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8})}
    assert component_configs(meta) == {"unet": {"r": 4, "lora_alpha": 8}}
    assert component_configs({}) == {}


def test_diffusers_keys_are_told_from_others():
    assert is_diffusers_key("unet.a.to_q.lora_A.weight")
    assert not is_diffusers_key("lora_unet_a.lora_down.weight")


def test_component_configs_all_layouts():
    flat = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "text_encoder.lora_alpha": 2})}
    assert component_configs(flat) == {"unet": {"r": 4}, "text_encoder": {"lora_alpha": 2}}
    nested = {"lora_adapter_metadata": json.dumps({"unet": {"r": 4, "lora_alpha": 8}})}
    assert component_configs(nested) == {"unet": {"r": 4, "lora_alpha": 8}}
    model_level = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8})}
    assert component_configs(model_level) == {None: {"r": 4, "lora_alpha": 8}}
    assert component_configs({"lora_adapter_metadata": "not json"}) == {}
