"""Quantize a model's ``Linear`` layers in place, each way the formats of this package read: the tiny test pipelines,
``lorablend serve --quantize``, the benchmarks. (Real checkpoints come quantized through diffusers'
``quantization_config`` or a single GGUF / fp8 file; this is the same layers made from a float model.)

Methods: ``nf4`` / ``fp4`` (bitsandbytes ``Linear4bit``, double quant), ``int8`` (bitsandbytes ``Linear8bitLt``),
``fp8`` / ``scaled-fp8`` (:class:`~lorablend.quant.fp8.ScaledFp8Linear`, scale 1 or ``max|W| / 448``),
``gguf-Q8_0`` / ``gguf-Q4_0`` / … (diffusers' ``GGUFLinear``), ``torchao-int8`` (torchao int8 weight-only).
A layer the method cannot hold (a GGUF row not a whole number of blocks; a 4-bit layer whose rows
bitsandbytes' CPU kernel cannot pack, ``out % 32``) stays float: :func:`quantize_model` returns the names it
quantized.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 32))
>>> quantize_model(model, "scaled-fp8", compute_dtype=torch.float32)
['0']
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

METHODS = ("nf4", "fp4", "int8", "fp8", "scaled-fp8", "torchao-int8", "gguf-Q8_0", "gguf-Q4_0", "gguf-Q5_0",
           "gguf-Q4_1", "gguf-Q5_1", "gguf-BF16")


def _bnb4(linear: nn.Linear, method: str, compute_dtype: torch.dtype) -> nn.Module | None:
    import bitsandbytes as bnb

    if linear.out_features % 32 or linear.in_features % 2 or (linear.in_features * linear.out_features) % 64:
        return None
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type=method,
                              device="cpu")
    layer.load_state_dict({k: v.detach().to(compute_dtype) for k, v in linear.state_dict().items()})
    return layer.to(linear.weight.device)  # (bitsandbytes quantizes on the move)


def _bnb8(linear: nn.Linear, method: str, compute_dtype: torch.dtype) -> nn.Module | None:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, linear.bias is not None,
                                has_fp16_weights=False, device="cpu")
    layer.load_state_dict({k: v.detach().to(compute_dtype) for k, v in linear.state_dict().items()})
    return layer.to(linear.weight.device)


def _fp8(linear: nn.Linear, method: str, compute_dtype: torch.dtype) -> nn.Module | None:
    from .fp8 import ScaledFp8Linear

    return ScaledFp8Linear.from_linear(linear, compute_dtype=compute_dtype, scaled=method == "scaled-fp8")


def _gguf(linear: nn.Linear, method: str, compute_dtype: torch.dtype) -> nn.Module | None:
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from .gguf import quantize_gguf

    qtype = GGMLQuantizationType[method.split("-", 1)[1]]
    if linear.in_features % GGML_QUANT_SIZES[qtype][0]:
        return None
    layer = GGUFLinear(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype=compute_dtype,
                       device="meta")
    raw = quantize_gguf(linear.weight.detach().float().cpu().numpy(), qtype)
    layer.weight = GGUFParameter(torch.from_numpy(raw).to(linear.weight.device), quant_type=qtype)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
    return layer


def _torchao(linear: nn.Linear, method: str, compute_dtype: torch.dtype) -> nn.Module | None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    layer = nn.Linear(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device,
                      dtype=compute_dtype)
    layer.load_state_dict(linear.state_dict())
    quantize_(layer, Int8WeightOnlyConfig())
    return layer


def _maker(method: str) -> Callable[[nn.Linear, str, torch.dtype], nn.Module | None]:
    if method not in METHODS and not method.startswith("gguf-"):
        raise ValueError(f"quantize: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return {"nf4": _bnb4, "fp4": _bnb4, "int8": _bnb8, "fp8": _fp8, "scaled-fp8": _fp8,
            "torchao-int8": _torchao}.get(method, _gguf)


def quantize_model(model: nn.Module, method: str, *, compute_dtype: torch.dtype = torch.float32,
                   skip: Callable[[str], bool] | None = None) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` (but those ``skip(name)`` says) by its ``method`` layer, in place;
    returns the names of the layers quantized (a layer the method cannot hold stays float). ``compute_dtype``
    is what the quantized layers compute in."""
    make = _maker(method)
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and not (skip is not None and skip(name))]
    done = []
    for name, linear in targets:
        layer = make(linear, method, compute_dtype)
        if layer is None:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        done.append(name)
    return done


def dequantize_model(model: nn.Module) -> list[str]:
    """Replace every quantized linear of ``model`` by a float ``nn.Linear`` holding its dequantized weight (fp32),
    in place: the float model a quantized one stands for (the reference of the parity tests; a debugging aid).
    Returns the names replaced.

    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    >>> _ = quantize_model(model, "scaled-fp8"); dequantize_model(model), type(model[0]).__name__
    (['0'], 'Linear')
    """
    from .formats import format_of

    done = []
    for name, module in list(model.named_modules()):
        fmt = format_of(module) if isinstance(module, nn.Linear) else None
        if fmt is None:
            continue
        out_f, in_f = fmt.shape(module)
        layer = nn.Linear(in_f, out_f, module.bias is not None, device=module.weight.device)
        with torch.no_grad():
            layer.weight.copy_(fmt.dequantize(module, fmt.snapshot(module)))
            if module.bias is not None:
                layer.bias.copy_(module.bias.float())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        done.append(name)
    return done



