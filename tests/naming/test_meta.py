"""naming/meta.py: a model's module tree and weight shapes built on the meta device (no storage)."""

from __future__ import annotations

import pytest

from lorablend.naming import index_from_components
from lorablend.naming.configs import CLIP_L, SD1_UNET
from lorablend.naming.meta import build_meta_components
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
