"""Write an Adapter as a LoRA file that diffusers, ComfyUI and A1111 load.

Two formats (see ``write_diffusers.py`` and ``write_kohya.py`` for the key layouts):

* ``"diffusers"``: PEFT ``lora_A`` / ``lora_B`` keys plus diffusers' ``lora_adapter_metadata`` header, what
  ``pipe.load_lora_weights`` reads with alpha applied per module. Low-rank layers only.
* ``"kohya"``: ``lora_unet_…`` / ``lora_te…`` keys with ``lora_down`` / ``lora_up`` / ``alpha`` and the LyCORIS
  keys (``hada_*``, ``lokr_*``, ``diff``, ``dora_scale``, ``lora_mid``); every Delta kind fits, losslessly.

Both carry the adapter's metadata and an ``sshs_model_hash`` equal to the sha256 of the file's own data
section (what kohya and A1111 compute). Files are written to a temp file in the destination folder and renamed,
so a failure never leaves a partial file; an existing file is replaced only with ``overwrite=True``; the file
an adapter was read from is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from contextlib import suppress
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors.torch import save as _serialize

from ..adapter import Adapter, Delta, DoRADelta, FullDelta, LoHaDelta, LoKrDelta, LowRankDelta
from ..naming import ModuleIndex, module_index
from .write_diffusers import diffusers_state_dict
from .write_kohya import kohya_metadata, kohya_state_dict

logger = logging.getLogger(__name__)

FORMATS = ("diffusers", "kohya")
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name load_lora_weights looks for in a folder
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
# Keys that describe a kohya network; in a diffusers file they would describe something that is not there.
_KOHYA_ONLY = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")


class OutputExistsError(FileExistsError, ValueError):
    """The output file exists and ``overwrite`` was not given (a ``ValueError`` and a ``FileExistsError``)."""


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``None``, a torch float dtype, or one of ``fp32`` / ``fp16`` / ``bf16`` (and their long names).

    >>> parse_dtype("bf16")
    torch.bfloat16
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16")
    return _DTYPES[key]


def _out_features(delta: Delta) -> int | None:
    """The output width a Delta was made for, read from its factors (no dense ΔW)."""
    if isinstance(delta, DoRADelta):
        return _out_features(delta.inner)
    if isinstance(delta, LowRankDelta):
        return int(delta.up.shape[0])
    if isinstance(delta, LoHaDelta):
        return int(delta.w1_a.shape[1] if delta.t1 is not None else delta.w1_a.shape[0])
    if isinstance(delta, LoKrDelta):
        rows1 = (delta.w1 if delta.w1 is not None else delta.w1_a).shape[0]
        if delta.w2 is not None:
            rows2 = delta.w2.shape[0]
        else:
            rows2 = delta.w2_a.shape[1] if delta.t2 is not None else delta.w2_a.shape[0]
        return int(rows1 * rows2)
    if isinstance(delta, FullDelta):
        return int(delta.diff.shape[0])
    return None


def naming_index(adapter: Adapter, target: Any = None) -> ModuleIndex:
    """The module index names are written against: ``target``'s when given, else the family's standard model.

    Checks that every layer fits the index's module of that name, so an adapter made for a non-standard model
    (a tiny test pipeline, say) is not silently written under the standard model's names.
    """
    index = module_index(target, family=adapter.family) if target is not None else module_index(family=adapter.family)
    for key, delta in adapter.deltas.items():
        info = index.modules.get(key)
        out = _out_features(delta)
        if info is not None and out is not None and out != info.weight_shape[0]:
            where = "the target model" if target is not None else f"the standard {adapter.family} model"
            raise ValueError(
                f"layer {key!r} of adapter {adapter.name!r} has {out} output features but that layer of {where} "
                f"has {info.weight_shape[0]} (weight {info.weight_shape}); the adapter was made for another model. "
                f"Pass target=<the pipeline or model it was made for> to save_adapter"
            )
    return index


def _text_metadata(values: Mapping[str, Any]) -> dict[str, str]:
    """safetensors metadata is str -> str: keep strings, JSON-encode anything else."""
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


def adapter_state_dict(
    adapter: Adapter,
    format: str = "diffusers",
    *,
    dtype: torch.dtype | str | None = None,
    metadata: Mapping[str, Any] | None = None,
    target: Any = None,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header metadata :func:`save_adapter` would write (no hash; nothing touches the disk).

    >>> tensors, meta = adapter_state_dict(adapter, "kohya")                # doctest: +SKIP
    >>> meta["ss_network_module"]                                          # doctest: +SKIP
    'networks.lora'
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if not adapter.deltas:
        raise ValueError(f"adapter {adapter.name!r} has no layers; there is nothing to write")
    cast = parse_dtype(dtype)
    index = naming_index(adapter, target)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        def bar(items: Iterable) -> Iterable:
            # disable=None: a bar on a terminal only, never in logs or pipes
            return tqdm(items, total=len(adapter.deltas), desc=f"writing {format}", unit="layer", disable=None)

    if format == "kohya":
        tensors = kohya_state_dict(adapter, index, progress=bar)
        meta = kohya_metadata(adapter, index)
    else:
        tensors, lora_config = diffusers_state_dict(adapter, index, progress=bar)
        meta = {k: v for k, v in adapter.metadata.items() if k not in _KOHYA_ONLY}
        meta.pop("sshs_legacy_hash", None)
        meta["format"] = "pt"
        meta[LORA_ADAPTER_METADATA_KEY] = json.dumps(lora_config, indent=2, sort_keys=True)
    meta = _text_metadata(meta)
    if metadata:
        user = _text_metadata(metadata)
        if format == "diffusers" and LORA_ADAPTER_METADATA_KEY in user:
            raise ValueError(
                f"metadata may not set {LORA_ADAPTER_METADATA_KEY!r}: lorablend writes it from the layers so that "
                f"diffusers applies the right alpha/rank; set per-layer alphas on the adapter instead"
            )
        meta.update(user)
    meta.pop("sshs_model_hash", None)  # always recomputed from the bytes written
    meta.pop("sshs_legacy_hash", None)
    return _prepare_tensors(tensors, cast, adapter.name), meta


def _prepare_tensors(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None, name: str) -> dict[str, torch.Tensor]:
    """CPU, contiguous, cast, finite, and no two entries sharing storage (safetensors refuses shared tensors)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in tensors.items():
        t = t.detach()
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"adapter {name!r}: tensor {key!r} holds NaN or Inf; refusing to write a broken file")
        # alpha stays in the precision chosen for it (fp32/fp64): it is one number and sets every layer's scale.
        if dtype is not None and t.is_floating_point() and t.dim() > 0:
            t = t.to(dtype)
        t = t.to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[key] = t
    return out


