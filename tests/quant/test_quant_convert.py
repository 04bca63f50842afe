"""quant/convert.py: a model's linears quantized in place (and back to float), the layers it skips left alone."""

from __future__ import annotations

import torch

from lorablend.quant.convert import dequantize_model, quantize_model
from lorablend.quant.formats import format_of


def test_quantize_then_dequantize_gives_float_linears_close_to_the_original():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    reference = [m.weight.detach().clone() for m in model if isinstance(m, torch.nn.Linear)]
    assert quantize_model(model, "scaled-fp8", skip=lambda name: name == "2") == ["0"]
    assert format_of(model[0]) is not None and format_of(model[2]) is None
    assert torch.equal(model[2].weight, reference[1])  # the skipped layer is untouched
    assert dequantize_model(model) == ["0"]
    assert type(model[0]) is torch.nn.Linear
    rel = float((model[0].weight - reference[0]).norm() / reference[0].norm())
    assert 0 < rel < 0.1  # fp8's rounding, no more


def test_a_single_gguf_denoiser_file_serves_the_whole_guide(tmp_path):
    """A tiny Flux transformer written to a .gguf (gguf-py's writer, diffusers' names: its Flux converter assumes
    FLUX.1's 3072 widths for BFL names) and loaded by ``load_denoiser_file`` (diffusers' from_single_file with
    GGUFQuantizationConfig and a local config) is the same model as quantizing the float one in memory: the same
    pictures with a LoRA, unfused and fused; unfuse gives every GGUF layer its bytes back."""
    import copy

    import numpy as np
    import pytest

    pytest.importorskip("gguf")
    from conftest import GEN_KW
    from quant_support import write_gguf_file

    from lorablend import DiffusionPipeline
    from lorablend.fixtures.tiny_transformers import tiny_flux_pipeline
    from lorablend.fixtures.tiny_unets import random_adapter
    from lorablend.quant.convert import load_denoiser_file, quantize_pipeline

    float_pipe = tiny_flux_pipeline()
    adapter = random_adapter(float_pipe, "a", rank=4, seed=1, strength=0.3, components=["transformer"])
    write_gguf_file(tmp_path / "flux-Q8_0.gguf", float_pipe.transformer.state_dict(), "Q8_0")
    float_pipe.transformer.save_config(str(tmp_path / "model" / "transformer"))

    in_memory = DiffusionPipeline(copy.deepcopy(float_pipe))
    quantize_pipeline(in_memory, "gguf-Q8_0")
    from_file = DiffusionPipeline(float_pipe)
    name = load_denoiser_file(from_file, str(tmp_path / "flux-Q8_0.gguf"), config=str(tmp_path / "model"))
    assert name == "transformer"
    layers = {k: m for k, m in from_file.denoiser.named_modules() if format_of(m) is not None}
    assert layers and all(format_of(m).label(m) == "gguf-Q8_0" for m in layers.values())
    whole = (tmp_path / "flux-Q8_0.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[: len(whole) // 2])  # a truncated download
    untouched = DiffusionPipeline(tiny_flux_pipeline())
    before = untouched.denoiser
    with pytest.raises(ValueError, match="cut.gguf"):
        load_denoiser_file(untouched, str(tmp_path / "cut.gguf"), config=str(tmp_path / "model"))
    assert untouched.denoiser is before

    kw = dict(GEN_KW, num_inference_steps=1)
    pictures = []
    for pipe in (in_memory, from_file):
        pipe.load_lora_weights(adapter, adapter_name="a")
        stored = {k: format_of(m).stored_state(m)["weight"].clone() for k, m in layers.items()}  # (from_file's)
        unfused = pipe(**kw, generator=np.random.Generator(np.random.PCG64(0)))[0]
        pipe.fuse_lora()
        fused = pipe(**kw, generator=np.random.Generator(np.random.PCG64(0)))[0]
        pipe.unfuse_lora()
        pictures.append((unfused, fused))
        if pipe is from_file:
            assert all(torch.equal(format_of(m).stored_state(m)["weight"], stored[k]) for k, m in layers.items())
    assert np.array_equal(pictures[0][0], pictures[1][0]) and np.array_equal(pictures[0][1], pictures[1][1])
    assert np.abs(pictures[1][0] - pictures[1][1]).max() < 0.05  # fused ≈ unfused (Q8_0's requantizing)


def test_a_single_fp8_safetensors_denoiser_keeps_the_files_bytes(tmp_path):
    """A plain fp8 single file (float8_e4m3fn linear weights, float the rest): ``load_denoiser_file`` reads it
    through diffusers' from_single_file and stores those linears in fp8 again — the file's bytes exactly — so the
    pictures, with a LoRA too, are those of the float model holding the fp8 values; a fuse / unfuse gives the file's
    bytes back. A scaled-fp8 file is refused naming its scale_weight."""
    import numpy as np
    import pytest
    from conftest import GEN_KW
    from safetensors.torch import save_file

    from lorablend import DiffusionPipeline
    from lorablend.fixtures.tiny_transformers import tiny_flux_pipeline
    from lorablend.fixtures.tiny_unets import random_adapter
    from lorablend.quant.convert import load_denoiser_file

    float_pipe = tiny_flux_pipeline()
    adapter = random_adapter(float_pipe, "a", rank=4, seed=1, strength=0.3, components=["transformer"])
    tensors = {k: (v.to(torch.float8_e4m3fn) if v.dim() == 2 else v.contiguous())
               for k, v in float_pipe.transformer.state_dict().items()}
    save_file(tensors, str(tmp_path / "flux-fp8.safetensors"))
    float_pipe.transformer.save_config(str(tmp_path / "model" / "transformer"))
    from_file = DiffusionPipeline(tiny_flux_pipeline())
    load_denoiser_file(from_file, str(tmp_path / "flux-fp8.safetensors"), config=str(tmp_path / "model"))
    layers = {k: m for k, m in from_file.denoiser.named_modules() if format_of(m) is not None}
    assert layers and {format_of(m).label(m) for m in layers.values()} == {"scaled-fp8-e4m3fn"}  # (scale 1)
    for k, m in layers.items():
        assert torch.equal(m.weight.view(torch.uint8), tensors[k + ".weight"].view(torch.uint8)), k
    with torch.no_grad():  # the float model holding the fp8 values
        for k, p in float_pipe.transformer.named_parameters():
            if p.dim() == 2:
                p.copy_(tensors[k].float())
    reference = DiffusionPipeline(float_pipe)
    kw = dict(GEN_KW, num_inference_steps=1)
    pictures = []
    for pipe in (reference, from_file):
        pictures.append(pipe(**kw, generator=np.random.Generator(np.random.PCG64(0)))[0])
        pipe.load_lora_weights(adapter, adapter_name="a")
        pictures.append(pipe(**kw, generator=np.random.Generator(np.random.PCG64(0)))[0])
    assert np.array_equal(pictures[0], pictures[2]) and np.array_equal(pictures[1], pictures[3])
    from_file.fuse_lora()
    from_file.unfuse_lora()
    assert all(torch.equal(m.weight.view(torch.uint8), tensors[k + ".weight"].view(torch.uint8))
               for k, m in layers.items())
    tensors["x_embedder.scale_weight"] = torch.ones(())
    save_file(tensors, str(tmp_path / "scaled.safetensors"))
    with pytest.raises(ValueError, match="scale_weight"):
        load_denoiser_file(DiffusionPipeline(tiny_flux_pipeline()), str(tmp_path / "scaled.safetensors"))
