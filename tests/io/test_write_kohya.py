"""io/write_kohya.py: an Adapter as kohya / LyCORIS tensors and ss_* metadata true for what is written."""

from __future__ import annotations

import pytest
import torch

from lorablend import Adapter, LowRankDelta
from lorablend.io.write_kohya import kohya_metadata, kohya_module_name, kohya_state_dict
from lorablend.naming import standard_index

KEY = "unet.mid_block.attentions.0.proj_in"


def _adapter(alpha=2.0, rank=4):
    index = standard_index("sd1")
    out, inp = index.modules[KEY].weight_shape[:2]
    g = torch.Generator().manual_seed(0)
    return Adapter("x", "sd1", {KEY: LowRankDelta(torch.randn(rank, inp, generator=g),
                                                  torch.randn(out, rank, generator=g), alpha=alpha)}), index


def test_tensors_are_written_under_the_kohya_name_as_stored():
    adapter, index = _adapter()
    sd = kohya_state_dict(adapter, index)
    name = kohya_module_name(index, KEY)
    assert name == "lora_unet_mid_block_attentions_0_proj_in"
    assert set(sd) == {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
    down = sd[f"{name}.lora_down.weight"]
    assert down.shape == (4, index.modules[KEY].weight_shape[1], 1, 1)  # proj_in is a 1x1 conv in SD1.5
    assert down.data_ptr() == adapter.deltas[KEY].down.data_ptr()  # a view in the module's shape: not copied
    assert torch.equal(down.flatten(1), adapter.deltas[KEY].down)
    assert float(sd[f"{name}.alpha"]) == 2.0


def test_metadata_describes_the_written_network():
    adapter, index = _adapter(alpha=2.0, rank=4)
    meta = kohya_metadata(adapter, index)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_network_module"] == "networks.lora"
    assert all(isinstance(v, str) for v in meta.values())


def test_a_key_the_index_does_not_know_is_refused_with_the_way_out():
    _, index = _adapter()
    with pytest.raises(ValueError, match="target="):
        kohya_module_name(index, "unet.no_such_layer")
