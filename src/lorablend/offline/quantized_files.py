"""Bake LoRAs into a quantized single file: a GGUF denoiser (city96-style Flux ``.gguf`` in BFL names, any quant
type), streamed tensor by tensor with gguf-py's own reader and writer.

Before a byte is written the whole file is checked (:func:`read_gguf`): gguf-py must parse it, every tensor's type
must be one GGML knows, its byte size must be what its shape and type make, its data must lie inside the file
without overlapping another's, names are unique. A file that fails any of these is refused with one error naming
it. The output has the same key-value metadata, tensor names, order and shapes; untouched tensors are copied byte
for byte; a touched tensor is dequantized (gguf-py, fp32), fused with the one formula
(:func:`lorablend.runtime.fusion.fused_weight`, row blocks of a fused q/k/v as in the safetensors bake) and
requantized into its own type (a K-quant / IQ type into Q8_0: :func:`lorablend.quant.gguf.fused_quant_type`) —
the same two functions a live fuse on a GGUF layer uses, so the bytes are the same. Memory: one tensor at a time
(fp32) plus the LoRAs.

>>> bake_gguf(BakeJob(Path("flux-Q8_0.gguf"), ((Path("a.safetensors"), 0.7),), Path("out.gguf"), ()))  # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import LoraCompatibilityError, LoraFormatError
from ..io.safetensors import SafetensorsHeader, TensorEntry, read_tensor
from ..outputs import atomic_file
from .bake_steps import BakeJob, BakeOp, BakeReport, fused_tensor, lora_name
from .checkpoint import CheckpointLayout, checkpoint_layout

_FLOAT_CODES = {"F32": "F32", "F16": "F16", "BF16": "BF16"}


@dataclass
class GgufFile:
    """A checked GGUF file: gguf-py's reader, the tensors as header entries (torch shape order), the data start."""

    path: Path
    reader: Any
    header: SafetensorsHeader  # names, codes ("F32" … or the GGML type name), shapes: what checkpoint layouts read

    def tensor(self, name: str) -> Any:
        return self.reader.tensors[self._index[name]]

    def __post_init__(self) -> None:
        self._index = {t.name: i for i, t in enumerate(self.reader.tensors)}


# GGUF value types: their byte sizes (scalars), 8 = string, 9 = array
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _prescan(path: Path, size: int) -> None:
    """Walk the header's counts and lengths (key-values, tensor infos) without trusting them: each must fit in the
    bytes left, so no count can make a reader loop longer than the file is long. Raises ``LoraFormatError``."""
    import mmap
    import struct

    def refuse(why: str) -> LoraFormatError:
        return LoraFormatError(f"{path}: not a valid GGUF file ({why}); re-download or re-convert it")

    with open(path, "rb") as f:
        if size < 24 or f.read(4) != b"GGUF":
            raise refuse("no GGUF magic")
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
        if version not in (2, 3) or n_kv > size // 12 or n_tensors > size // 24:
            raise refuse(f"version {version}, {n_kv} key-values and {n_tensors} tensors in {size} bytes")
        at = 24

        def take(n: int) -> int:
            nonlocal at
            if n < 0 or at + n > size:
                raise refuse(f"a length at byte {at} runs past the end")
            at += n
            return at - n

        def u(fmt: str) -> int:
            return struct.unpack_from(fmt, data, take(struct.calcsize(fmt)))[0]

        def value(vtype: int, depth: int = 0) -> None:
            if vtype in _SCALAR_SIZES:
                take(_SCALAR_SIZES[vtype])
            elif vtype == 8:
                take(u("<Q"))
            elif vtype == 9 and depth == 0:
                sub, count = u("<I"), u("<Q")
                least = _SCALAR_SIZES.get(sub, 8)
                if count > (size - at) // least:
                    raise refuse(f"an array of {count} values in {size - at} bytes")
                if sub in _SCALAR_SIZES:
                    take(count * least)
                else:
                    for _ in range(count):
                        value(sub, depth + 1)
            else:
                raise refuse(f"value type {vtype} at byte {at}")

        for _ in range(n_kv):
            take(u("<Q"))
            value(u("<I"))
        for _ in range(n_tensors):
            take(u("<Q"))
            n_dims = u("<I")
            if n_dims > 4:
                raise refuse(f"a tensor of {n_dims} dimensions")
            take(8 * n_dims + 12)
    except struct.error:
        raise refuse("cut off inside its header") from None
    finally:
        data.close()


