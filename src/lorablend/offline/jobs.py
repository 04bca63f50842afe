"""File-to-file jobs with no model: convert a LoRA file, merge LoRA files into one.

What ``lorablend convert`` and ``lorablend merge`` run, as library calls: the cheap checks first (a typo fails
before minutes of loading and merging), then the work, then a plain-data result the caller prints or stores.
Nothing here imports diffusers or transformers (``tests/test_offline_imports.py``). Errors are ``ValueError``
(``LoraFormatError`` among them) or ``OSError`` subclasses naming the bad input; nothing is written on error and
no input is ever overwritten.

>>> result = convert_file("style.safetensors", "style_kohya.safetensors", to="kohya")      # doctest: +SKIP
>>> result["layers"], result["to_format"]                                                 # doctest: +SKIP
(192, 'kohya')
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

PathLike = str | os.PathLike


def convert_file(
    input: PathLike, output: PathLike, *, to: str, dtype: str | None = None, overwrite: bool = False,
    progress: bool = False, family: str | None = None,
) -> dict[str, Any]:
    """Read a LoRA file in any format we read and write it in ``to`` (``"diffusers"`` or ``"kohya"``) format.

    Keys the reader could not place on the family's layers (report ``unknown`` / ``unsupported``) are copied as
    they are when ``to`` spells keys as the input does (kohya -> kohya, diffusers -> diffusers), else dropped:
    ``unplaced`` in the result says which, how many and why. Returns what was done: input, output, formats,
    family, layers, kinds, bytes, the output's sshs hash, the input's key report counts and ``unplaced``.
    ``family`` reads a file whose layers fit several models alike as that family's (``load_adapter(family=)``).

    >>> convert_file("a.safetensors", "a.safetensors", to="kohya")                  # doctest: +SKIP
    Traceback (most recent call last):
    ...
    ValueError: a.safetensors: OUTPUT is the INPUT file; lorablend never overwrites an input
    """
    from ..errors import LoraFormatError
    from ..io import load_adapter, save_adapter
    from ..io.safetensors import sshs_model_hash
    from ..outputs import same_file

    if same_file(input, output):
        raise ValueError(f"{output}: OUTPUT is the INPUT file; lorablend never overwrites an input")
    try:
        adapter = load_adapter(input, family=family)
    except LoraFormatError as err:  # no family places it: in its own spelling, every key can still be kept
        return _convert_unplaced(input, output, to=to, dtype=dtype, overwrite=overwrite, err=err)
    unplaced = [r.key for r in adapter.report.records if r.status != "mapped"]
    kept = _unplaced_tensors(input, unplaced) if unplaced and _SAME_SPELLING.get(adapter.format) == to else {}
    out = save_adapter(adapter, output, format=to, overwrite=overwrite, dtype=dtype, progress=progress,
                       extra_tensors=kept)
    return {
        "input": str(input),
        "output": str(out),
        "from_format": adapter.format,
        "to_format": to,
        "family": adapter.family,
        "layers": len(adapter.deltas),
        "kinds": adapter.kinds(),
        "bytes": out.stat().st_size,
        "sshs_model_hash": sshs_model_hash(out),
        "report": adapter.report.counts(),
        "unplaced": {
            "kept": len(kept), "dropped": len(unplaced) - len(kept), "keys": unplaced[:10],
            "why": ("copied as they are: the output format spells keys as the input does" if kept else
                    f"the {to} format cannot name keys read as {adapter.format} that no layer took") if unplaced else "",
        },
    }


# a read format -> the write format that spells its keys the same way (unplaced keys can be copied as they are)
_SAME_SPELLING = {"kohya": "kohya", "diffusers": "diffusers"}


def _convert_unplaced(input: PathLike, output: PathLike, *, to: str, dtype: str | None, overwrite: bool,
                      err: Exception) -> dict[str, Any]:
    """A LoRA no family places (e.g. made for a smaller model), written again when ``to`` spells its keys as it
    does: every tensor under its own key (floating weights cast to ``dtype``; alphas kept), its metadata kept.
    Any other ``to`` cannot name its layers: ``err`` (why no family places it) is raised, nothing written."""
    from ..io.files import read_source
    from ..io.load import read_layers
    from ..io.safetensors import sshs_model_hash
    from ..io.write import output_path, parse_dtype, serialize_with_hash
    from ..outputs import atomic_write, check_output

    layers = read_layers(input)
    own = _SAME_SPELLING.get(layers.format)
    if not layers.deltas or own is None:
        raise err
    if own != to:
        raise type(err)(f"{err}. --to {to} cannot name layers no family places; --to {own} copies every key of it "
                        "as it is") from None
    out = check_output(output_path(output, to, Path(str(input)).stem), inputs=[input], overwrite=overwrite)
    cast = parse_dtype(dtype)
    tensors = {k: t.to(cast) if cast is not None and t.is_floating_point() and t.dim() > 0 else t
               for k, t in read_source(input).tensors.items()}
    header, chunks = serialize_with_hash(tensors, layers.metadata)
    atomic_write(out, [header, *chunks], overwrite=overwrite, inputs=[input])
    kinds: dict[str, int] = {}
    for delta in layers.deltas.values():
        kinds[delta.kind] = kinds.get(delta.kind, 0) + 1
    return {
        "input": str(input), "output": str(out), "from_format": layers.format, "to_format": to, "family": "unknown",
        "layers": len(layers.deltas), "kinds": kinds, "bytes": out.stat().st_size,
        "sshs_model_hash": sshs_model_hash(out), "report": {"mapped": 0, "unsupported": 0, "unknown": len(tensors)},
        "unplaced": {"kept": len(tensors), "dropped": 0, "keys": list(tensors)[:10],
                     "why": f"no family places this file, so every key was copied as it is ({err})"},
    }


def _unplaced_tensors(input: PathLike, keys: list[str]) -> dict[str, Any]:
    """The input file's own tensors of ``keys`` (what no layer took), to be written again unchanged."""
    from ..io.files import read_source

    tensors = read_source(input).tensors
    return {k: tensors[k] for k in keys if k in tensors}