def quantize_pipeline(pipeline: Any, method: str, *, compute_dtype: torch.dtype | None = None) -> list[str]:
    """Quantize a ``lorablend.DiffusionPipeline``'s denoiser in place with ``method`` (before any LoRA is loaded)
    and re-index its runtime so that LoRAs find the new layers; returns the layer names quantized. What
    ``lorablend serve --quantize`` does after loading. ``compute_dtype`` defaults to the denoiser's dtype.

    >>> quantize_pipeline(pipeline, "nf4")                                  # doctest: +SKIP
    """
    from ..naming import components_of

    if pipeline.runtime.adapters:
        raise ValueError(f"quantize the denoiser before loading LoRAs (loaded: {sorted(pipeline.runtime.adapters)})")
    denoiser = pipeline.denoiser
    dtype = compute_dtype or next(p.dtype for p in denoiser.parameters() if p.dtype.is_floating_point)
    done = quantize_model(denoiser, method, compute_dtype=dtype)
    pipeline.runtime.follow(components_of(pipeline), reindex=True)  # (the view found the float layers)
    return done


def load_denoiser_file(pipeline: Any, path: str, *, config: str | None = None,
                       compute_dtype: torch.dtype | None = None) -> str:
    """Replace a ``lorablend.DiffusionPipeline``'s denoiser by the one in a single file, through diffusers'
    ``from_single_file`` with a local ``config`` (a folder holding ``<denoiser>/config.json``, e.g. the pipeline's
    own model folder; default: the current denoiser's config, written to a temporary folder), on the current
    denoiser's device. A ``.gguf`` (city96's ``flux1-dev-Q8_0.gguf``) loads with ``GGUFQuantizationConfig``: GGUF
    linears. A ``.safetensors`` with ``float8_e4m3fn`` weights (a plain fp8 single file) loads as floats, then every
    linear whose weights are all fp8 values is stored in fp8 again (:class:`~lorablend.quant.fp8.ScaledFp8Linear`,
    scale 1: the file's bytes exactly; its bias stays in the compute dtype). Before any LoRA is loaded; the runtime
    re-indexes the new layers. Returns the denoiser's component name.

    >>> load_denoiser_file(pipeline, "flux1-dev-Q8_0.gguf", config="FLUX.1-dev/")  # doctest: +SKIP
    'transformer'
    """
    import tempfile
    from pathlib import Path

    from ..naming import components_of

    if pipeline.runtime.adapters:
        raise ValueError(f"load the denoiser file before loading LoRAs (loaded: {sorted(pipeline.runtime.adapters)})")
    suffix = Path(path).suffix.lower()
    if suffix not in (".gguf", ".safetensors") or not Path(path).is_file():
        raise ValueError(f"--denoiser {path}: expected a .gguf file or an fp8 .safetensors single file")
    if suffix == ".safetensors":
        _check_fp8_file(path)
    name, old = pipeline.denoiser_name, pipeline.denoiser
    dtype = compute_dtype or next(p.dtype for p in old.parameters() if p.dtype.is_floating_point)
    kwargs: dict[str, Any] = {}
    if suffix == ".gguf":
        from diffusers import GGUFQuantizationConfig

        kwargs["quantization_config"] = GGUFQuantizationConfig(compute_dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        if config is None:
            old.save_config(str(Path(tmp) / name))
        try:
            new = type(old).from_single_file(str(path), config=str(config or tmp), subfolder=name, torch_dtype=dtype,
                                             **kwargs)
        except (ValueError, KeyError, OSError, RuntimeError, IndexError) as e:  # (the pipeline is untouched so far)
            raise ValueError(f"--denoiser {path}: diffusers could not read it as a {type(old).__name__} "
                             f"({type(e).__name__}: {str(e)[:200]}); check that the file is whole and made for this "
                             "model (re-download or re-convert it)") from e
    if suffix == ".safetensors":  # (diffusers read the fp8 weights as floats: exact, so fp8 holds them exactly)
        fp8 = {n for n, m in new.named_modules() if type(m) is nn.Linear and torch.equal(
            m.weight.to(torch.float8_e4m3fn).to(m.weight.dtype), m.weight)}
        quantize_model(new, "fp8", compute_dtype=dtype, skip=lambda n: n not in fp8)
    setattr(pipeline, name, new.to(next(old.parameters()).device))
    pipeline.runtime.follow(components_of(pipeline), reindex=True)  # (the view found the old layers)
    return name


def _check_fp8_file(path: str) -> None:
    """Refuse a .safetensors denoiser that is not a plain float8_e4m3fn single file, naming what it holds."""
    from ..io.safetensors import read_header  # (the project's one header parser: a hostile header is refused)

    entries = read_header(path).entries
    keys, dtypes = [e.name for e in entries], {e.dtype for e in entries}
    if any(k.endswith("scale_weight") for k in keys):
        raise ValueError(f"--denoiser {path}: a scaled-fp8 file (ComfyUI's scale_weight), which diffusers' "
                         "from_single_file does not read; bake LoRAs into it with lorablend bake instead")
    if "F8_E4M3" not in dtypes:
        raise ValueError(f"--denoiser {path}: no float8_e4m3fn weight in it ({sorted(dtypes)}); load a float "
                         "checkpoint with the pipeline itself, and quantize it with --quantize")


__all__ = ["METHODS", "dequantize_model", "load_denoiser_file", "quantize_model", "quantize_pipeline"]
