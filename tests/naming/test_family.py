"""naming.family: the one family rule, and the three callers that feed it (live model, checkpoint, LoRA file)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from torch import nn

from lorablend.naming import FamilyEvidence, detect_family, family_of_target


@pytest.mark.parametrize(
    "evidence, family",
    [
        (FamilyEvidence(cross_attention_width=768), "sd1"),
        (FamilyEvidence(cross_attention_width=1024), "sd2"),
        (FamilyEvidence(cross_attention_width=2048), "sdxl"),
        (FamilyEvidence(second_text_encoder=True, cross_attention_width=768), "sdxl"),
        (FamilyEvidence(text_time_embedding=True), "sdxl"),
        (FamilyEvidence(text_encoder="openclip-h", cross_attention_width=32), "sd2"),  # a tiny SD2 layout
        (FamilyEvidence(text_encoder="clip-l"), "sd1"),
        (FamilyEvidence(cross_attention_width=32), None),
        (FamilyEvidence(), None),
    ],
)
def test_the_rule(evidence, family):
    assert detect_family(evidence) == family


class _Unet(nn.Module):
    def __init__(self, **config):
        super().__init__()
        self.config = config


def test_live_models_feed_the_rule():
    assert family_of_target({"unet": _Unet(cross_attention_dim=768)}) == "sd1"
    assert family_of_target({"unet": _Unet(cross_attention_dim=1024)}) == "sd2"
    assert family_of_target({"unet": _Unet(cross_attention_dim=64, addition_embed_type="text_time")}) == "sdxl"
    assert family_of_target({"unet": _Unet(cross_attention_dim=32), "text_encoder_2": nn.Linear(1, 1)}) == "sdxl"
    te = nn.Linear(1, 1)
    te.config = SimpleNamespace(hidden_size=1024)
    assert family_of_target({"text_encoder": te}) == "sd2"  # no UNet: the text width stands for it
    assert family_of_target({"unet": _Unet(cross_attention_dim=32)}) == "sd1"  # a tiny model: nothing known


def test_checkpoints_feed_the_rule(tmp_path):
    import torch
    from safetensors.torch import save_file

    from lorablend.offline.checkpoint import checkpoint_family, detect_family as old_name
    from lorablend.errors import LoraFormatError
    from lorablend.io.safetensors import read_header

    def family_of(names):
        path = tmp_path / "m.safetensors"
        save_file({n: torch.zeros(1) for n in names}, str(path))
        return checkpoint_family(read_header(path))

    unet = "model.diffusion_model.input_blocks.0.0.weight"
    assert family_of([unet, "cond_stage_model.transformer.text_model.x"]) == "sd1"
    assert family_of([unet, "cond_stage_model.model.transformer.resblocks.0.x"]) == "sd2"
    assert family_of([unet, "conditioner.embedders.1.model.x", "conditioner.embedders.0.transformer.x"]) == "sdxl"
    assert old_name is checkpoint_family
    with pytest.raises(LoraFormatError, match="no text encoder this tool knows"):
        family_of([unet])
    with pytest.raises(LoraFormatError, match="not a single-file"):
        family_of(["lora_unet_x.lora_down.weight"])


def test_a_live_2026_transformer_is_told_by_class_then_width():
    # the real configs' trees on the meta device; a tiny one of each class falls back to its architecture's default
    from lorablend.naming.configs import NEW_TRANSFORMERS
    from lorablend.naming.index import family_of_target
    from lorablend.naming.meta import build_meta_components

    for family, (config, architecture) in NEW_TRANSFORMERS.items():
        transformer = build_meta_components(config, [], denoiser=architecture)["transformer"]
        assert family_of_target({"transformer": transformer}) == family
    tiny = build_meta_components({"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 1,
                                  "num_single_layers": 1, "joint_attention_dim": 16, "in_channels": 4,
                                  "timestep_guidance_channels": 8, "axes_dims_rope": [2, 2, 2, 2]}, [],
                                 denoiser="flux2")["transformer"]
    assert family_of_target({"transformer": tiny}) == "flux2-dev"  # never Flux.1, whose class name it contains


def test_detection_of_the_transformer_families():
    assert detect_family(FamilyEvidence(transformer="flux")) == "flux"
    assert detect_family(FamilyEvidence(transformer_width=3072)) == "flux"
    assert detect_family(FamilyEvidence(transformer_width=1536)) == "sd3"
    assert detect_family(FamilyEvidence(transformer_width=1536, dual_attention=True)) == "sd35-medium"
    assert detect_family(FamilyEvidence(transformer="sd3", transformer_width=2432)) == "sd35-large"
    assert detect_family(FamilyEvidence(transformer="sd3", transformer_width=32)) == "sd3"  # a tiny test model
    # a pipeline with a second (T5) text encoder is not SDXL when its denoiser is a transformer
    assert detect_family(FamilyEvidence(second_text_encoder=True, transformer="flux")) == "flux"
