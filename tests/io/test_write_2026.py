"""The 2025-26 families written in the layouts users exchange and read back: diffusers / PEFT, kohya / musubi
(``lora_unet_`` + the model's own names) and ComfyUI (``diffusion_model.`` + its own names, the ``ai-toolkit``
format); every module's ΔW comes back (fused layers written as one LoRA over their rows)."""

from __future__ import annotations

import pytest
import torch

from keylists_2026 import requires_2026, shape_from_family, state_dict
from lorablend.io.load import load_adapter
from lorablend.io.write import save_adapter

pytestmark = requires_2026

LAYOUTS = {  # one real layout per architecture, read first
    "qwenimage_kohya__musubi-tuner-expanded": ("qwen-image", "lora_unet_transformer_blocks_0_img_mod_1.lora_down.weight",
                                               "diffusion_model.transformer_blocks.0.img_mod.1.lora_A.weight"),
    "wan21-t2v-1.3b_kohya__musubi-tuner-expanded": ("wan-1.3b", "lora_unet_blocks_0_self_attn_q.lora_down.weight",
                                                    "diffusion_model.blocks.0.self_attn.q.lora_A.weight"),
    "flux2-klein-4b_diffusers-peft__diffusers-train-script-expanded": (
        "flux2-klein-4b", "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"),
    "zimage_kohya__musubi-tuner-expanded": ("z-image", "lora_unet_layers_0_feed_forward_w1.lora_down.weight",
                                            "diffusion_model.layers.0.attention.qkv.lora_A.weight"),
    "chroma_onetrainer-dora__onetrainer-issue1079": (
        "chroma", "lora_unet_distilled_guidance_layer_layers_0_in_layer.dora_scale",
        "diffusion_model.distilled_guidance_layer.layers.0.in_layer.dora_scale"),
}


def _read(stem: str, family: str):
    adapter = load_adapter({k: v.float() for k, v in state_dict(stem, shape_from_family(family)).items()})
    assert adapter.family == family
    return adapter


def _probe(delta, x: torch.Tensor) -> torch.Tensor:
    if delta.kind == "dora":  # its ΔW needs the base weight: compare its parts
        return torch.cat([_probe(delta.base_free(), x), delta.magnitude.reshape(-1, 1).float().expand(-1, x.shape[1])])
    low = delta.low_rank_factors()
    return delta.delta_weight() @ x if low is None else low[0] @ (low[1] @ x)


@pytest.mark.parametrize("stem", sorted(LAYOUTS))
@pytest.mark.parametrize("fmt", ["kohya", "ai-toolkit", "diffusers"])
def test_written_and_read_back(stem, fmt, tmp_path):
    family, kohya_key, comfy_key = LAYOUTS[stem]
    adapter = _read(stem, family)
    if fmt == "diffusers" and family == "chroma":  # OneTrainer's DoRA scales input columns: PEFT has no such key
        with pytest.raises(ValueError, match="(?i)dora"):
            save_adapter(adapter, tmp_path / "out.safetensors", format=fmt)
        return
    path = save_adapter(adapter, tmp_path / f"out.{fmt}.safetensors", format=fmt)
    back = load_adapter(path)
    keys = [r.key for r in back.report.records]
    if fmt != "diffusers":
        assert (kohya_key if fmt == "kohya" else comfy_key) in keys
    assert back.family == family and back.report.complete, back.report.summary()
    assert set(back.deltas) == set(adapter.deltas)
    g = torch.Generator().manual_seed(0)
    for key, delta in adapter.deltas.items():
        x = torch.randn(delta.shape[1], 2, generator=g)
        torch.testing.assert_close(_probe(back.deltas[key], x), _probe(delta, x), rtol=1e-5, atol=1e-7, msg=key)
