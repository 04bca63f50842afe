"""Adapter -> kohya / LyCORIS state dict and ``ss_*`` / ``modelspec.*`` metadata (what A1111 and ComfyUI load).

Module names are the ones kohya's trainers write: ``lora_unet_`` + diffusers names for SD1.x/SD2.x,
``lora_unet_`` + SGM names (``input_blocks_4_1_…``) for SDXL, ``lora_te_`` (SD1.x/SD2.x) or
``lora_te1_`` / ``lora_te2_`` (SDXL) + Hugging Face CLIP names. Names come from the module index (built from
the real module tree), never from string guessing. Tensor suffixes per Delta kind:

============  ==========================================================================
LoRA/LoCon    ``lora_down.weight``, ``lora_up.weight``, ``lora_mid.weight`` (Tucker), ``alpha``
LoHa          ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``, ``hada_t1``, ``hada_t2``, ``alpha``
LoKr          ``lokr_w1`` | ``lokr_w1_a``+``lokr_w1_b``, ``lokr_w2`` | ``lokr_w2_a``+``lokr_w2_b``, ``lokr_t2``, ``alpha``
full          ``diff``, ``diff_b``
DoRA          the inner kind's keys + ``dora_scale`` ((out, 1, …) or (1, in, …), the axis it came with)
============  ==========================================================================

>>> import torch
>>> from lorablend import Adapter, LowRankDelta
>>> a = Adapter("x", "sd1", {"unet.mid_block.attentions.0.proj_in":
...                          LowRankDelta(torch.zeros(4, 1280), torch.zeros(1280, 4), alpha=2.0)})
>>> sorted(kohya_state_dict(a))                                             # doctest: +SKIP
['lora_unet_mid_block_attentions_0_proj_in.alpha', 'lora_unet_mid_block_attentions_0_proj_in.lora_down.weight', …]
"""

from __future__ import annotations

import collections
import json
import math
from typing import Any, Callable, Iterable

import torch

from ..adapter import Adapter, Delta, DoRADelta, FullDelta, LoHaDelta, LoKrDelta, LowRankDelta
from ..naming import ModuleIndex

# kohya's ss_base_model_version values and the SAI model-spec architecture ids (sd-scripts sai_model_spec.py).
_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
_ARCHITECTURE = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}
_RESOLUTION = {"sd1": "512x512", "sd2": "512x512", "sdxl": "1024x1024"}
# sd-scripts: SDXL LoRAs are "implemented" by SGM (their names are SGM names), SD1/SD2 ones by diffusers.
_IMPLEMENTATION = {
    "sd1": "diffusers",
    "sd2": "diffusers",
    "sdxl": "https://github.com/Stability-AI/generative-models",
}


def alpha_tensor(alpha: float) -> torch.Tensor:
    """A 0-d alpha tensor: fp32 when that holds the value exactly, else fp64, so the scale survives a round trip.

    >>> alpha_tensor(4.0).dtype, alpha_tensor(0.1).dtype
    (torch.float32, torch.float64)
    """
    t32 = torch.tensor(float(alpha), dtype=torch.float32)
    if float(t32) == float(alpha):
        return t32
    return torch.tensor(float(alpha), dtype=torch.float64)


def written_alpha(delta: Any) -> float | None:
    """The alpha to store: ``None`` stays absent (scale 1 everywhere); alpha 0 is stored as ``rank`` because
    lorablend and kohya read 0 as scale 1 but ComfyUI reads it as scale 0 — storing ``rank`` means the same
    to every loader."""
    alpha = getattr(delta, "alpha", None)
    if alpha is None:
        return None
    if float(alpha) == 0.0:
        return float(delta.rank) if delta.rank else None
    return float(alpha)


