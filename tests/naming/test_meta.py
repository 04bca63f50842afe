"""naming/meta.py: a model's module tree and weight shapes built on the meta device (no storage)."""

from __future__ import annotations

import json

import pytest

from lorablend.naming import index_from_components, module_index
from lorablend.naming.configs import CLIP_L, SD1_UNET
from lorablend.naming.meta import build_meta_components, folder_meta_components
from lorablend.naming.standard import standard_index


def test_sd1_on_the_meta_device_has_the_shipped_index_and_no_storage():
    comps = build_meta_components(SD1_UNET, [("text_encoder", CLIP_L, False)])
    assert set(comps) == {"unet", "text_encoder"}
    assert all(p.is_meta for c in comps.values() for p in c.parameters())
    built, shipped = index_from_components(comps, family="sd1"), standard_index("sd1")
    assert built.modules.keys() == shipped.modules.keys()
    assert all(built.modules[k].weight_shape == shipped.modules[k].weight_shape for k in built.modules)


def test_an_unknown_denoiser_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown denoiser 'dit'"):
        build_meta_components(SD1_UNET, [], denoiser="dit")


def test_a_transformer_pipeline_folder_is_built_from_its_configs(tmp_path):
    tiny = {"_class_name": "FluxTransformer2DModel", "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 8,
            "num_attention_heads": 2, "joint_attention_dim": 16, "pooled_projection_dim": 8, "in_channels": 4,
            "axes_dims_rope": [2, 2, 4]}
    t5 = {"architectures": ["T5EncoderModel"], "d_model": 16, "d_ff": 32, "d_kv": 8, "num_heads": 2, "num_layers": 1,
          "vocab_size": 64}
    for component, cfg in (("transformer", tiny), ("text_encoder_2", t5)):
        (tmp_path / component).mkdir()
        (tmp_path / component / "config.json").write_text(json.dumps(cfg))
    comps = folder_meta_components(tmp_path)
    assert type(comps["transformer"]).__name__ == "FluxTransformer2DModel"
    assert type(comps["text_encoder_2"]).__name__ == "T5EncoderModel"
    assert module_index(comps).family == "flux"
    with pytest.raises(ValueError, match="unknown denoiser"):
        build_meta_components({}, [], denoiser="hidream")
