"""io/load.py: any LoRA source -> one Adapter whose report accounts for every key; the source left unchanged."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lorablend.errors import LoraFormatError
from lorablend.io.load import load_adapter
from lorablend.kinds import LowRankDelta

KEY = "lora_unet_mid_block_attentions_0_proj_in"


def _kohya(rank=4, extra=None):
    g = torch.Generator().manual_seed(0)
    sd = {f"{KEY}.lora_down.weight": torch.randn(rank, 1280, 1, 1, generator=g),
          f"{KEY}.lora_up.weight": torch.randn(1280, rank, 1, 1, generator=g), f"{KEY}.alpha": torch.tensor(2.0)}
    return {**sd, **(extra or {})}


def test_a_kohya_file_becomes_an_adapter_named_after_it_with_every_key_mapped(tmp_path):
    save_file(_kohya(), str(tmp_path / "style.safetensors"))
    adapter = load_adapter(str(tmp_path / "style.safetensors"))
    assert adapter.name == "style" and adapter.family == "sd1" and adapter.format == "kohya"
    delta = adapter.deltas["unet.mid_block.attentions.0.proj_in"]
    assert isinstance(delta, LowRankDelta) and delta.alpha == 2.0 and delta.rank == 4
    assert adapter.report.counts() == {"mapped": 3, "unsupported": 0, "unknown": 0} and adapter.report.complete


def test_a_dict_source_is_read_and_left_unchanged_and_strays_are_reported():
    sd = _kohya(extra={"lora_unet_no_such_layer.lora_down.weight": torch.zeros(4, 3)})
    before = dict(sd)
    adapter = load_adapter(sd, name="d")
    assert sd.keys() == before.keys() and all(sd[k] is before[k] for k in sd)
    assert [r.key for r in adapter.report.unknown] == ["lora_unet_no_such_layer.lora_down.weight"]
    assert not adapter.report.complete


def test_a_file_with_no_lora_key_is_refused_by_name(tmp_path):
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(tmp_path / "ckpt.safetensors"))
    with pytest.raises(LoraFormatError, match="ckpt.safetensors"):
        load_adapter(str(tmp_path / "ckpt.safetensors"))