def _magnitude_for_kohya(delta: DoRADelta, weight_shape: tuple[int, ...] | None) -> torch.Tensor:
    """``dora_scale`` as LyCORIS stores it: (out, 1, …) for per-output-row norms, (1, in, …) for per-input ones."""
    mag = delta.magnitude
    if weight_shape is None:
        if mag.dim() >= 2:
            return mag
        # No module shape known: a flat PEFT-style vector is per output row of a linear layer.
        return mag.reshape(-1, 1) if delta.axis == "out" else mag.reshape(1, -1)
    ones = [1] * (len(weight_shape) - 2)
    if delta.axis == "out":
        return mag.reshape(weight_shape[0], 1, *ones)
    # per input column the norm also runs over the kernel (A1111 / LyCORIS): one value per input channel
    return mag.reshape(1, weight_shape[1], *ones)


def module_shaped(
    down: torch.Tensor, up: torch.Tensor, weight_shape: tuple[int, ...] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors with the dims the module's own layer would have: 4-D ``(r, in, kh, kw)`` / ``(out, r, 1, 1)``
    for a Conv2d, 2-D for a Linear. A1111 copies factors into real Conv2d/Linear layers, so 2-D factors of a 1x1
    conv (as some converters write them) would not load there. Element order is unchanged."""
    if weight_shape is None or down.shape[0] * math.prod(weight_shape[1:]) != down.numel():
        return down, up
    if len(weight_shape) == 4:
        return down.reshape(down.shape[0], *weight_shape[1:]), up.reshape(up.shape[0], -1, 1, 1)
    return down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)


def _delta_tensors(delta: Delta, weight_shape: tuple[int, ...] | None) -> Iterable[tuple[str, torch.Tensor]]:
    if isinstance(delta, DoRADelta):
        yield from _delta_tensors(delta.inner, weight_shape)
        yield "dora_scale", _magnitude_for_kohya(delta, weight_shape)
        return
    if isinstance(delta, LowRankDelta):
        if delta.mid is None:
            down, up = module_shaped(delta.down, delta.up, weight_shape)
        else:
            down, up = delta.down, delta.up
        yield "lora_down.weight", down
        yield "lora_up.weight", up
        if delta.mid is not None:
            yield "lora_mid.weight", delta.mid
    elif isinstance(delta, LoHaDelta):
        names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
        values = (delta.w1_a, delta.w1_b, delta.w2_a, delta.w2_b, delta.t1, delta.t2)
        yield from ((n, v) for n, v in zip(names, values) if v is not None)
    elif isinstance(delta, LoKrDelta):
        names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        values = (delta.w1, delta.w1_a, delta.w1_b, delta.w2, delta.w2_a, delta.w2_b, delta.t2)
        yield from ((n, v) for n, v in zip(names, values) if v is not None)
    elif isinstance(delta, FullDelta):
        yield "diff", delta.diff
        if delta.diff_b is not None:
            yield "diff_b", delta.diff_b
        return  # a full diff has no alpha
    else:  # pragma: no cover - a new Delta kind must be taught to the writer
        raise TypeError(f"the kohya writer does not know Delta kind {type(delta).__name__}")
    alpha = written_alpha(delta)
    if alpha is not None:
        yield "alpha", alpha_tensor(alpha)


def kohya_module_name(index: ModuleIndex, target_key: str) -> str:
    """The kohya name of one target key, or a ValueError that says how to fix it."""
    if target_key not in index.modules:
        raise ValueError(
            f"cannot name {target_key!r} in kohya format: the {index.family} module index has no such layer. "
            f"If the adapter was made for a non-standard model, pass target=<that pipeline or model> to save_adapter"
        )
    return index.kohya_name(target_key)


def kohya_state_dict(
    adapter: Adapter, index: ModuleIndex, progress: Callable[[Iterable], Iterable] | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of ``adapter`` under kohya / LyCORIS names (tensors as stored, not copied or cast)."""
    out: dict[str, torch.Tensor] = {}
    items: Iterable = adapter.deltas.items()
    if progress is not None:
        items = progress(items)
    for target_key, delta in items:
        name = kohya_module_name(index, target_key)
        shape = index.modules[target_key].weight_shape
        for suffix, tensor in _delta_tensors(delta, shape):
            key = f"{name}.{suffix}"
            if key in out:
                raise ValueError(f"two target keys map to the kohya name {name!r}; the adapter has duplicate layers")
            out[key] = tensor
    return out


def _most_common(values: list) -> Any:
    return collections.Counter(values).most_common(1)[0][0] if values else None


def _fmt_alpha(alpha: float) -> str:
    return str(float(alpha))


def _network_summary(adapter: Adapter, index: ModuleIndex) -> dict[str, str]:
    """ss_network_module / dim / alpha / args describing what is written (not what the source once was)."""
    inner_kinds = [d.inner.kind if isinstance(d, DoRADelta) else d.kind for d in adapter.deltas.values()]
    plain = all(isinstance(d, LowRankDelta) and d.mid is None for d in adapter.deltas.values())
    module = "networks.lora" if plain else "lycoris.kohya"
    linear, conv = [], []
    for key, d in adapter.deltas.items():
        rank = d.rank
        if rank is None:
            continue
        alpha = written_alpha(d)
        entry = (int(rank), float(alpha) if alpha is not None else float(rank))
        info = index.modules.get(key)
        (conv if info is not None and info.kind == "conv" and len(info.weight_shape) == 4
         and info.weight_shape[2:] != (1, 1) else linear).append(entry)
    main = _most_common(linear) or _most_common(conv)
    out: dict[str, str] = {"ss_network_module": module}
    if main is not None:
        out["ss_network_dim"] = str(main[0])
        out["ss_network_alpha"] = _fmt_alpha(main[1])
    args: dict[str, str] = {}
    if not plain:
        non_lora = [k for k in inner_kinds if k != "lora"]
        args["algo"] = _most_common(non_lora) or "locon"
        if any(isinstance(d, DoRADelta) for d in adapter.deltas.values()):
            args["dora_wd"] = "True"
    conv_main = _most_common(conv)
    if conv_main is not None:
        args["conv_dim"] = str(conv_main[0])
        args["conv_alpha"] = _fmt_alpha(conv_main[1])
    if args:
        out["ss_network_args"] = json.dumps(args)
    return out


def _family_of_architecture(arch: str) -> str | None:
    for prefix, family in (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1")):
        if arch.startswith(prefix):
            return family
    return None


def kohya_metadata(adapter: Adapter, index: ModuleIndex) -> dict[str, str]:
    """Header metadata: the adapter's own (kept), the ss_network_* / base-model / modelspec keys made true for
    what is written. ``sshs_*`` hashes are left to the writer (they depend on the written bytes)."""
    meta = {k: v for k, v in adapter.metadata.items() if isinstance(v, str)}
    for stale in ("sshs_model_hash", "sshs_legacy_hash", "lora_adapter_metadata"):
        meta.pop(stale, None)
    network = _network_summary(adapter, index)
    if "ss_network_args" in meta and meta.get("ss_network_module") == network["ss_network_module"]:
        # Same network class as the source: its args (dropout, block dims, …) still describe the file.
        network.pop("ss_network_args", None)
    else:
        meta.pop("ss_network_args", None)
    meta.update(network)
    family = adapter.family
    meta["ss_base_model_version"] = _BASE_MODEL_VERSION[family]
    meta["ss_v2"] = str(family == "sd2")
    meta.setdefault("ss_output_name", adapter.name)
    # Keep a more specific id the source gave (stable-diffusion-v2-768-v/lora) when it names the same family.
    if _family_of_architecture(meta.get("modelspec.architecture", "")) != family:
        meta["modelspec.architecture"] = f"{_ARCHITECTURE[family]}/lora"
    meta.setdefault("modelspec.sai_model_spec", "1.0.0")
    meta["modelspec.implementation"] = _IMPLEMENTATION[family]
    meta.setdefault("modelspec.title", adapter.name)
    meta.setdefault("modelspec.resolution", _RESOLUTION[family])
    return meta


__all__ = ["kohya_state_dict", "kohya_metadata", "kohya_module_name", "alpha_tensor", "written_alpha"]
