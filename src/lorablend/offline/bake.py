"""Bake LoRAs into a model on disk: ``W0 + lora_scale · Σ w_i ΔW_i`` written into the weights, once, for good.

Two kinds of model:

* **A diffusers pipeline folder**: loaded with ``lorablend.DiffusionPipeline``, ``fuse_lora`` (the same code as
  the live API), ``unload_lora_weights``, ``save_pretrained`` into a temp folder beside the output, renamed.
* **A single-file SD1.x / SD2.x / SDXL checkpoint** (``.safetensors`` with LDM/SGM names, what A1111 and ComfyUI
  load), or a **Flux.1 transformer in BFL names** (``double_blocks.N.img_attn.qkv.weight``: q / k / v rows;
  ``single_blocks.N.linear1``: q / k / v / mlp rows; ``final_layer.adaLN_modulation.1``: its halves swapped):
  streamed tensor by tensor. The output header is known before any tensor is read (same keys, dtypes and
  shapes), so it is written first; then each tensor in file order — untouched ones copied byte for byte in
  chunks, touched ones read alone, fused (``fusion.fused_weight``: fp32 from the pristine tensor, one cast) and
  written. Peak memory is about one tensor plus the adapters, whatever the checkpoint's size. SDXL's second
  text encoder stores q/k/v stacked in ``in_proj_weight``: their deltas fuse into the three row blocks;
  ``text_projection`` is stored transposed and fused through the transpose.

Both check every LoRA layer against the model before writing anything (``strict=False`` skips what does not fit
and reports it), write to a temp path in the output's folder and rename at the end, and never write over an input.

>>> report = bake("sd15.safetensors", [("style.safetensors", 0.7), ("detail.safetensors", 0.8)],
...               "sd15-baked.safetensors")                                   # doctest: +SKIP
>>> report.touched, report.tensors                                            # doctest: +SKIP
(192, 1131)
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..adapter import Adapter, Delta
from .bake_steps import BakeJob, BakeOp, BakeReport, LoraSource, fused_tensor, lora_name
from .checkpoint import CheckpointLayout, checkpoint_layout
from ..errors import LoraCompatibilityError, LoraFormatError
from ..runtime.fusion import has_bias_terms
from ..io.safetensors import (
    DTYPE_NAMES,
    DTYPES,
    FLOAT_DTYPES,
    ITEM_SIZES,
    SafetensorsHeader,
    encode_header,
    read_header,
    read_tensor,
)
from ..outputs import atomic_folder, atomic_write, check_output

logger = logging.getLogger(__name__)

_CHUNK = 16 * 2**20  # untouched tensors are copied in pieces of this size: memory stays flat for any tensor


def bake(
    model: str | os.PathLike,
    loras: Sequence[tuple[LoraSource, float]],
    output: str | os.PathLike,
    *,
    lora_scale: float = 1.0,
    overwrite: bool = False,
    dtype: torch.dtype | str | None = None,
    strict: bool = True,
    safe: bool = True,
    progress: bool = False,
) -> BakeReport:
    """Write ``model`` with ``loras`` fused in (``W0 + lora_scale · Σ weight_i · ΔW_i``) to ``output``.

    ``model``: a diffusers pipeline folder (``model_index.json``) or a single-file ``.safetensors`` checkpoint.
    ``loras``: ``(file or Adapter, weight)`` pairs. ``dtype`` casts the output's float tensors (default: keep).
    ``strict=False`` skips LoRA layers the model lacks and lists them in ``report.skipped``. ``safe`` refuses a
    fused weight with NaN/Inf (nothing is written). Raises ``ValueError`` subclasses naming the bad input.

    >>> bake("sdxl-pipeline/", [("ikea.safetensors", 0.7)], "sdxl-ikea/").touched      # doctest: +SKIP
    722
    """
    started = time.perf_counter()
    model_path, out, inputs = _check_paths(model, loras, output, overwrite)
    if model_path.is_dir():  # diffusers and transformers draw loading bars: only for a person at a terminal
        from ..io.hub import hf_progress_bars

        hf_progress_bars(False)  # our own bar, not diffusers' loading bars
    lora_scale = _finite(lora_scale, "lora_scale")
    job = BakeJob(
        model=model_path,
        loras=tuple((src, _finite(w, f"the weight of LoRA #{i + 1}")) for i, (src, w) in enumerate(loras)),
        output=out,
        inputs=tuple(inputs),
        lora_scale=lora_scale,
        dtype=_parse_dtype(dtype),
        overwrite=overwrite,
        strict=strict,
        safe=safe,
        progress=progress,
    )
    if model_path.suffix == ".gguf":  # a quantized single file: offline/quantized_files.py
        from .quantized_files import bake_gguf

        report = bake_gguf(job)
    else:
        report = _bake_pipeline(job) if model_path.is_dir() else _bake_single_file(job)
    report.seconds = time.perf_counter() - started
    logger.info("%s", report.summary())
    return report


# ------------------------------------------------------------------------------------------- checks


def _finite(value: Any, what: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    return value


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    from ..io.write import parse_dtype

    return parse_dtype(dtype)


def _check_paths(model: Any, loras: Sequence, output: Any, overwrite: bool) -> tuple[Path, Path, list[Path]]:
    model_path = Path(model)
    if not model_path.exists():
        raise FileNotFoundError(f"{model}: no such checkpoint file or pipeline folder")
    if model_path.is_dir() and not (model_path / "model_index.json").is_file():
        raise LoraFormatError(f"{model}: a folder without model_index.json is not a diffusers pipeline folder")
    if model_path.is_file() and model_path.suffix not in (".safetensors", ".gguf"):
        raise LoraFormatError(
            f"{model}: single-file checkpoints must be .safetensors or .gguf (a .ckpt pickle can run code on load; "
            "convert it first)"
        )
    if not loras:
        raise ValueError("no LoRA to bake: pass at least one (file, weight) pair")
    sources = []
    for i, spec in enumerate(loras):
        if not (isinstance(spec, (tuple, list)) and len(spec) == 2):
            raise ValueError(f"LoRA #{i + 1} must be a (file or Adapter, weight) pair, got {spec!r}")
        src = spec[0]
        if not isinstance(src, Adapter):
            if not Path(src).exists():
                raise FileNotFoundError(f"{src}: no such file; pass existing LoRA files (CLI: --lora FILE[:WEIGHT])")
            sources.append(Path(src))
    out = Path(output)
    if model_path.is_file() and out.is_dir():
        out = out / model_path.name
    if model_path.is_dir() and out.exists() and not out.is_dir():
        raise ValueError(f"{out}: baking a pipeline folder writes a folder, and this is a file; name a folder")
    inputs = [model_path, *sources]
    check_output(out, inputs=inputs, overwrite=overwrite)
    return model_path, out, inputs


# ------------------------------------------------------------------------------------------- pipeline folder


def _folder_dtype(folder: Path) -> torch.dtype | None:
    """The dtype the pipeline's UNet was saved in (diffusers would load it as fp32 unless told)."""
    for weights in sorted((folder / "unet").glob("*.safetensors")):
        try:
            entries = read_header(weights).entries
        except (LoraFormatError, OSError):
            continue
        floats = [e.dtype for e in entries if e.dtype in FLOAT_DTYPES]
        if floats:
            return DTYPES[max(set(floats), key=floats.count)]
    return None


