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
from typing import Any, Callable, Iterable

import torch

from ..adapter import Adapter
from ..kinds import alpha_tensor, written_alpha
from ..naming import ModuleIndex

# kohya's ss_base_model_version values and the SAI model-spec architecture ids (sd-scripts sai_model_spec.py).
_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "flux": "flux1", "sd3": "sd3_m",
                       "sd35-medium": "sd3_5_m", "sd35-large": "sd3_5_l",
                       # the 2025-26 families: lorablend's ids (their trainers write no common one)
                       "qwen-image": "qwen_image", "wan-1.3b": "wan2.1_t2v_1.3B", "wan-14b": "wan_14B",
                       "wan-i2v-14b": "wan2.1_i2v_14B", "wan-5b": "wan2.2_ti2v_5B", "flux2-dev": "flux2_dev",
                       "flux2-klein-4b": "flux2_klein_4B", "flux2-klein-9b": "flux2_klein_9B", "z-image": "z_image",
                       "chroma": "chroma"}
_ARCHITECTURE = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base",
                 "flux": "flux-1-dev", "sd3": "stable-diffusion-3-medium", "sd35-medium": "stable-diffusion-3-5-medium",
                 "sd35-large": "stable-diffusion-3-5-large", "qwen-image": "qwen-image", "wan-1.3b": "wan-2.1-t2v-1.3b",
                 "wan-14b": "wan-14b", "wan-i2v-14b": "wan-2.1-i2v-14b", "wan-5b": "wan-2.2-ti2v-5b",
                 "flux2-dev": "flux-2-dev", "flux2-klein-4b": "flux-2-klein-4b", "flux2-klein-9b": "flux-2-klein-9b",
                 "z-image": "z-image", "chroma": "chroma"}
_RESOLUTION = {"sd1": "512x512", "sd2": "512x512"}  # every other family: 1024x1024
# sd-scripts: SDXL LoRAs are "implemented" by SGM (their names are SGM names), SD1/SD2 ones by diffusers.
_IMPLEMENTATION = {
    "sd1": "diffusers",
    "sd2": "diffusers",
    "sdxl": "https://github.com/Stability-AI/generative-models",
    "flux": "https://github.com/black-forest-labs/flux",  # sd-scripts' IMPL_FLUX
}  # SD3 / SD3.5: Stability AI's, as SDXL
# sd-scripts' network modules for the transformer families (their files hold BFL / SAI names)
_NETWORK_MODULE = {"flux": "networks.lora_flux", "sd3": "networks.lora_sd3", "sd35-medium": "networks.lora_sd3",
                   "sd35-large": "networks.lora_sd3", "chroma": "networks.lora_flux",
                   # musubi-tuner's modules (their files hold these names)
                   "qwen-image": "networks.lora_qwen_image", "z-image": "networks.lora_zimage",
                   **{f: "networks.lora_wan" for f in ("wan-1.3b", "wan-14b", "wan-i2v-14b", "wan-5b")},
                   **{f: "networks.lora_flux_2" for f in ("flux2-dev", "flux2-klein-4b", "flux2-klein-9b")}}


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
        for suffix, tensor in delta.kohya_tensors(shape):
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
    algos = [d.lycoris_algo for d in adapter.deltas.values()]
    plain = all(algo is None for algo in algos)  # what kohya's own networks.lora holds
    module = _NETWORK_MODULE.get(adapter.family, "networks.lora") if plain else "lycoris.kohya"
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
        args["algo"] = _most_common([a for a in algos if a not in (None, "locon")]) or "locon"
        if any(d.kind == "dora" for d in adapter.deltas.values()):  # LyCORIS' flag for weight decomposition
            args["dora_wd"] = "True"
    conv_main = _most_common(conv)
    if conv_main is not None:
        args["conv_dim"] = str(conv_main[0])
        args["conv_alpha"] = _fmt_alpha(conv_main[1])
    if args:
        out["ss_network_args"] = json.dumps(args)
    return out


def _family_of_architecture(arch: str) -> str | None:
    for prefix, family in (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1"),
                           ("flux-1", "flux"), ("stable-diffusion-3-5-large", "sd35-large"),
                           ("stable-diffusion-3-5-medium", "sd35-medium"), ("stable-diffusion-3", "sd3")):
        if arch.startswith(prefix):
            return family
    return None


def architecture_family(arch: str) -> str | None:
    """The family a model-spec architecture id names (``modelspec.architecture`` without its ``/lora``): the ids
    this writer gives exactly, sd-scripts' by prefix; None for another.

    >>> architecture_family("qwen-image"), architecture_family("flux-1-schnell"), architecture_family("x") is None
    ('qwen-image', 'flux', True)
    """
    exact = {a: f for f, a in _ARCHITECTURE.items()}
    return exact.get(arch) or _family_of_architecture(arch)


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
    meta["modelspec.implementation"] = _IMPLEMENTATION.get(family, _IMPLEMENTATION["sdxl"])
    meta.setdefault("modelspec.title", adapter.name)
    meta.setdefault("modelspec.resolution", _RESOLUTION.get(family, "1024x1024"))
    return meta


__all__ = ["kohya_state_dict", "kohya_metadata", "kohya_module_name", "alpha_tensor", "written_alpha"]
