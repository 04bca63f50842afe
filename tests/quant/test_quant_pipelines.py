"""LoRAs on tiny SDXL and Flux pipelines whose denoiser is quantized each way (bitsandbytes NF4 / int8, scaled fp8,
diffusers' layerwise fp8, GGUF Q8_0 / Q4_0, torchao int8): the report accounts for every key; unfused images equal
the dequantized model's with the LoRA (GGUF decodes in fp16 in its forward: 2e-3); a fused layer is the dequantized
weight + ΔW within its format's stated rounding; unfuse gives back the original bytes and quant state bit for bit
after 1, 2 and 5 fuses, and after two LoRAs fused one after the other."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("gguf")

from conftest import GEN_KW  # noqa: E402
from quant_support import bnb4_bytes, same_state  # noqa: E402

from lorablend import DiffusionPipeline  # noqa: E402
from lorablend.fixtures.tiny_transformers import tiny_flux_pipeline  # noqa: E402
from lorablend.fixtures.tiny_unets import random_adapter  # noqa: E402
from lorablend.quant.convert import dequantize_model, quantize_model  # noqa: E402
from lorablend.runtime.fusion import fused_weight  # noqa: E402

CASES = [("sdxl", m) for m in ("nf4", "int8", "scaled-fp8", "layerwise-fp8", "gguf-Q8_0", "gguf-Q4_0", "torchao-int8")]
CASES += [("flux", m) for m in ("nf4", "scaled-fp8", "gguf-Q8_0")]
IMAGE_TOL = {"gguf-Q8_0": 2e-3, "gguf-Q4_0": 2e-3}  # others: the same arithmetic as the reference, 1e-4


def denoiser_of(family: str) -> str:
    return "transformer" if family == "flux" else "unet"


@pytest.fixture(scope="module")
def flux_pipe():
    return tiny_flux_pipeline()


@pytest.fixture
def float_pipe(tiny_pipes, flux_pipe):
    def make(family: str):
        return copy.deepcopy(flux_pipe if family == "flux" else tiny_pipes[family])
    return make


def quantized(pipe, method: str) -> list[str]:
    """Quantize the denoiser in place; the names of the quantized layers."""
    denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    if method == "layerwise-fp8":  # diffusers' own: fp8 storage, each layer cast to fp32 for its forward
        denoiser.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        return [n for n, m in denoiser.named_modules() if getattr(m, "weight", None) is not None
                and m.weight.dtype == torch.float8_e4m3fn]
    return quantize_model(denoiser, method)


def generate(pipe: DiffusionPipeline) -> np.ndarray:
    kw = dict(GEN_KW, num_inference_steps=1)
    return pipe(**kw, generator=np.random.Generator(np.random.PCG64(0)))[0]


def quant_layers(pipe: DiffusionPipeline) -> dict:
    return {k: layer for k, layer in pipe.runtime.layers.by_key.items() if layer.quant is not None}


@pytest.mark.parametrize("family,method", CASES)
def test_report_and_unfused_parity(float_pipe, family, method):
    base = float_pipe(family)
    adapter = random_adapter(base, "a", rank=4, seed=1, strength=0.3, components=[denoiser_of(family)])
    ref = float_pipe(family)
    names = quantized(base, method)
    denoiser = ref.transformer if family == "flux" else ref.unet
    if method == "layerwise-fp8":  # the reference: the same fp8 values (weights and biases) held in fp32
        for name in names:
            for p in denoiser.get_submodule(name).parameters(recurse=False):
                p.data = p.data.to(torch.float8_e4m3fn).float()
    else:
        quantized(ref, method)
        dequantize_model(denoiser)
    ours, ref = DiffusionPipeline(base), DiffusionPipeline(ref)  # (wrapped after the swaps: its view finds them)
    report = ours.load_lora_weights(adapter, adapter_name="a")
    assert not report.unsupported and not report.unknown and len(report.mapped) == len(adapter.deltas)
    assert quant_layers(ours), "the LoRA reaches the quantized layers"
    ref.load_lora_weights(adapter, adapter_name="a")
    ours.disable_lora(), ref.disable_lora()
    base_gap = float(np.abs(generate(ours) - generate(ref)).max())  # the format's own forward vs its weights
    ours.enable_lora(), ref.enable_lora()
    ours.set_adapters(["a"], [0.8])
    ref.set_adapters(["a"], [0.8])
    gap = float(np.abs(generate(ours) - generate(ref)).max())
    assert gap <= 2 * base_gap + IMAGE_TOL.get(method, 1e-4), (base_gap, gap)


@pytest.mark.parametrize("family,method", CASES)
def test_fuse_within_rounding_and_unfuse_exact(float_pipe, family, method):
    pipe = float_pipe(family)
    only = dict(components=[denoiser_of(family)], targets="attn")  # (the attention layers: enough, and fast)
    a, b = random_adapter(pipe, "a", rank=4, seed=1, strength=0.3, **only), random_adapter(pipe, "b", seed=2, **only)
    quantized(pipe, method)
    pipe = DiffusionPipeline(pipe)
    pipe.load_lora_weights(a, adapter_name="a")
    pipe.load_lora_weights(b, adapter_name="b")
    layers = quant_layers(pipe)
    original = {k: copy.copy(layer.quant.stored_state(layer.module)) for k, layer in layers.items()}
    w0 = {k: layer.quant.dequantize(layer.module, layer.quant.snapshot(layer.module)) for k, layer in layers.items()}
    for cycle in range(1, 6):
        weight = 0.5 + 0.1 * cycle
        pipe.set_adapters(["a"], [weight])
        pipe.fuse_lora(lora_scale=0.9)
        if cycle == 1:  # the fused weight: W0 + s·w·ΔW within the format's rounding
            for k, layer in layers.items():
                want = fused_weight(w0[k], [(0.9 * weight, a.deltas[k])])  # (the one formula, fp32)
                if layer.quant.name == "bnb-4bit":  # bitsandbytes' own quantizer of the exact fused weight
                    assert torch.equal(layer.module.weight.data, bnb4_bytes(want, layer.quant_snapshot)), k
                    continue
                got = layer.quant.dequantize(layer.module, layer.quant.snapshot(layer.module))
                bound = layer.quant.fused_rounding(layer.module) * float(want.abs().max())
                assert float((got - want).abs().max()) <= bound + 1e-6, (k, method)
            assert np.isfinite(generate(pipe)).all()
        pipe.unfuse_lora()
        if cycle in (1, 2, 5):
            assert all(same_state(original[k], layer.quant.stored_state(layer.module)) for k, layer in layers.items())
    pipe.set_adapters(["a", "b"], [0.7, 0.4])
    pipe.fuse_lora(adapter_names=["a"])
    pipe.fuse_lora(adapter_names=["b"])
    generate(pipe)
    pipe.unfuse_lora(adapter_names=["a"])
    pipe.unfuse_lora(adapter_names=["b"])
    assert all(same_state(original[k], layer.quant.stored_state(layer.module)) for k, layer in layers.items())


def test_fp8_fuse_reproducible_with_the_same_seed(float_pipe):
    pipe = float_pipe("sdxl")
    adapter = random_adapter(pipe, "a", rank=4, seed=1, components=["unet"])
    quantized(pipe, "scaled-fp8")
    pipe = DiffusionPipeline(pipe, rounding_seed=3)
    pipe.load_lora_weights(adapter, adapter_name="a")
    layers = quant_layers(pipe)

    def fused_bytes(seed: int | None = None) -> dict:
        if seed is not None:  # (else the seed the pipeline was wrapped with)
            pipe.runtime.layers.rounding_seed = seed
        pipe.fuse_lora()
        out = {k: layer.module.weight.detach().view(torch.uint8).clone() for k, layer in layers.items()}
        pipe.unfuse_lora()
        return out

    first, again, other = fused_bytes(), fused_bytes(3), fused_bytes(4)
    assert all(torch.equal(first[k], again[k]) for k in layers)
    assert any(not torch.equal(first[k], other[k]) for k in layers)


def test_quantize_pipeline_after_wrapping(float_pipe):
    """``lorablend serve --quantize``: the denoiser quantized after the pipeline is wrapped; LoRAs find the new
    layers (the runtime re-indexed), and quantizing once LoRAs are loaded is refused."""
    from lorablend.quant.convert import quantize_pipeline

    pipe = DiffusionPipeline(float_pipe("sdxl"))
    adapter = random_adapter(pipe, "a", rank=4, seed=1, components=["unet"], targets="attn")
    assert quantize_pipeline(pipe, "scaled-fp8")
    report = pipe.load_lora_weights(adapter, adapter_name="a")
    assert len(report.mapped) == len(adapter.deltas) and len(quant_layers(pipe)) == len(adapter.deltas)
    assert np.isfinite(generate(pipe)).all()
    with pytest.raises(ValueError, match="before loading LoRAs"):
        quantize_pipeline(pipe, "nf4")


@pytest.mark.parametrize("family,method", [("sdxl", "scaled-fp8"), ("flux", "gguf-Q8_0")])
def test_block_weights_and_call_scale_on_a_quantized_base(float_pipe, family, method):
    """Per-block weights and a call-time scale on the quantized denoiser = the same on its dequantized model."""
    base, ref = float_pipe(family), float_pipe(family)
    adapter = random_adapter(base, "a", rank=4, seed=1, strength=0.3, components=[denoiser_of(family)])
    quantized(base, method)
    quantized(ref, method)
    dequantize_model(ref.transformer if family == "flux" else ref.unet)
    ours, ref = DiffusionPipeline(base), DiffusionPipeline(ref)
    blocks = {"D00": 0.0, "S01": 0.3} if family == "flux" else {"IN04": 0.0, "OUT02": 0.2}  # (others: 1)
    images = []
    for pipe in (ours, ref):
        pipe.load_lora_weights(adapter, adapter_name="a")
        pipe.set_adapters("a", {denoiser_of(family): blocks})
        kw = dict(GEN_KW, num_inference_steps=1)
        scale = {"joint_attention_kwargs" if family == "flux" else "cross_attention_kwargs": {"scale": 0.6}}
        images.append(pipe(**kw, **scale, generator=np.random.Generator(np.random.PCG64(0)))[0])
    np.testing.assert_allclose(images[0], images[1], atol=IMAGE_TOL.get(method, 1e-4))
    terms = [layer.has_term for layer in quant_layers(ours).values()]
    assert any(terms) and not all(terms), "the zero-weight block's quantized layers add no term, the others do"


def test_static_mode_installs_on_a_quantized_denoiser_but_not_on_layerwise_casting(float_pipe):
    """Static (compiled) mode runs on quantized layers (their buffers take the logical shape; compiled pictures:
    tests/runtime/test_compiled_quantized.py); diffusers' layerwise casting, which re-types weights in place per
    forward, is refused and nothing is handed to a static owner."""
    pipe = float_pipe("sdxl")
    quantized(pipe, "scaled-fp8")
    pipe = DiffusionPipeline(pipe)
    static = pipe.compile_denoiser(max_rank=4, backend=None)
    layer = next(k for k, m in static.modules.items() if type(m).__name__ == "ScaledFp8Linear")
    assert static.layers[layer].base is not None  # the layer's own fp8 forward, plus the term
    lw = float_pipe("sdxl")
    quantized(lw, "layerwise-fp8")
    lw = DiffusionPipeline(lw)
    with pytest.raises(ValueError, match="layerwise casting"):
        lw.compile_denoiser()
    assert not lw.runtime.layers.static


def test_pristine_weight_of_a_quantized_layer_is_its_dequantized_original(float_pipe):
    """What a DoRA base or add_weighted_adapter reads (``runtime.pristine_weight``): the fp32 weight of the original
    bytes, of the logical shape — before a fuse, while fused, and for a layer no LoRA touches."""
    pipe = float_pipe("sdxl")
    adapter = random_adapter(pipe, "a", rank=4, seed=1, components=["unet"], targets="attn")
    quantized(pipe, "gguf-Q8_0")
    pipe = DiffusionPipeline(pipe)
    pipe.load_lora_weights(adapter, adapter_name="a")
    key = next(iter(adapter.deltas))
    layer = quant_layers(pipe)[key]
    original = layer.quant.dequantize(layer.module, layer.quant.snapshot(layer.module))
    assert torch.equal(pipe.runtime.pristine_weight(key), original)
    pipe.fuse_lora()
    assert torch.equal(pipe.runtime.pristine_weight(key), original)
    untouched = next(k for k, i in pipe.model_view.index.modules.items()
                     if k not in adapter.deltas and i.kind == "linear" and k.startswith("unet.")
                     and type(pipe.model_view.module(k)).__name__ == "GGUFLinear")
    assert pipe.runtime.pristine_weight(untouched).shape == pipe.model_view.index.modules[untouched].weight_shape


@pytest.mark.parametrize("method", ["nf4", "layerwise-fp8", "gguf-Q8_0"])
def test_fuse_into_float_copies_matches_the_unfused_pipeline_and_unfuses_exactly(float_pipe, method):
    """``DiffusionPipeline(pipe, quantized_fuse_dtype=torch.float32)``: fuse_lora keeps each touched layer's fused
    weight as a float copy (no requantizing rounding), so the picture is the unfused pipeline's within the format's
    own forward error; unfuse gives back the stored state bit for bit and the base picture exactly."""
    pipe = float_pipe("sdxl")
    adapter = random_adapter(pipe, "a", rank=4, seed=1, strength=0.3, components=["unet"], targets="attn")
    quantized(pipe, method)
    pipe = DiffusionPipeline(pipe, quantized_fuse_dtype=torch.float32)
    with pytest.raises(ValueError, match="quantized_fuse_dtype"):  # a second wrapper cannot fuse the other way
        DiffusionPipeline(pipe.pipe, quantized_fuse_dtype=None)
    base = generate(pipe)
    pipe.load_lora_weights(adapter, adapter_name="a")
    layers = quant_layers(pipe)
    original = {k: copy.copy(layer.quant.stored_state(layer.module)) for k, layer in layers.items()}
    unfused = generate(pipe)
    pipe.fuse_lora()
    assert all("lorablend_fused_weight" in layer.module._buffers for layer in layers.values())
    fused = generate(pipe)
    assert np.abs(fused - unfused).max() <= IMAGE_TOL.get(method, 1e-4), method
    pipe.unfuse_lora()
    assert all(same_state(original[k], layer.quant.stored_state(layer.module)) for k, layer in layers.items())
    pipe.unload_lora_weights()
    assert np.array_equal(generate(pipe), base)


def test_from_pretrained_with_a_diffusers_quantization_config_runs_the_guide(tiny_pipes, tmp_path):
    """``DiffusionPipeline.from_pretrained(folder, quantization_config=PipelineQuantizationConfig(...))``: diffusers
    quantizes the UNet while loading (torchao int8 weight-only: the config that runs on a CPU; diffusers refuses
    BitsAndBytesConfig without a GPU), and the guide works on what it built — the report is complete, the LoRA
    reaches the quantized layers and changes the picture, fuse ≈ unfused within int8's rounding, unfuse gives the
    stored state back bit for bit, unload gives the base picture back exactly."""
    torchao_quantization = pytest.importorskip("torchao.quantization")
    from diffusers import PipelineQuantizationConfig, TorchAoConfig

    tiny_pipes["sdxl"].save_pretrained(tmp_path)
    config = PipelineQuantizationConfig(
        quant_mapping={"unet": TorchAoConfig(torchao_quantization.Int8WeightOnlyConfig())})
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path), quantization_config=config, dtype=torch.float32)
    adapter = random_adapter(pipe, "a", rank=4, seed=1, strength=0.3, components=["unet"], targets="attn")
    base = generate(pipe)
    report = pipe.load_lora_weights(adapter, adapter_name="a")
    assert not report.unsupported and not report.unknown and len(report.mapped) == len(adapter.deltas)
    layers = quant_layers(pipe)
    assert layers and all(layer.quant.name.startswith("torchao") for layer in layers.values())
    original = {k: copy.copy(layer.quant.stored_state(layer.module)) for k, layer in layers.items()}
    pipe.set_adapters(["a"], [0.8])
    unfused = generate(pipe)
    assert np.abs(unfused - base).max() > 1e-3
    pipe.fuse_lora()
    assert np.abs(generate(pipe) - unfused).max() <= 2e-2  # int8 requantizing rounding, ½/127 of a row's max
    pipe.unfuse_lora()
    assert all(same_state(original[k], layer.quant.stored_state(layer.module)) for k, layer in layers.items())
    pipe.unload_lora_weights()
    assert np.array_equal(generate(pipe), base)
