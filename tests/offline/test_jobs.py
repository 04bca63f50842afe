"""lorablend.offline.jobs: convert_file and merge_files, the library side of ``lorablend convert`` / ``merge``."""

from __future__ import annotations

import pytest
import torch

from lorablend.adapter import Adapter, LowRankDelta
from lorablend.io import load_adapter, save_adapter
from lorablend.offline.jobs import convert_file, merge_files


@pytest.fixture
def lora_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    key = "unet.down_blocks.0.attentions.0.proj_in"
    paths = []
    for i in range(2):
        delta = LowRankDelta(down=torch.randn(4, 320, generator=g), up=torch.randn(320, 4, generator=g))
        paths.append(save_adapter(Adapter(f"l{i}", "sd1", {key: delta}), tmp_path / f"l{i}.safetensors"))
    return paths


def test_convert_file(tmp_path, lora_files):
    result = convert_file(lora_files[0], tmp_path / "k.safetensors", to="kohya")
    assert result["to_format"] == "kohya" and result["layers"] == 1 and load_adapter(result["output"]).format == "kohya"
    with pytest.raises(ValueError, match="never overwrites an input"):
        convert_file(lora_files[0], lora_files[0], to="kohya", overwrite=True)


def test_merge_files(tmp_path, lora_files):
    out = tmp_path / "m.safetensors"
    merged = merge_files([(lora_files[0], 0.7), (lora_files[1], 0.3)], out, method="cat", report_path=tmp_path / "r.json")
    assert merged.data["layers"] == 1 and merged.data["rank"] is not None and (tmp_path / "r.json").is_file()
    with pytest.raises(ValueError, match="--rank 0"):  # checked before any file is read
        merge_files([(tmp_path / "missing.safetensors", 1.0)], tmp_path / "n.safetensors", rank=0)
    with pytest.raises(FileNotFoundError, match="no such file"):
        merge_files([(tmp_path / "missing.safetensors", 1.0)], tmp_path / "n.safetensors")
    with pytest.raises(ValueError, match="OUTPUT is an INPUT"):
        merge_files([(lora_files[0], 1.0)], lora_files[0], overwrite=True)
