"""checkpoint.py: a single-file checkpoint's family, configs and where each target key lives in it, read from its
header alone (the checkpoints are written by test_bake's own LDM/SGM converter, independent of lorablend.naming)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file

import lorablend
from lorablend.offline.checkpoint import checkpoint_family, checkpoint_layout, unet_config
from lorablend.errors import LoraFormatError
from lorablend.io.safetensors import read_header

from realdata import KEYMAPS
from ldm_convert import to_ldm


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_family_and_unet_config_come_from_the_header(tmp_path, make_pipe, family):
    pipe = make_pipe(family)
    ckpt = tmp_path / "m.safetensors"
    save_file(to_ldm(pipe, family), str(ckpt))
    header = read_header(ckpt)
    assert checkpoint_family(header) == family
    config = unet_config(header)
    live = pipe.unet.config
    for field in ("block_out_channels", "cross_attention_dim", "in_channels", "layers_per_block"):
        assert list(config[field]) == list(live[field]) if isinstance(live[field], (list, tuple)) else config[field] == live[field], field


def test_a_file_that_is_no_sd_checkpoint_is_refused_by_name(tmp_path):
    import torch

    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 3)}, str(path))
    with pytest.raises(LoraFormatError, match="lora.safetensors"):
        checkpoint_layout(path)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_layout_places_every_layer_of_the_tiny_models(tmp_path, make_pipe, family):
    pipe = make_pipe(family)
    ckpt = tmp_path / "m.safetensors"
    save_file(to_ldm(pipe, family), str(ckpt))
    layout = checkpoint_layout(ckpt)
    assert layout.family == family
    live = lorablend.naming.module_index(pipe)
    assert set(layout.view.index.modules) == set(live.modules)
    problems = {k: layout.problem(layout.placement(k)) for k in live.modules}
    assert not any(problems.values()), {k: v for k, v in problems.items() if v}


@pytest.mark.skipif(not KEYMAPS.is_dir(), reason="ai-toolkit key maps not present")
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_layout_names_agree_with_ai_toolkit_keymap(tmp_path, make_pipe, family):
    """Every tiny-model layer whose diffusers name is in ai-toolkit's full-size map lands on the same LDM tensor."""
    keymap = json.loads((KEYMAPS / "stable_diffusion_sdxl.json").read_text())  # tiny SD1 shares the SDXL block types
    diffusers_to_ldm = {v: k for k, v in keymap["ldm_diffusers_keymap"].items()}
    if family == "sd1":
        sd1 = json.loads((KEYMAPS / "stable_diffusion_sd1.json").read_text())["ldm_diffusers_keymap"]
        diffusers_to_ldm.update({v: k for k, v in sd1.items() if v.startswith("te_")})
    slices = keymap["diffusers_ldm_operator_map"]  # te1 q/k/v -> a row slice of in_proj_weight (full width 1280)
    pipe = make_pipe(family)
    ckpt = tmp_path / "m.safetensors"
    save_file(to_ldm(pipe, family), str(ckpt))
    layout = checkpoint_layout(ckpt)
    te_tag = {"text_encoder": "te_" if family == "sd1" else "te0_", "text_encoder_2": "te1_"}
    checked = 0
    for key, info in layout.view.index.modules.items():
        tag = "unet_" if info.component == "unet" else te_tag[info.component]
        name = tag + info.path + ".weight"
        p = layout.placement(key)
        if name in diffusers_to_ldm:
            assert p.weight_key == diffusers_to_ldm[name] and p.rows is None, key
            checked += 1
        elif name in slices:
            ldm, rows = slices[name]["slice"]
            block = int(rows.split(":")[0] or 0) // 1280  # q, k, v order
            assert p.weight_key == ldm and p.rows[0] == block * info.weight_shape[0], key
            checked += 1
    assert checked >= len(layout.view.index.modules) - 1, (checked, len(layout.view.index.modules))  # all but text_projection