def _bake_pipeline(job: BakeJob) -> BakeReport:
    from ..pipeline import DiffusionPipeline

    model, out, lora_scale = job.model, job.output, job.lora_scale
    weights = [w for _, w in job.loras]
    torch_dtype = job.dtype or _folder_dtype(model) or torch.float32
    pipe = DiffusionPipeline.from_pretrained(str(model), torch_dtype=torch_dtype)
    taken: set[str] = set()
    names, infos, skipped, touched = [], [], [], set()
    for src, w in job.loras:
        name = lora_name(src, taken)
        load_report = pipe.load_lora_weights(src if isinstance(src, Adapter) else str(src), adapter_name=name, strict=job.strict)
        targets = {r.target for r in load_report.mapped if r.target}
        touched |= targets
        skipped += [{"lora": name, "key": r.key, "reason": r.reason or r.status} for r in load_report.records if r.status != "mapped"]
        names.append(name)
        infos.append({"source": str(src if not isinstance(src, Adapter) else f"<Adapter {src.name}>"), "name": name,
                      "weight": w, "layers": len(targets)})
    pipe.set_adapters(names, adapter_weights=weights)
    pipe.fuse_lora(lora_scale=lora_scale, safe_fusing=job.safe)
    pipe.unload_lora_weights()
    family = pipe.model_view.family
    with atomic_folder(out, overwrite=job.overwrite, inputs=job.inputs) as tmp:
        pipe.save_pretrained(str(tmp))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return BakeReport(str(model), str(out), "pipeline", family, lora_scale, _dtype_name(torch_dtype), infos,
                      tensors=len(pipe.model_view.index.modules), touched=len(touched), bytes=size, skipped=skipped)


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))


