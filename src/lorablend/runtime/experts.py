"""Wan 2.2 A14B's two experts: a LoRA pair (one file for the high-noise ``transformer``, one for the low-noise
``transformer_2``) joined into ONE adapter.

A pair's files have the same keys (each names ``transformer`` modules, or original Wan names): each is read
against the pipeline like any file, then the low-noise one's layers are moved onto ``transformer_2``. The joined
adapter is one name for ``set_adapters`` (one weight for both experts, or one each through the per-component dict
``{"transformer": 1.0, "transformer_2": 0.5}``), ``fuse_lora`` and ``delete_adapters``.

>>> pipeline.load_lora_weights(high="lightning_high.safetensors", low="lightning_low.safetensors",
...                            adapter_name="lightning")                    # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from ..adapter import Adapter
from ..errors import LoraCompatibilityError
from ..report import LoadReport

# which expert each side of a pair goes to (diffusers' WanPipeline: `transformer` runs above the boundary timestep)
EXPERTS = {"high": "transformer", "low": "transformer_2"}


def on_expert(adapter: Adapter, expert: str) -> Adapter:
    """``adapter`` (read against the pipeline: its denoiser layers on ``transformer``) with those layers on
    ``expert`` instead. Layers of other components (text encoders) cannot belong to one expert: refused by name.

    >>> on_expert(adapter, "transformer_2").components                      # doctest: +SKIP
    ['transformer_2']
    """
    if expert == "transformer":
        return adapter
    others = sorted({key.split(".", 1)[0] for key in adapter.deltas} - {"transformer"})
    if others:
        raise LoraCompatibilityError(
            f"LoRA {adapter.report.source or adapter.name!r} for the expert {expert!r} also adapts {others}: a "
            "text encoder belongs to no expert; load that file as a whole (load_lora_weights(file)) instead")
    moved = {_moved(key, expert): delta for key, delta in adapter.deltas.items()}
    report = LoadReport(source=adapter.report.source, format=adapter.report.format)
    for r in adapter.report.records:
        report.add(r.key, r.status, _moved(r.target, expert) if r.target else r.target, r.reason)
    return Adapter(adapter.name, adapter.family, moved, dict(adapter.metadata), report, adapter.format)


def _moved(key: str, expert: str) -> str:
    return expert + key[len("transformer"):] if key.startswith("transformer.") else key


def join_experts(parts: Mapping[str, Adapter], name: str) -> Adapter:
    """One adapter from per-expert adapters ``{"transformer": high, "transformer_2": low}`` (either may be
    missing: a single file can target one expert); the report lists every key of every file, each file's
    source named.

    >>> join_experts({"transformer": high, "transformer_2": low}, "lightning").components   # doctest: +SKIP
    ['transformer', 'transformer_2']
    """
    if not parts:
        raise ValueError("load_lora_weights(high=..., low=...): give the high-noise file, the low-noise file or both")
    deltas, report, first = {}, LoadReport(format=""), next(iter(parts.values()))
    for expert, adapter in parts.items():
        adapter = on_expert(adapter, expert)
        deltas.update(adapter.deltas)
        report.format = report.format or adapter.report.format
        for r in adapter.report.records:
            report.add(r.key, r.status, r.target, r.reason)
    report.source = "; ".join(f"{e}: {a.report.source or a.name}" for e, a in parts.items())
    metadata = {k: v for a in parts.values() for k, v in a.metadata.items()}
    return Adapter(name, first.family, deltas, metadata, report, first.format)


def pair_of(pipe: Any, positional: Any, high: Any, low: Any, name: str, read: Callable[[Any], Adapter]) -> Adapter:
    """The one adapter ``load_lora_weights(high=…, low=…)`` loads on a two-expert pipeline: each given source read
    by ``read`` (against the pipeline), then joined; anything else refused before reading.

    >>> pair_of(pipe, None, "high.safetensors", "low.safetensors", "lightning", read)   # doctest: +SKIP
    """
    if positional is not None:
        raise ValueError("load_lora_weights: pass one LoRA as the first argument, or a pair as high= / low=, not both")
    from torch import nn

    if not isinstance(getattr(pipe, EXPERTS["low"], None), nn.Module):
        raise LoraCompatibilityError(
            f"{type(pipe).__name__} has one denoiser: high= / low= are for Wan 2.2 A14B's two experts (transformer, "
            "transformer_2); load the file with load_lora_weights(file) instead")
    parts = {EXPERTS[side]: read(src) for side, src in (("high", high), ("low", low)) if src is not None}
    return join_experts(parts, name)


__all__ = ["EXPERTS", "join_experts", "on_expert", "pair_of"]