def serialize_with_hash(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[bytes, memoryview]:
    """``(header, data)`` of a safetensors file whose header holds ``sshs_model_hash`` of its own data section.

    The data section does not depend on the metadata, so it is serialized once, hashed, and the hash is put
    into the header (re-encoded and padded with spaces to 8 bytes, as safetensors does).
    """
    blob = _serialize(tensors, metadata=dict(metadata) or None)
    n = int.from_bytes(blob[:8], "little")
    data = memoryview(blob)[8 + n:]
    parsed = json.loads(blob[8:8 + n])
    meta = dict(parsed.pop("__metadata__", None) or {})
    meta["sshs_model_hash"] = hashlib.sha256(data).hexdigest()
    # safetensors keeps metadata in a hash map whose order varies from run to run; sorting makes the same
    # adapter give the same bytes every time (tensor entries in data order, as safetensors lays them out).
    header = {"__metadata__": dict(sorted(meta.items()))}
    header.update(sorted(parsed.items(), key=lambda kv: kv[1]["data_offsets"]))
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded, data


def output_path(path: str | os.PathLike, format: str, adapter_name: str = "lora") -> Path:
    """Where :func:`save_adapter` writes: ``path`` itself, or a standard file name inside an existing folder."""
    out = Path(path)
    if out.is_dir():
        name = DIFFUSERS_WEIGHT_NAME if format == "diffusers" else f"{_safe_stem(adapter_name)}.safetensors"
        return out / name
    if out.suffix.lower() != ".safetensors":
        raise ValueError(
            f"{out}: lorablend writes .safetensors files only (no pickles); name the output "
            f"{out.with_suffix('.safetensors').name} or pass an existing folder"
        )
    return out


def _safe_stem(name: str) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")
    return stem or "lora"


def _is_source_of(adapter: Adapter, out: Path) -> bool:
    source = adapter.report.source if adapter.report is not None else ""
    if not source or source.startswith("<") or not out.exists():
        return False
    with suppress(OSError):
        return Path(source).is_file() and out.samefile(source)
    return False


def refuse_input_overwrite(adapter: Adapter, out: Path) -> None:
    """An input is never overwritten, even with ``overwrite=True``: a bug or a crash would lose the original."""
    if _is_source_of(adapter, out):
        raise ValueError(
            f"{out}: refusing to overwrite the file adapter {adapter.name!r} was read from; write to a new path"
        )


def _write_chunks(f, chunks: Iterable[bytes | memoryview]) -> None:
    for chunk in chunks:
        f.write(chunk)


def atomic_write(out: Path, chunks: Iterable[bytes | memoryview], *, overwrite: bool = False) -> None:
    """Write ``chunks`` to ``out`` through a temp file in the same folder; nothing partial is ever left behind.

    Without ``overwrite`` the final step is a hard link, which fails if ``out`` appeared meanwhile, so an
    existing file is never clobbered even by a race.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(6)}.tmp"
    # os.open with 0o666 lets the umask decide the final permissions, as for any new file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_chunks(f, chunks)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, out)
        else:
            try:
                os.link(tmp, out)
            except FileExistsError:
                raise OutputExistsError(f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it") from None
            except OSError:  # a file system without hard links: check, then rename
                if out.exists():
                    raise OutputExistsError(f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it")
                os.replace(tmp, out)
    finally:
        with suppress(FileNotFoundError):
            os.unlink(tmp)


def save_adapter(
    adapter: Adapter,
    path: str | os.PathLike,
    format: str = "diffusers",
    *,
    overwrite: bool = False,
    dtype: torch.dtype | str | None = None,
    metadata: Mapping[str, Any] | None = None,
    target: Any = None,
    progress: bool = False,
) -> Path:
    """Write ``adapter`` to a ``.safetensors`` file (or ``pytorch_lora_weights.safetensors`` in a folder).

    ``format="diffusers"`` is what ``pipe.load_lora_weights`` reads (low-rank layers only; alpha in the
    ``lora_adapter_metadata`` header); ``format="kohya"`` is what A1111 / ComfyUI read and holds every Delta kind.
    ``dtype`` casts the weights (alpha keeps full precision); ``metadata`` adds or overrides header entries;
    ``target`` (a pipeline or model) names layers of a non-standard model. Returns the path written.

    >>> import lorablend
    >>> adapter = lorablend.load_adapter("style.safetensors")                         # doctest: +SKIP
    >>> lorablend.save_adapter(adapter, "style_kohya.safetensors", format="kohya")     # doctest: +SKIP
    PosixPath('style_kohya.safetensors')
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    out = output_path(path, format, adapter.name)
    refuse_input_overwrite(adapter, out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    tensors, meta = adapter_state_dict(
        adapter, format, dtype=dtype, metadata=metadata, target=target, progress=progress
    )
    header, data = serialize_with_hash(tensors, meta)
    atomic_write(out, (header, data), overwrite=overwrite)
    logger.info("wrote %s (%s format, %d layers, %d bytes)", out, format, len(adapter.deltas), len(header) + len(data))
    return out


__all__ = [
    "FORMATS",
    "OutputExistsError",
    "save_adapter",
    "adapter_state_dict",
    "serialize_with_hash",
    "atomic_write",
    "output_path",
    "parse_dtype",
]
