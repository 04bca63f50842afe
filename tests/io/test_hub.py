"""Where LoRAs come from: files, folders and repo ids through a local hub-cache layout (offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorablend import DiffusionPipeline
from lorablend.io.hub import fetch_lora

COMMIT = "a" * 40


def _lora_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"x": torch.zeros(1)}, str(path))
    return path


def _cache_repo(cache: Path, repo_id: str, files: list[str]) -> None:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for name in files:
        _lora_file(repo / "snapshots" / COMMIT / name)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)


def test_local_files_and_folders(tmp_path):
    f = _lora_file(tmp_path / "one" / "style.safetensors")
    assert fetch_lora(str(f)) == str(f)
    assert fetch_lora(str(f.parent)) == str(f)  # the single weight file of a folder
    _lora_file(tmp_path / "one" / "other.safetensors")
    with pytest.raises(ValueError, match=r"several weight files \['other.safetensors', 'style.safetensors'\].*weight_name"):
        fetch_lora(str(f.parent))
    assert fetch_lora(str(f.parent), weight_name="other.safetensors").endswith("other.safetensors")
    default = _lora_file(tmp_path / "one" / "pytorch_lora_weights.safetensors")
    assert fetch_lora(str(f.parent)) == str(default)
    with pytest.raises(FileNotFoundError, match="no file 'nope.safetensors'"):
        fetch_lora(str(f.parent), weight_name="nope.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fetch_lora(str(tmp_path / "missing.safetensors"))
    with pytest.raises(TypeError, match="unexpected keyword"):
        fetch_lora(str(f), bogus=1)
    state = {"k": torch.zeros(1)}
    assert fetch_lora(state) is state


def test_repo_ids_resolve_from_the_local_hub_cache(tmp_path):
    cache = tmp_path / "hub"
    _cache_repo(cache, "someone/style-lora", ["style_v1.safetensors"])
    _cache_repo(cache, "someone/default-lora", ["pytorch_lora_weights.safetensors", "other.safetensors"])
    kw = dict(cache_dir=str(cache), local_files_only=True)
    got = fetch_lora("someone/style-lora", weight_name="style_v1.safetensors", **kw)
    assert Path(got).name == "style_v1.safetensors" and COMMIT in got
    assert Path(fetch_lora("someone/style-lora", **kw)).name == "style_v1.safetensors"
    assert Path(fetch_lora("someone/default-lora", **kw)).name == "pytorch_lora_weights.safetensors"
    with pytest.raises(FileNotFoundError, match="local hub cache"):
        fetch_lora("someone/style-lora", weight_name="nope.safetensors", **kw)


def test_load_lora_weights_from_a_cached_repo_id(tmp_path, make_pipe, make_adapter):
    io = pytest.importorskip("lorablend.io")
    cache = tmp_path / "hub"
    pipe = make_pipe("sdxl")
    repo = cache / "models--ostris--ikea-instructions-lora-sdxl"
    io.save_adapter(make_adapter("sdxl", "ikea", seed=1, alpha=2.0),
                    repo / "snapshots" / COMMIT / "ikea_instructions_xl_v1_5.safetensors", format="kohya", target=pipe)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    pipeline = DiffusionPipeline(pipe)
    report = pipeline.load_lora_weights("ostris/ikea-instructions-lora-sdxl", weight_name="ikea_instructions_xl_v1_5.safetensors",
                                        adapter_name="ikea", cache_dir=str(cache), local_files_only=True)
    assert report.complete and pipeline.get_active_adapters() == ["ikea"]