# ------------------------------------------------------------------------------------------- single file


def _bake_single_file(job: BakeJob) -> BakeReport:
    from ..io import load_adapter
    from ..runtime.binding import bind_adapter

    model, out, lora_scale, strict = job.model, job.output, job.lora_scale, job.strict

    # Every check of the format, before anything else: the output is streamed by these offsets, so a header
    # that lies (overlaps, gaps, sizes that disagree, a cut-off file, names twice) must stop the bake here.
    header = read_header(model)
    layout = checkpoint_layout(model, header)
    taken: set[str] = set()
    infos, skipped = [], []
    terms: dict[str, list[tuple[float, Delta]]] = {}  # target key -> terms, in LoRA order (the pipeline's order)
    for src, w in job.loras:
        name = lora_name(src, taken)
        adapter = src if isinstance(src, Adapter) else load_adapter(str(src), target=layout.view.components, name=name)
        bound = bind_adapter(adapter, layout.view, strict=strict)
        skipped += [{"lora": name, "key": r.key, "reason": r.reason or r.status} for r in bound.report.records if r.status != "mapped"]
        for key, layer in bound.layers.items():
            terms.setdefault(key, []).append((lora_scale * w, layer.delta))
        infos.append({"source": str(src) if not isinstance(src, Adapter) else f"<Adapter {src.name}>", "name": name,
                      "weight": w, "layers": len(bound.layers)})
    ops = _plan(layout, terms, strict, skipped)
    new_header, sizes = _output_header(header, job.dtype, infos, lora_scale)
    total = sum(sizes)
    logger.info("baking %d layers into %s -> %s (%d tensors, %d bytes)", len(terms), model, out, len(header.entries), total)
    atomic_write(out, _stream(job, header, ops, new_header, sizes), overwrite=job.overwrite, inputs=job.inputs)
    return BakeReport(str(model), str(out), "single_file", layout.family, lora_scale, _dtype_name(job.dtype), infos,
                      tensors=len(header.entries), touched=len({o.placement.target_key for v in ops.values() for o in v}),
                      bytes=out.stat().st_size, skipped=skipped)


