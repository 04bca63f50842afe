"""naming/configs.py: the architecture numbers of the standard models, only the fields that shape the module tree."""

from __future__ import annotations

import json

import pytest
import torch

from lorablend.naming import index_from_components, module_index
from lorablend.naming.configs import (DENOISER_ARCHITECTURES, FLUX_DEV_TRANSFORMER, SD3_MEDIUM_TRANSFORMER, SD35_LARGE_TRANSFORMER,
                                      SD35_MEDIUM_TRANSFORMER, STANDARD)
from lorablend.naming.fused import SOURCE_TABLES

from realdata import CONFIGS


def test_every_standard_family_has_a_denoiser_config_and_its_architecture_is_known():
    assert {"sd1", "sd2", "sdxl", "flux", "sd3", "sd35-medium", "sd35-large"} <= set(STANDARD)
    for family, (config, encoders) in STANDARD.items():
        assert isinstance(config, dict) and config, family
        assert all(len(spec) == 3 for spec in encoders), family
    assert {DENOISER_ARCHITECTURES[f] for f in ("flux", "sd3", "sd35-medium", "sd35-large")} <= set(SOURCE_TABLES)
    assert "sd1" not in DENOISER_ARCHITECTURES  # a UNet family: the default architecture


def test_sd35_medium_is_sd3_medium_with_dual_attention_and_qk_norms():
    changed = {k for k in SD35_MEDIUM_TRANSFORMER if SD35_MEDIUM_TRANSFORMER[k] != SD3_MEDIUM_TRANSFORMER.get(k)}
    assert changed == {"dual_attention_layers", "pos_embed_max_size", "qk_norm"}
    assert SD35_MEDIUM_TRANSFORMER["qk_norm"] == SD35_LARGE_TRANSFORMER["qk_norm"] == "rms_norm"
    assert len(SD35_MEDIUM_TRANSFORMER["dual_attention_layers"]) == 13


@pytest.mark.skipif(not (CONFIGS / "flux1-dev").is_dir(), reason="real FLUX.1-dev config not found")
def test_flux_config_holds_the_published_numbers():
    real = json.loads((CONFIGS / "flux1-dev" / "transformer" / "config.json").read_text())
    assert {k: real[k] for k in FLUX_DEV_TRANSFORMER} == FLUX_DEV_TRANSFORMER
    with torch.device("meta"):  # the real config, built whole on the meta device: the shipped index agrees
        from diffusers import FluxTransformer2DModel

        live = index_from_components({"transformer": FluxTransformer2DModel.from_config(real)}, family="flux")
    shipped = module_index(family="flux")
    assert {k: i.weight_shape for k, i in live.modules.items()} == {
        k: i.weight_shape for k, i in shipped.modules.items() if i.component == "transformer"}