@dataclass(frozen=True)
class MergedFile:
    """What :func:`merge_files` wrote: the result (plain data) and the per-layer report's summary.

    >>> MergedFile({"output": "m.safetensors"}, "svd: 0 layers").data["output"]
    'm.safetensors'
    """

    data: dict[str, Any]
    summary: str


def merge_files(
    inputs: Sequence[tuple[PathLike, float]],
    output: PathLike,
    *,
    method: str = "svd",
    format: str = "diffusers",
    dtype: str | None = None,
    device: str = "cpu",
    name: str | None = None,
    report_path: PathLike | None = None,
    overwrite: bool = False,
    progress: bool = False,
    family: str | None = None,
    **options: Any,
) -> MergedFile:
    """Merge LoRA files, ``(path, weight)`` pairs, into one LoRA file; ``options`` are ``merge``'s (``rank``,
    ``energy``, ``clamp``, ``density``, ``majority_sign``, ``seed``, ``block_weights``). ``dtype`` defaults to
    the inputs' common dtype (fp32 when they differ). ``report_path`` also writes the per-layer report (JSON).
    ``family`` reads every input as that family's LoRA (files whose layers fit several models alike).

    >>> merge_files([("a.safetensors", 0.7), ("b.safetensors", 0.8)], "ab.safetensors", rank=16)  # doctest: +SKIP
    """
    from ..io import load_adapter, save_adapter
    from ..merge import merge_with_report
    from ..outputs import atomic_write

    _check_merge_options(device, options)  # cheap checks first: a typo fails before minutes of loading
    _check_merge_inputs(inputs, output, format=format, name=name, report_path=report_path, overwrite=overwrite)
    adapters = [load_adapter(path, family=family) for path, _ in inputs]
    merged, report = merge_with_report(adapters, [w for _, w in inputs], method, name=name, device=device,
                                       progress=progress, **options)
    dtype = dtype or _input_dtype(adapters)
    out = save_adapter(merged, output, format=format, overwrite=overwrite, dtype=dtype, progress=progress)
    listed = [{"path": str(p), "weight": w} for p, w in inputs]
    if report_path is not None:
        # Written after the LoRA file, through a temp file: an error leaves neither half-written.
        text = json.dumps({"inputs": listed, "output": str(out), **report.to_dict()}, indent=2)
        atomic_write(report_path, [text.encode()], overwrite=overwrite, inputs=[p for p, _ in inputs])
    errors = [layer.rel_error for layer in report.layers]
    data = {
        "output": str(out),
        "format": format,
        "dtype": dtype,
        "method": method,
        "inputs": [{**item, "name": a.name, "format": a.format, "family": a.family, "layers": len(a.deltas)}
                   for item, a in zip(listed, adapters)],
        "family": merged.family,
        "layers": len(merged.deltas),
        "rank": merged.metadata.get("lorablend.merge.rank"),
        "max_rel_error": report.max_rel_error,
        "mean_rel_error": sum(errors) / len(errors) if errors else 0.0,
        "dropped": report.dropped,
        "bytes": out.stat().st_size,
        "report": None if report_path is None else str(report_path),
    }
    return MergedFile(data, report.summary())


def _check_merge_inputs(
    inputs: Sequence[tuple[PathLike, float]], output: PathLike, *, format: str, name: str | None,
    report_path: PathLike | None, overwrite: bool,
) -> None:
    """Every input exists; the output (and the report) is no input, and exists only with ``overwrite``."""
    from ..io.write import output_path
    from ..outputs import refuse_existing, same_file

    for path, _ in inputs:
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: no such file; pass existing LoRA files as FILE[:WEIGHT]")
    out_target = output_path(output, format, name or "merged")
    for path, _ in inputs:
        if same_file(path, out_target) or same_file(path, output):
            raise ValueError(f"{output}: OUTPUT is an INPUT file; lorablend never overwrites an input")
    refuse_existing(out_target, overwrite)
    if report_path is not None:
        if any(same_file(report_path, p) for p, _ in inputs) or same_file(report_path, out_target):
            raise ValueError(f"--report {report_path}: that is an input or the output; name a new .json file")
        refuse_existing(report_path, overwrite)


def _check_merge_options(device: str, options: dict[str, Any]) -> None:
    """The options that can be checked before any file is read."""
    rank = options.get("rank")
    if rank is not None and rank <= 0:
        raise ValueError(f"--rank {rank}: the rank must be a positive integer, e.g. --rank 64")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available here; use --device cpu")


def _input_dtype(adapters: list) -> str:
    """The inputs' common float dtype as a dtype name (``fp16``, ``bf16``, ``fp32``); fp32 when they differ."""
    import torch

    dtypes = {next(iter(d.tensors())).dtype for a in adapters for d in a.deltas.values()}
    if len(dtypes) == 1:
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtypes.pop(), "fp32")
    return "fp32"


__all__ = ["MergedFile", "convert_file", "merge_files"]