def _plan(layout: CheckpointLayout, terms: dict, strict: bool, skipped: list) -> dict[str, list[BakeOp]]:
    """checkpoint tensor name -> the fused regions to compute in it; every problem found before any write."""
    ops: dict[str, list[BakeOp]] = {}
    problems = []
    for key, layer_terms in terms.items():
        placement = layout.placement(key)
        why = "this checkpoint layout has no tensor for it" if placement is None else layout.problem(placement)
        if why is None and has_bias_terms(layer_terms) and placement.bias_key is None:
            why = f"a bias difference, but {placement.weight_key} has no bias in the checkpoint"
        if why is not None:
            problems.append((key, why))
            continue
        ops.setdefault(placement.weight_key, []).append(BakeOp(placement, "weight", layer_terms))
        if has_bias_terms(layer_terms):
            ops.setdefault(placement.bias_key, []).append(BakeOp(placement, "bias", layer_terms))
    if problems and strict:
        lines = "; ".join(f"{k}: {why}" for k, why in problems[:3])
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise LoraCompatibilityError(
            f"{len(problems)} LoRA layer(s) find no tensor in {layout.header.path.name}: {lines}{more}. Nothing was "
            "written; pass strict=False (CLI: --strict false) to bake the layers that fit"
        )
    skipped += [{"lora": "*", "key": k, "reason": why} for k, why in problems]
    if not ops:
        raise LoraCompatibilityError(f"no LoRA layer fits {layout.header.path.name}; nothing was written")
    return ops


def _out_code(code: str, out_dtype: torch.dtype | None) -> str:
    return DTYPE_NAMES[out_dtype] if out_dtype is not None and code in FLOAT_DTYPES else code


def _output_header(header: SafetensorsHeader, out_dtype, infos, lora_scale) -> tuple[bytes, list[int]]:
    """The output's header bytes (same keys and shapes, in the same data order) and each tensor's byte size."""
    codes = [_out_code(e.dtype, out_dtype) for e in header.entries]
    sizes = [math.prod(e.shape) * ITEM_SIZES[code] for e, code in zip(header.entries, codes)]
    metadata = dict(header.metadata)
    metadata["lorablend.baked_loras"] = json.dumps([{k: l[k] for k in ("name", "weight", "layers")} for l in infos])
    metadata["lorablend.lora_scale"] = repr(lora_scale)
    layout = [(e.name, code, e.shape) for e, code in zip(header.entries, codes)]
    return encode_header(layout, metadata), sizes


def _stream(job: BakeJob, header: SafetensorsHeader, ops: dict[str, list[BakeOp]], new_header: bytes,
            sizes: list[int]) -> Iterator[Any]:
    """The output file's bytes, one tensor at a time."""
    from tqdm.auto import tqdm

    out_dtype, safe = job.dtype, job.safe
    yield new_header
    bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="bake", disable=not job.progress, leave=False)
    with open(header.path, "rb") as raw, bar:
        from .quantized_files import Fp8Rewrites  # fp8 weights (and scales): seeded stochastic rounding

        fp8 = Fp8Rewrites(raw, header, ops, safe)
        for e, size in zip(header.entries, sizes):
            code = _out_code(e.dtype, out_dtype)
            if e.name not in ops and code == e.dtype and e.name not in fp8:
                raw.seek(header.data_start + e.start)
                left = e.nbytes
                while left:
                    chunk = raw.read(min(_CHUNK, left))
                    if not chunk:
                        raise LoraFormatError(f"{header.path}: truncated while reading {e.name}")
                    left -= len(chunk)
                    yield chunk
            else:
                tensor = read_tensor(raw, header, e)
                if e.name in fp8:
                    tensor = fp8.tensor(e.name, tensor)
                elif e.name in ops:
                    tensor = fused_tensor(tensor, ops[e.name], DTYPES[code], safe)
                elif tensor.dtype != DTYPES[code]:
                    tensor = tensor.to(DTYPES[code])
                data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
                if data.nbytes != size:  # a bug, not bad input: never write a file whose header lies
                    raise RuntimeError(f"{e.name}: {data.nbytes} bytes computed, {size} announced in the header")
                yield data
                del tensor, data
            bar.update(size)


__all__ = ["BakeJob", "BakeReport", "bake"]
