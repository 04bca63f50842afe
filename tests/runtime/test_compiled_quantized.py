"""Static mode on quantized denoisers (issue 18): ``compile_denoiser(fullgraph=True)`` on a tiny SDXL UNet stored as
bitsandbytes NF4 / int8, GGUF Q8_0, scaled fp8 or torchao int8. Each static layer calls the quantized layer's own
forward and adds the LoRA term in the compute dtype, so the compiled pictures equal the eager (hooked, unfused)
runtime's on the same quantized model; a switch of mix does not recompile; fuse / unfuse keep the stored quantized
bytes bit for bit; a float-copy fuse is refused while compiled, and compiling one is refused; diffusers' layerwise
fp8 casting (untraceable) is refused. Dynamo runs with the counting ``eager`` backend (same tracing and guards as
inductor, no C++ compile). Each format traces the whole tiny UNet (14-21 s here, int8 45 s): the suite runs NF4;
``LORABLEND_ALL_QUANT_COMPILE=1`` runs every format (all pass: 7 tests, 126 s on the shared 2-core machine)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

pytest.importorskip("bitsandbytes")
pytest.importorskip("gguf")

from conftest import GEN_KW  # noqa: E402

from lorablend import DiffusionPipeline  # noqa: E402
from lorablend.quant.convert import quantize_model  # noqa: E402

# the compiled term and the hooked one are the same operations in a possibly different order: fp32 rounding apart
TOL = 1e-4
METHODS = ["nf4"] + (["gguf-Q8_0", "int8", "scaled-fp8", "torchao-int8"] if os.environ.get(
    "LORABLEND_ALL_QUANT_COMPILE") else [])


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    counters.clear()
    yield
    dynamo.reset()


def _quantized(make_pipe, method: str):
    if method == "torchao-int8":
        pytest.importorskip("torchao")
    pipe = make_pipe("sdxl")
    quantize_model(pipe.unet, method)  # (deterministic: two calls give the same bytes)
    return pipe


def _image(pipe) -> np.ndarray:
    return pipe(**dict(GEN_KW, num_inference_steps=1), generator=np.random.Generator(np.random.PCG64(0)))[0]


def _stored(pipe) -> dict:
    return {k: dict(layer.quant.stored_state(layer.module)) for k, layer in pipe.runtime.layers.by_key.items()
            if layer.quant is not None}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].keys() == b[k].keys() and all(
            torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in
            ((a[k][n], b[k][n]) for n in a[k])) for k in a)


def _close(got, want, what: str) -> None:
    gap = float(np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want, dtype=np.float64)).max())
    assert gap <= TOL, f"{what}: {gap}"


@pytest.mark.parametrize("method", METHODS)
def test_static_mode_on_a_quantized_unet(make_pipe, make_adapter, method):
    only = dict(components=["unet"], targets="attn")
    a = make_adapter("sdxl", "a", rank=4, seed=1, strength=0.3, **only)
    b = make_adapter("sdxl", "b", rank=3, seed=2, strength=0.3, **only)
    pipe, ref = DiffusionPipeline(_quantized(make_pipe, method)), DiffusionPipeline(_quantized(make_pipe, method))
    for p in (pipe, ref):
        p.load_lora_weights(a, adapter_name="a")
        p.load_lora_weights(b, adapter_name="b")
        p.set_adapters(["a"], [0.8])
    if method == "int8":  # bitsandbytes moves an int8 layer's statistics (weight.CB -> state.CB) on its first call
        _image(pipe)
    original = _stored(pipe)
    assert _same_state(original, _stored(ref)) and original, "the LoRAs reach the same quantized layers"
    backend = CompileCounterWithBackend("eager")
    pipe.compile_denoiser(max_rank=8, backend=backend, fullgraph=True)
    _close(_image(pipe), _image(ref), "one adapter")
    assert backend.frame_count == 1, backend.frame_count
    with dynamo.config.patch(error_on_recompile=True):  # a switch of mix or weights is data: no recompile
        for p in (pipe, ref):
            p.set_adapters(["a", "b"], [0.5, -0.7])
        _close(_image(pipe), _image(ref), "two adapters")
        pipe.disable_lora(), ref.disable_lora()
        _close(_image(pipe), _image(ref), "disabled")
        pipe.enable_lora(), ref.enable_lora()
    assert backend.frame_count == 1

    pipe.runtime.layers.quantized_fuse_dtype = torch.float32  # a float copy would replace the static forward
    with pytest.raises(ValueError, match="static mode"):
        pipe.fuse_lora(adapter_names=["a"])
    assert _same_state(_stored(pipe), original)
    pipe.runtime.layers.quantized_fuse_dtype = None

    for p in (pipe, ref):  # requantized into the same bytes (same seed); b stays unfused on top
        p.fuse_lora(adapter_names=["a"])
    assert _same_state(_stored(pipe), _stored(ref))
    _close(_image(pipe), _image(ref), "a fused, b unfused")
    pipe.unfuse_lora(), ref.unfuse_lora()
    assert _same_state(_stored(pipe), original), "unfuse gives the quantized bytes back"
    _close(_image(pipe), _image(ref), "unfused again")
    # a fuse rebinds the quantized parameters (new objects), which a graph may guard on: at most one recompile for
    # the fuse and one for the unfuse (measured: none for GGUF / torchao, one for int8, whose first call after a
    # fuse moves the new statistics again); switching mixes stays free of recompiles (above)
    assert backend.frame_count <= 3, backend.frame_count


def test_layerwise_casting_is_refused(make_pipe):
    base = make_pipe("sdxl")
    base.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    pipe = DiffusionPipeline(base)
    with pytest.raises(ValueError, match="layerwise casting"):
        pipe.compile_denoiser(backend=None)
    assert "forward" not in base.unet.__dict__ and not pipe.runtime.layers.static  # nothing installed


def test_compiling_a_float_copy_fuse_is_refused(make_pipe, make_adapter):
    a = make_adapter("sdxl", "a", rank=4, seed=1, components=["unet"], targets="attn")
    pipe = DiffusionPipeline(_quantized(make_pipe, "int8"))
    pipe.load_lora_weights(a, adapter_name="a")
    pipe.runtime.layers.quantized_fuse_dtype = torch.bfloat16
    pipe.fuse_lora()
    with pytest.raises(ValueError, match="float copy"):
        pipe.compile_denoiser(backend=None)
    pipe.unfuse_lora()
    pipe.runtime.layers.quantized_fuse_dtype = None
    pipe.compile_denoiser(backend=None)  # unfused: static mode installs
