"""naming/ldm.py: diffusers UNet paths <-> LDM / SGM paths, and the LoRA Block Weight label of an LDM path."""

from __future__ import annotations

from lorablend.naming import standard_index
from lorablend.naming.ldm import block_label, ldm_unet_path

SD1 = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
       "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "layers_per_block": 2}


def test_sd1_paths_land_where_the_ldm_checkpoint_keeps_them():
    assert ldm_unet_path("down_blocks.0.attentions.1.proj_in", SD1) == "input_blocks.2.1.proj_in"
    assert ldm_unet_path("down_blocks.1.resnets.0.conv1", SD1) == "input_blocks.4.0.in_layers.2"
    assert ldm_unet_path("mid_block.attentions.0.proj_out", SD1) == "middle_block.1.proj_out"
    assert ldm_unet_path("up_blocks.3.attentions.2.proj_in", SD1) == "output_blocks.11.1.proj_in"


def test_every_sd1_unet_module_has_one_ldm_path_of_its_own():
    index = standard_index("sd1")
    unet = [info.path for key, info in index.modules.items() if key.startswith("unet.")]
    mapped = [ldm_unet_path(p, SD1) for p in unet]
    assert None not in mapped and len(set(mapped)) == len(unet)


def test_block_labels_follow_the_ldm_blocks():
    assert block_label("input_blocks.4.1.proj_in") == "IN04"
    assert block_label("middle_block.1.proj_out") == "M00"
    assert block_label("output_blocks.11.1.proj_in") == "OUT11"
    assert block_label("time_embed.0") == "TIME" and block_label("out.2") == "FINAL" and block_label(None) == "OTHER"
