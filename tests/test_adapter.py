"""adapter.py: an Adapter is a name, a family and one Delta per target layer."""

from __future__ import annotations

import pytest
import torch

from lorablend.adapter import FAMILIES, Adapter, FullDelta, LowRankDelta


def _adapter():
    return Adapter("style", "sd1", {"unet.mid_block.attentions.0.proj_in": FullDelta(torch.zeros(4, 4)),
                                    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj":
                                        LowRankDelta(torch.zeros(2, 4), torch.zeros(4, 2)),
                                    "unet.up_blocks.0.resnets.0.conv1": LowRankDelta(torch.zeros(2, 4), torch.zeros(4, 2))})


def test_components_kinds_and_parameters_are_read_off_the_deltas():
    a = _adapter()
    assert a.components() == ["unet", "text_encoder"]  # in naming.COMPONENTS order, not alphabetical
    assert a.kinds() == {"full": 1, "lora": 2}
    assert a.num_parameters() == 16 + 2 * (8 + 8)


def test_an_unknown_family_is_refused_with_the_known_ones():
    assert {"sd1", "sdxl", "flux", "sd3"} <= set(FAMILIES)
    with pytest.raises(ValueError, match="family must be one of"):
        Adapter("x", "sd9", {})


def test_a_control_lora_is_one_that_widens_inputs():
    assert Adapter("depth", "flux", {}, widened_inputs={"transformer.x_embedder": 128}).needs_control
    assert not _adapter().needs_control