def read_gguf(path: str | os.PathLike) -> GgufFile:
    """Open and check a GGUF file; raise ``LoraFormatError`` naming it and the rule it breaks.

    >>> read_gguf("flux1-dev-Q8_0.gguf").header.by_name["img_in.weight"].dtype     # doctest: +SKIP
    'Q8_0'
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    path = Path(path)
    size = path.stat().st_size
    _prescan(path, size)  # (gguf-py loops over whatever counts the file claims: bound them by its size first)
    try:
        reader = GGUFReader(path)
        tensors = list(reader.tensors)
    except Exception as e:  # gguf-py raises what numpy and struct raise on a damaged file
        raise LoraFormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); re-download or "
                              "re-convert it") from None
    entries, spans = [], []
    for t in tensors:
        where = f"{path}: tensor {t.name!r}"
        try:
            qtype = GGMLQuantizationType(int(t.tensor_type))
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise LoraFormatError(f"{where} has an unknown GGML type {int(t.tensor_type)}") from None
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if not shape or min(shape) <= 0 or shape[-1] % block:
            raise LoraFormatError(f"{where} has shape {shape}, not whole {qtype.name} blocks of {block}")
        want = int(np.prod(shape, dtype=np.int64)) // block * type_size
        start = int(t.data_offset)
        if int(t.n_bytes) != want or start < 0 or start + want > size:
            raise LoraFormatError(f"{where} claims {int(t.n_bytes)} bytes at offset {start}; its shape and type make "
                                  f"{want}, and the file has {size} (a truncated or lying file)")
        spans.append((start, start + want, t.name))
        entries.append(TensorEntry(t.name, _FLOAT_CODES.get(qtype.name, qtype.name), shape, start, start + want))
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise LoraFormatError(f"{path}: a tensor name appears twice")
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise LoraFormatError(f"{path}: tensors {a!r} and {b!r} overlap (lying offsets)")
    return GgufFile(path, reader, SafetensorsHeader(path, 0, size, tuple(entries)))


def _plan(layout: CheckpointLayout, gguf: GgufFile, terms: dict, job: BakeJob, skipped: list) -> dict[str, list[BakeOp]]:
    """GGUF tensor name -> the fused regions in it; every problem found before any write."""
    ops: dict[str, list[BakeOp]] = {}
    problems = []
    for key, layer_terms in terms.items():
        placement = layout.placement(key)
        entry = None if placement is None else gguf.header.by_name.get(placement.weight_key)
        want = tuple(layout.view.index.modules[key].weight_shape)
        rows = None if placement is None else placement.row_spans
        have = None if entry is None else (entry.shape if rows is None else (sum(b - a for a, b in rows), *entry.shape[1:]))
        if entry is None or have != want or any(d.changes_bias for _, d in layer_terms):
            why = ("no tensor for it in the file" if entry is None else
                   f"{entry.name} holds {have}, the layer needs {want}" if have != want else
                   "a bias difference (not baked into GGUF files)")
            problems.append((key, why))
            continue
        ops.setdefault(placement.weight_key, []).append(BakeOp(placement, "weight", layer_terms))
    if problems and job.strict:
        lines = "; ".join(f"{k}: {why}" for k, why in problems[:3])
        raise LoraCompatibilityError(f"{len(problems)} LoRA layer(s) cannot be baked into {gguf.path.name}: {lines}. "
                                     "Nothing was written; pass strict=False to bake the layers that fit")
    skipped += [{"lora": "*", "key": k, "reason": why} for k, why in problems]
    if not ops:
        raise LoraCompatibilityError(f"no LoRA layer fits {gguf.path.name}; nothing was written")
    return ops


def _terms(job: BakeJob, layout: CheckpointLayout, skipped: list) -> tuple[dict, list]:
    """target key -> [(lora_scale·weight, delta)] in LoRA order, and what each LoRA touched."""
    from ..io import load_adapter
    from ..adapter import Adapter
    from ..runtime.binding import bind_adapter

    taken: set[str] = set()
    terms: dict[str, list] = {}
    infos = []
    for src, w in job.loras:
        name = lora_name(src, taken)
        adapter = src if isinstance(src, Adapter) else load_adapter(str(src), target=layout.view.components, name=name)
        bound = bind_adapter(adapter, layout.view, strict=job.strict)
        skipped += [{"lora": name, "key": r.key, "reason": r.reason or r.status}
                    for r in bound.report.records if r.status != "mapped"]
        for key, layer in bound.layers.items():
            terms.setdefault(key, []).append((job.lora_scale * w, layer.delta))
        infos.append({"source": str(src) if not isinstance(src, Adapter) else f"<Adapter {src.name}>",
                      "name": name, "weight": w, "layers": len(bound.layers)})
    return terms, infos


def _copy_fields(reader: Any, writer: Any) -> None:
    """Every key-value of the input (but the ones the writer sets itself) into the output, same types."""
    from gguf import GGUFValueType

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        main = field.types[0]
        sub = field.types[-1] if main == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), main, sub_type=sub)


def _fused_tensor(gguf: GgufFile, name: str, ops: list[BakeOp], safe: bool) -> tuple[np.ndarray, Any]:
    """One touched tensor: dequantized, fused (rows as the layout places them), requantized; (raw, GGML type)."""
    from gguf import GGMLQuantizationType

    from ..quant.gguf import dequantize_gguf, fused_quant_type, quantize_gguf

    t = gguf.tensor(name)
    qtype = GGMLQuantizationType(int(t.tensor_type))
    weight = torch.from_numpy(dequantize_gguf(np.asarray(t.data), qtype))
    fused = fused_tensor(weight, ops, torch.float32, safe)
    return quantize_gguf(fused.numpy(), qtype), fused_quant_type(qtype)


def bake_gguf(job: BakeJob) -> BakeReport:
    """Bake ``job.loras`` into the GGUF file ``job.model``, written to ``job.output`` (atomic, streamed)."""
    from gguf import GGUFWriter

    if job.dtype is not None:
        raise ValueError(f"{job.model}: dtype does not apply to a GGUF bake (each tensor keeps its GGML type)")
    gguf = read_gguf(job.model)
    layout = checkpoint_layout(job.model, gguf.header)
    skipped: list = []
    terms, infos = _terms(job, layout, skipped)
    ops = _plan(layout, gguf, terms, job, skipped)
    arch = gguf.reader.fields.get("general.architecture")
    with atomic_file(job.output, overwrite=job.overwrite, inputs=job.inputs) as tmp:
        writer = GGUFWriter(tmp, arch.contents() if arch is not None else "flux")
        _copy_fields(gguf.reader, writer)
        for t in gguf.reader.tensors:  # the tensor table first: every size is known without computing a tensor
            writer.add_tensor_info(t.name, *_info(t, t.name in ops))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in gguf.reader.tensors:
            data = _fused_tensor(gguf, t.name, ops[t.name], job.safe)[0] if t.name in ops else np.asarray(t.data)
            if data.nbytes != _info(t, t.name in ops)[2]:  # a bug, not bad input: never write a lying table
                raise RuntimeError(f"{t.name}: {data.nbytes} bytes computed, {_info(t, t.name in ops)[2]} announced")
            writer.write_tensor_data(data)
            del data
        writer.close()
    return BakeReport(str(job.model), str(job.output), "gguf", layout.family, job.lora_scale, None, infos,
                      tensors=len(gguf.reader.tensors),
                      touched=len({o.placement.target_key for v in ops.values() for o in v}),
                      bytes=Path(job.output).stat().st_size, skipped=skipped)


def _info(t: Any, fused: bool) -> tuple[list[int], np.dtype, int, Any]:
    """``(shape, numpy dtype, bytes, GGML type)`` of an output tensor as gguf-py's writer takes them: the input's
    own array for an untouched tensor; for a fused one, its type after requantizing (float types: elements in
    numpy order; block types: rows × bytes per row, uint8)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from ..quant.gguf import fused_quant_type

    if not fused:
        data = np.asarray(t.data)
        return list(data.shape), data.dtype, int(data.nbytes), t.tensor_type
    qtype = fused_quant_type(t.tensor_type)
    shape = [int(d) for d in reversed(t.shape.tolist())]
    floats = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
    if qtype in floats:
        dtype = np.dtype(floats[qtype])
        return shape, dtype, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, qtype
    block, type_size = GGML_QUANT_SIZES[qtype]
    raw = [*shape[:-1], shape[-1] // block * type_size]
    return raw, np.dtype(np.uint8), int(np.prod(raw, dtype=np.int64)), qtype


def fused_fp8(tensor: torch.Tensor, ops: list[BakeOp], scale: torch.Tensor | None,
              safe: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A touched fp8 tensor of a safetensors bake and its scale: each op's rows dequantized (``× scale_weight`` when
    the file is scaled fp8), fused in fp32 by the one formula, divided by the scale and rounded stochastically with
    the generator a live fuse of that layer uses (``quant.formats.layer_seed(0, target key)``). A scale grows to
    ``max|W| / fp8 max`` when a fused weight outgrows it and the tensor is one layer (as a live fuse does); a
    tensor of several layers (q/k/v rows) keeps its scale (the other rows' bytes stay) and saturates instead.

    >>> fused_fp8(torch.zeros(2, 2, dtype=torch.float8_e4m3fn), [], None, True)[0].dtype
    torch.float8_e4m3fn
    """
    from ..quant.formats import layer_seed
    from ..quant.fp8 import stochastic_round
    from ..runtime.fusion import fused_weight

    result = tensor.clone()
    weight = tensor.float() * scale.float() if scale is not None else tensor.float()
    fused = []
    for op in ops:
        spans = op.placement.row_spans or ((0, tensor.shape[0]),)
        rows = torch.cat([torch.arange(a, b) for a, b in spans])
        fused.append((op, rows, fused_weight(weight[rows], op.terms, out_dtype=torch.float32, safe=safe,
                                             key=op.placement.target_key)))
    if scale is not None and len(ops) == 1 and ops[0].placement.row_spans is None:  # one layer: grow as live does
        peak = fused[0][2].abs().max() / torch.finfo(tensor.dtype).max
        scale = torch.maximum(scale.float(), peak).to(scale.dtype).reshape(scale.shape)
    for op, rows, w in fused:
        w = w / scale.float() if scale is not None else w
        generator = torch.Generator().manual_seed(layer_seed(0, op.placement.target_key))
        result.view(torch.uint8)[rows] = stochastic_round(w, tensor.dtype, generator).view(torch.uint8)
    return result, scale


class Fp8Rewrites:
    """The fp8 tensors a safetensors bake rewrites: each touched fp8 weight and, in a scaled-fp8 file, its
    ``scale_weight`` (which may grow). Whichever of the two the stream meets first computes both; the other waits
    here (one tensor: a layer's scale and weight are neighbours in a safetensors file's order)."""

    def __init__(self, raw: Any, header: SafetensorsHeader, ops: dict[str, list[BakeOp]], safe: bool) -> None:
        self.raw, self.header, self.ops, self.safe = raw, header, ops, safe
        weights = [n for n in ops if header.by_name[n].dtype in ("F8_E4M3", "F8_E5M2") and n.endswith("weight")]
        self.pair = {n: n[: -len("weight")] + "scale_weight" for n in weights}
        self.pair = {w: (s if s in header.by_name else None) for w, s in self.pair.items()}
        self.weight_of = {s: w for w, s in self.pair.items() if s is not None}
        self.ready: dict[str, torch.Tensor] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.pair or name in self.weight_of

    def tensor(self, name: str, stored: torch.Tensor) -> torch.Tensor:
        """The output tensor of ``name`` (``stored``: its bytes in the input)."""
        if name in self.ready:
            return self.ready.pop(name)
        weight_name = self.weight_of.get(name, name)
        scale_name = self.pair[weight_name]
        read = lambda n: read_tensor(self.raw, self.header, self.header.by_name[n])  # noqa: E731
        weight = stored if name == weight_name else read(weight_name)
        scale = None if scale_name is None else (stored if name == scale_name else read(scale_name))
        fused, new_scale = fused_fp8(weight, self.ops[weight_name], scale, self.safe)
        if scale_name is not None:
            self.ready[scale_name if name == weight_name else weight_name] = (
                new_scale if name == weight_name else fused)
        return fused if name == weight_name else new_scale


__all__ = ["Fp8Rewrites", "GgufFile", "bake_gguf", "fused_fp8", "read_gguf"]
