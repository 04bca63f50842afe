"""io/detect.py: a file's format is read from its keys (never its name); keys sorted by the reader they belong to."""

from __future__ import annotations

from lorablend.io.detect import detect_format, diagnose, sort_keys


def test_each_spelling_is_its_format():
    assert detect_format(["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"]) == "kohya"
    assert detect_format(["unet.mid_block.attentions.0.proj_in.lora_A.weight"]) == "diffusers"
    assert detect_format(["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"]) == "original"


def test_the_most_keys_decide_a_mixed_file_and_every_key_is_sorted_once():
    keys = ["lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight", "lora_unet_a.alpha",
            "unet.b.lora_A.weight", "stray"]
    assert detect_format(keys) == "kohya"
    sorted_keys = sort_keys(keys)
    assert sorted(k for ks in sorted_keys.values() for k in ks) == sorted(keys)
    assert sorted_keys["other"] == ["stray"] and "lora_unet_a.alpha" in sorted_keys["kohya"]


def test_a_checkpoint_or_a_doubled_prefix_is_diagnosed():
    assert "full Stable Diffusion checkpoint" in diagnose(["model.diffusion_model.input_blocks.0.0.weight"])
    assert "doubled" in diagnose(["lora_unet_unet_down_blocks_0_lora_down.weight"])
    assert diagnose(["x"]) == ""


def test_detect_format():
    assert detect_format(["lora_te1_text_model_encoder_layers_0_mlp_fc1.hada_w1_a"]) == "kohya"
    assert detect_format(["unet.a.to_q.lora.down.weight"]) == "diffusers"
    assert detect_format(["a.processor.to_q_lora.down.weight"]) == "diffusers"
    assert detect_format(["unet:0:up"]) == "cloneofsimo"
    assert detect_format(["model.diffusion_model.x.weight"]) == "unknown"
