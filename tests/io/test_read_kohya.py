"""io/read_kohya.py: kohya / A1111 / LyCORIS keys sorted by module and role; what we do not apply is reported."""

from __future__ import annotations

import torch

from lorablend.io.read_kohya import is_kohya_key, parse_kohya, refused_reason, suffix_role


def test_keys_group_by_module_with_their_roles():
    t = {"lora_unet_x.lora_down.weight": torch.zeros(2, 3), "lora_unet_x.lora_up.weight": torch.zeros(4, 2),
         "lora_unet_x.alpha": torch.tensor(1.0), "lora_te1_y.hada_w1_a": torch.zeros(4, 2)}
    groups, leftovers = parse_kohya(t)
    by_name = {g.name: g for g in groups}
    assert by_name["lora_unet_x"].parts == {"down": "lora_unet_x.lora_down.weight",
                                            "up": "lora_unet_x.lora_up.weight", "alpha": "lora_unet_x.alpha"}
    assert by_name["lora_te1_y"].parts == {"hada_w1_a": "lora_te1_y.hada_w1_a"}
    assert leftovers == []


def test_foreign_keys_and_unknown_suffixes_are_left_over_with_why():
    groups, leftovers = parse_kohya({"unet.a.lora_A.weight": torch.zeros(1), "lora_unet_x.bogus": torch.zeros(1)})
    assert groups == []
    status = {key: s for key, s, _ in leftovers}
    assert status == {"unet.a.lora_A.weight": "unknown", "lora_unet_x.bogus": "unknown"}


def test_refused_algorithms_say_why_and_roles_come_from_suffixes():
    assert "OFT" in refused_reason("oft_blocks") and refused_reason("lora_down.weight") is None
    assert suffix_role("lora_down.weight") == "down" and suffix_role("weight") is None
    assert is_kohya_key("lora_unet_x") and is_kohya_key("lora_te2_x") and not is_kohya_key("unet_x")
