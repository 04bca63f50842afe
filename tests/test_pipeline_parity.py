"""Parity with diffusers + PEFT (the oracle, test-only) on tiny SD1.5 and SDXL pipelines: same weights, same files.

Each adapter is written to disk by ``lorablend.save_adapter`` (kohya with SGM names for SDXL, and diffusers
format) and loaded by both libraries from the same file; the LoRAs touch every Linear/Conv2d of the UNet
and the text encoders, with alpha != rank. Outputs must agree within diffusers' own tolerance (1e-3).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorablend import DiffusionPipeline

from conftest import GEN_KW

pytest.importorskip("peft")
io = pytest.importorskip("lorablend.io")

ATOL = 1e-3


def _pair(make_pipe, make_adapter, family, tmp_path, targets="all"):
    oracle, ours = make_pipe(family), DiffusionPipeline(make_pipe(family))
    paths = {}
    for i, (name, fmt) in enumerate([("a", "kohya"), ("b", "diffusers"), ("c", "kohya")]):
        adapter = make_adapter(family, name, seed=i + 1, rank=4, alpha=[2.0, 4.0, 8.0][i], targets=targets)
        # named against the pipeline before PEFT wraps its layers
        paths[name] = io.save_adapter(adapter, tmp_path / f"{name}.safetensors", format=fmt, target=oracle)
    for name, path in paths.items():
        oracle.load_lora_weights(str(path), adapter_name=name)
        report = ours.load_lora_weights(str(path), adapter_name=name)
        assert report.complete
    return oracle, ours


def _check(oracle, ours, what, **kw):
    expected = oracle(**{**GEN_KW, **kw}, generator=torch.manual_seed(0)).images
    got = ours(**{**GEN_KW, **kw}, generator=torch.manual_seed(0)).images
    assert np.allclose(got, expected, atol=ATOL, rtol=ATOL), f"{what}: max diff {np.abs(got - expected).max()}"
    return got


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_and_diffusers_files_per_component_fuse_and_unload_match_diffusers_peft(make_pipe, make_adapter, family, tmp_path):
    oracle, ours = _pair(make_pipe, make_adapter, family, tmp_path)
    assert ours.get_active_adapters() == oracle.get_active_adapters() == ["c"]
    assert ours.get_list_adapters() == oracle.get_list_adapters()
    base = make_pipe(family)(**GEN_KW, generator=torch.manual_seed(0)).images

    y = _check(oracle, ours, "after load (c active)")
    assert not np.allclose(y, base, atol=ATOL)
    # (blends of diffusers-format files and the call-time scale run for every family in tests/families/)

    per_component = {"unet": 0.6, "text_encoder": 0.0}
    if family == "sdxl":
        per_component["text_encoder_2"] = 1.5
    oracle.set_adapters(["a", "b"], [per_component, 0.5])
    ours.set_adapters(["a", "b"], [per_component, 0.5])
    _check(oracle, ours, "per-component weights")

    # set_adapters before fusing: PEFT's unfuse subtracts the delta at the *current* weights, so calling
    # set_adapters between its fuse and unfuse leaves a residual in the oracle (ours restores pristine copies).
    oracle.set_adapters(["a"])
    ours.set_adapters(["a"])
    oracle.fuse_lora(adapter_names=["a"], lora_scale=0.9)
    ours.fuse_lora(adapter_names=["a"], lora_scale=0.9)
    _check(oracle, ours, "fused a")
    oracle.unfuse_lora()
    ours.unfuse_lora()
    oracle.set_adapters(["a", "b", "c"], [0.7, 0.8, -0.3])
    ours.set_adapters(["a", "b", "c"], [0.7, 0.8, -0.3])
    oracle.fuse_lora()
    ours.fuse_lora()
    assert ours.num_fused_loras == oracle.num_fused_loras == 3
    _check(oracle, ours, "fused a, b, c")
    oracle.unload_lora_weights()
    ours.unload_lora_weights()
    _check(oracle, ours, "fused then unloaded")


def test_attention_block_weights_match_diffusers(make_pipe, make_adapter, tmp_path):
    # diffusers scales attentions only (resnets inherit); with attention-only LoRAs both must agree.
    oracle, ours = _pair(make_pipe, make_adapter, "sd1", tmp_path, targets="attn")
    weights = {"unet": {"down": 0.5, "mid": 0.2, "up": {"block_0": [1.0, 0.3, -0.6]}}, "text_encoder": 0.4}
    oracle.set_adapters(["a", "c"], [weights, 0.8])
    ours.set_adapters(["a", "c"], [weights, 0.8])
    _check(oracle, ours, "diffusers block dict")
