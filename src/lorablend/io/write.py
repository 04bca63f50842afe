"""Write an Adapter as a LoRA file that diffusers, ComfyUI and A1111 load.

Three formats (see ``write_diffusers.py``, ``write_kohya.py`` and ``write_original.py`` for the key layouts):

* ``"diffusers"``: PEFT ``lora_A`` / ``lora_B`` keys plus diffusers' ``lora_adapter_metadata`` header, what
  ``pipe.load_lora_weights`` reads with alpha applied per module. Low-rank layers only.
* ``"kohya"``: ``lora_unet_…`` / ``lora_te…`` keys with ``lora_down`` / ``lora_up`` / ``alpha`` and the LyCORIS
  keys (``hada_*``, ``lokr_*``, ``diff``, ``dora_scale``, ``lora_mid``); every Delta kind fits, losslessly. For a
  Flux / SD3 transformer: kohya sd-scripts' names, BFL / SAI originals (``lora_unet_double_blocks_0_img_attn_qkv``),
  the q / k / v (/ mlp) modules of a fused layer written as ONE LoRA over its rows (``write_original.py``).
* ``"ai-toolkit"`` (Flux / SD3 only): ComfyUI's layout, ``diffusion_model.<BFL / SAI name>.lora_A.weight`` /
  ``lora_B.weight`` / ``alpha``, fused layers as for kohya.
* ``"onetrainer"``: kohya's tensor names with one module each (a transformer as ``lora_transformer_<diffusers
  path>``, OneTrainer's Flux names): every Delta kind on every module, losslessly — where a LoHa / LoKr / DoRA on
  part of a fused layer has no BFL spelling. For a UNet family it is the kohya file.

Both carry the adapter's metadata and an ``sshs_model_hash`` equal to the sha256 of the file's own data
section (what kohya and A1111 compute). The bytes come from ``io/safetensors.py`` (the one writer); the file is
written by ``lorablend.outputs`` (atomic; an existing file replaced only with ``overwrite=True``; the file an
adapter was read from never overwritten).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..adapter import Adapter
from ..naming import ModuleIndex, module_index
from ..outputs import OutputExistsError, atomic_write, check_output, refuse_input
from .safetensors import serialize
from .write_diffusers import diffusers_state_dict
from .write_kohya import kohya_metadata, kohya_state_dict
from .write_original import original_state_dict

logger = logging.getLogger(__name__)

WRITE_FORMATS = ("diffusers", "kohya", "ai-toolkit", "onetrainer")  # the formats save_adapter writes
FORMATS = WRITE_FORMATS  # the old name, kept for callers that import it
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name load_lora_weights looks for in a folder
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
# Keys that describe a kohya network; in a diffusers file they would describe something that is not there.
_KOHYA_ONLY = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")


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


def naming_index(adapter: Adapter, target: Any = None) -> ModuleIndex:
    """The module index names are written against: ``target``'s when given, else the family's standard model.

    Checks that every layer fits the index's module of that name, so an adapter made for a non-standard model
    (a tiny test pipeline, say) is not silently written under the standard model's names.
    """
    if isinstance(target, str):  # a family's name: its standard model
        target = None if target == adapter.family else _other_family(adapter, target)
    index = module_index(target, family=adapter.family) if target is not None else module_index(family=adapter.family)
    for key, delta in adapter.deltas.items():
        info = index.modules.get(key)
        out = delta.out_features
        if info is not None and out is not None and out != info.weight_shape[0]:
            where = "the target model" if target is not None else f"the standard {adapter.family} model"
            raise ValueError(
                f"layer {key!r} of adapter {adapter.name!r} has {out} output features but that layer of {where} "
                f"has {info.weight_shape[0]} (weight {info.weight_shape}); the adapter was made for another model. "
                f"Pass target=<the pipeline or model it was made for> to save_adapter"
            )
    return index


def _other_family(adapter: Adapter, family: str) -> None:
    raise ValueError(f"target={family!r}: adapter {adapter.name!r} is {adapter.family}; name its own family or pass "
                     f"the pipeline it was made for")


def _written_network(meta: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """ss_network_dim / alpha as written: a fused layer's LoRA may have another rank than its modules had."""
    pairs = [(int(t.shape[0]), float(tensors[k[: -len("lora_down.weight")] + "alpha"]))
             for k, t in tensors.items() if k.endswith(".lora_down.weight") and k[: -len("lora_down.weight")] + "alpha" in tensors]
    if pairs and "ss_network_dim" in meta:
        rank, alpha = max(set(pairs), key=pairs.count)
        meta["ss_network_dim"], meta["ss_network_alpha"] = str(rank), str(alpha)
    return meta


