"""Files we write load in diffusers' own ``pipe.load_lora_weights`` with the same ΔW per layer (the oracle),
and read back through ``load_adapter(target=pipe)`` bit for bit, on the tiny SD1.5 and SDXL pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from conftest import GEN_KW, assert_same_computed, params_of

from lorablend.adapter import Adapter, DoRADelta, LowRankDelta
from lorablend.io import load_adapter, save_adapter
from lorablend.naming import module_index


def varied_adapter(pipe, make_adapter, family: str) -> Adapter:
    """A LoRA on every Linear / Conv2d with mixed ranks and alphas (None, 0, fractional), and Tucker convs."""
    adapter = make_adapter(family, "varied", rank=4, alpha=2.0, targets="all", seed=3)
    idx = module_index(pipe)
    g = torch.Generator().manual_seed(5)
    for i, (key, d) in enumerate(list(adapter.deltas.items())):
        out_f, *rest = idx.modules[key].weight_shape
        if i % 3 == 1:
            d.alpha = 3.0
        elif i % 5 == 2:
            d.alpha = None
        elif i % 11 == 4:
            d.alpha = 0.0
        if i % 7 == 3:  # rank 2 where the rest is rank 4: rank_pattern
            up_shape = (out_f, 2, 1, 1) if len(rest) == 3 else (out_f, 2)
            adapter.deltas[key] = LowRankDelta(torch.randn(2, *rest, generator=g) * 0.1,
                                               torch.randn(up_shape, generator=g) * 0.1, alpha=1.5)
        elif len(rest) == 3 and tuple(rest[1:]) == (3, 3) and i % 2 == 0:  # Tucker LoCon
            r = 3
            adapter.deltas[key] = LowRankDelta(
                torch.randn(r, rest[0], 1, 1, generator=g) * 0.1, torch.randn(out_f, r, 1, 1, generator=g) * 0.1,
                alpha=2.0, mid=torch.randn(r, r, 3, 3, generator=g) * 0.1,
            )
    return adapter


def assert_fused_equals(pipe, w0: dict[str, torch.Tensor], adapter: Adapter, atol: float) -> None:
    """After diffusers fused the file: touched weights are W0 + ΔW, every other parameter is untouched."""
    idx = module_index(pipe)
    now = params_of(pipe)
    touched = set()
    for key, d in adapter.deltas.items():
        info = idx.modules[key]
        name = f"{info.component}.{info.live_path}.weight"
        touched.add(name)
        expected = w0[name] + d.delta_weight(info.weight_shape)
        torch.testing.assert_close(now[name], expected, atol=atol, rtol=0, msg=lambda m: f"{key}: {m}")
    assert not torch.equal(now[name], w0[name])
    assert all(torch.equal(now[k], w0[k]) for k in now if k not in touched)


def _fuse_in_diffusers_and_compare(pipe, path, adapter) -> None:
    """diffusers loads the file and fuses it: every weight must equal W0 + ΔW of our adapter."""
    w0 = params_of(pipe)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert_fused_equals(pipe, w0, adapter, atol=1e-6)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_format_loads_in_diffusers(tmp_path, make_pipe, make_adapter, family):
    pipe = make_pipe(family)
    adapter = varied_adapter(pipe, make_adapter, family)
    path = save_adapter(adapter, tmp_path / "d.safetensors", "diffusers", target=pipe)
    _fuse_in_diffusers_and_compare(pipe, path, adapter)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_format_loads_in_diffusers_kohya_converter(tmp_path, make_pipe, make_adapter, family):
    """diffusers' kohya converter is an independent check of our names (diffusers-style for SD1, SGM for SDXL).

    One alpha for all layers: with mixed alphas diffusers' kohya path applies the most common alpha everywhere
    (its alpha_pattern keys do not match), a diffusers bug that is no concern of the file; ComfyUI and A1111
    read .alpha per layer."""
    pipe = make_pipe(family)
    adapter = make_adapter(family, "k", rank=4, alpha=2.0, targets="all", seed=4)
    path = save_adapter(adapter, tmp_path / "k.safetensors", "kohya", target=pipe)
    with safe_open(str(path), "pt") as f:
        names = {k.split(".")[0] for k in f.keys()}
    if family == "sdxl":
        assert any(n.startswith("lora_unet_input_blocks_") for n in names) and any("lora_te2_" in n for n in names)
    else:
        assert any(n.startswith("lora_unet_down_blocks_") for n in names) and any("lora_te_" in n for n in names)
    _fuse_in_diffusers_and_compare(pipe, path, adapter)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_round_trip_on_a_tiny_pipeline(tmp_path, tiny_pipes, make_adapter, family, fmt):
    pipe = tiny_pipes[family]
    adapter = varied_adapter(pipe, make_adapter, family)
    back = load_adapter(save_adapter(adapter, tmp_path / "a.safetensors", fmt, target=pipe), target=pipe)
    assert back.report.complete and set(back.deltas) == set(adapter.deltas)
    idx = module_index(pipe)
    for key, d in adapter.deltas.items():
        shape = idx.modules[key].weight_shape
        assert_same_computed(d.delta_weight(shape), back.deltas[key].delta_weight(shape), key)


def test_pipeline_output_matches_our_delta(tmp_path, make_pipe, make_adapter):
    """Unfused diffusers + PEFT on our file gives the image of W0 + ΔW written into the weights (1e-3)."""
    theirs, ours = make_pipe("sd1"), make_pipe("sd1")
    adapter = varied_adapter(theirs, make_adapter, "sd1")
    theirs.load_lora_weights(str(save_adapter(adapter, tmp_path / "d.safetensors", "diffusers", target=theirs)))
    idx = module_index(ours)
    with torch.no_grad():
        for key, d in adapter.deltas.items():
            info = idx.modules[key]
            module = getattr(ours, info.component).get_submodule(info.live_path)
            module.weight += d.delta_weight(info.weight_shape)
    a = theirs(**GEN_KW, generator=torch.Generator().manual_seed(0))[0]
    b = ours(**GEN_KW, generator=torch.Generator().manual_seed(0))[0]
    # (no "did the LoRA change anything" run is needed: had diffusers ignored the file, `a` would lack ΔW)
    assert np.abs(a - b).max() < 1e-3


def dora_adapter(pipe, make_adapter) -> Adapter:
    """DoRA (per-output-row magnitudes) on every UNet layer, linear and conv; plain LoRA on the text encoder."""
    adapter = make_adapter("sd1", "dora", rank=4, alpha=2.0, targets="all", seed=6)
    idx = module_index(pipe)
    g = torch.Generator().manual_seed(8)
    for i, (key, d) in enumerate(list(adapter.deltas.items())):
        if not key.startswith("unet."):
            continue
        shape = idx.modules[key].weight_shape
        mag = torch.rand(shape[0], generator=g) + 0.5
        # kohya spells the magnitude (out, 1, ...), PEFT (out,) / (1, out, 1, 1): the writer takes either
        adapter.deltas[key] = DoRADelta(d, mag.reshape(-1, *([1] * (len(shape) - 1))) if i % 2 else mag, "out")
    return adapter


def test_dora_diffusers_format_loads_in_diffusers(tmp_path, make_pipe, make_adapter):
    pipe = make_pipe("sd1")
    adapter = dora_adapter(pipe, make_adapter)
    path = save_adapter(adapter, tmp_path / "dora.safetensors", "diffusers", target=pipe)
    with safe_open(str(path), "pt") as f:
        assert any(k.endswith(".lora_magnitude_vector") for k in f.keys())
    back = load_adapter(path, target=pipe)
    idx = module_index(pipe)
    w0 = params_of(pipe)
    for key, d in adapter.deltas.items():
        info = idx.modules[key]
        base = w0[f"{info.component}.{info.live_path}.weight"]
        assert back.deltas[key].kind == d.kind
        assert_same_computed(back.deltas[key].delta_weight(info.weight_shape, **({"base": base} if d.kind == "dora" else {})),
                             d.delta_weight(info.weight_shape, **({"base": base} if d.kind == "dora" else {})), key)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    now = params_of(pipe)
    for key, d in adapter.deltas.items():
        info = idx.modules[key]
        name = f"{info.component}.{info.live_path}.weight"
        extra = {"base": w0[name]} if d.kind == "dora" else {}
        torch.testing.assert_close(now[name], w0[name] + d.delta_weight(info.weight_shape, **extra), atol=1e-6, rtol=0)