def _plain_metadata(adapter: Adapter) -> dict[str, Any]:
    """The adapter's own metadata for a file that is neither kohya's nor diffusers' (stale hashes dropped)."""
    meta = {k: v for k, v in adapter.metadata.items() if k not in (*_KOHYA_ONLY, LORA_ADAPTER_METADATA_KEY)}
    meta["format"] = "pt"
    return meta


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
    if format not in WRITE_FORMATS:
        raise ValueError(f"format must be one of {WRITE_FORMATS}, got {format!r}")
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

    if format == "ai-toolkit" or (format == "kohya" and index.source_names()):
        if not index.source_names():
            raise ValueError(f"format='ai-toolkit' names a transformer (Flux, SD3, Qwen-Image, Wan, Flux.2, Z-Image, "
                             f"Chroma); adapter {adapter.name!r} is "
                             f"{adapter.family}: save it with format='kohya' or 'diffusers'")
        tensors = original_state_dict(adapter, index, "kohya" if format == "kohya" else "ai-toolkit", progress=bar)
        meta = _written_network(kohya_metadata(adapter, index), tensors) if format == "kohya" else _plain_metadata(adapter)
    elif format in ("kohya", "onetrainer"):
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


def serialize_with_hash(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[bytes, list[memoryview]]:
    """``(header, data chunks)`` of a safetensors file whose header holds ``sshs_model_hash`` of its own data section.

    >>> header, chunks = serialize_with_hash({"x": torch.zeros(2)}, {})
    >>> b'"sshs_model_hash"' in header
    True
    """
    return serialize(tensors, metadata, data_hash_key="sshs_model_hash")


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


def _sources(adapter: Adapter) -> list[str]:
    source = adapter.report.source if adapter.report is not None else ""
    return [] if not source or source.startswith("<") else [source]


def refuse_input_overwrite(adapter: Adapter, out: Path) -> None:
    """An input is never overwritten, even with ``overwrite=True``: a bug or a crash would lose the original.

    >>> from lorablend.adapter import Adapter
    >>> refuse_input_overwrite(Adapter("a", "sd1", {}), Path("new.safetensors"))  # no source file: nothing to refuse
    """
    refuse_input(out, _sources(adapter), what=f"the file adapter {adapter.name!r} was read from")


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
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``adapter`` to a ``.safetensors`` file (or ``pytorch_lora_weights.safetensors`` in a folder).

    ``format="diffusers"`` is what ``pipe.load_lora_weights`` reads (low-rank layers only; alpha in the
    ``lora_adapter_metadata`` header); ``format="kohya"`` is what A1111 / ComfyUI read and holds every Delta kind.
    ``dtype`` casts the weights (alpha keeps full precision); ``metadata`` adds or overrides header entries;
    ``target`` (a pipeline or model) names layers of a non-standard model. ``extra_tensors`` are written beside
    the adapter's, as they are (``convert`` keeps the keys it could not place this way); a key the adapter also
    writes is refused. Returns the path written.

    >>> import lorablend
    >>> adapter = lorablend.load_adapter("style.safetensors")                         # doctest: +SKIP
    >>> lorablend.save_adapter(adapter, "style_kohya.safetensors", format="kohya")     # doctest: +SKIP
    PosixPath('style_kohya.safetensors')
    """
    if format not in WRITE_FORMATS:
        raise ValueError(f"format must be one of {WRITE_FORMATS}, got {format!r}")
    out = output_path(path, format, adapter.name)
    refuse_input_overwrite(adapter, out)
    check_output(out, overwrite=overwrite)  # before the work: a typo fails at once
    tensors, meta = adapter_state_dict(
        adapter, format, dtype=dtype, metadata=metadata, target=target, progress=progress
    )
    clash = sorted(set(tensors) & set(extra_tensors or {}))
    if clash:
        raise ValueError(f"{out}: extra_tensors {clash[:3]} are keys the adapter writes too; drop them or rename them")
    tensors.update(extra_tensors or {})
    header, chunks = serialize_with_hash(tensors, meta)
    atomic_write(out, [header, *chunks], overwrite=overwrite, inputs=_sources(adapter))
    size = len(header) + sum(c.nbytes for c in chunks)
    logger.info("wrote %s (%s format, %d layers, %d bytes)", out, format, len(adapter.deltas), size)
    return out


__all__ = [
    "FORMATS",
    "WRITE_FORMATS",
    "OutputExistsError",
    "save_adapter",
    "adapter_state_dict",
    "serialize_with_hash",
    "atomic_write",
    "output_path",
    "parse_dtype",
]
