"""What a LoRA file holds, as a plain dict (``lorablend inspect --json``) and as text for people.

The summary covers the format, family, components, layer kinds, rank / alpha / scale, the blocks it touches
(A1111 LoRA-Block-Weight labels: ``BASE``, ``IN00``…, ``M00``, ``OUT00``…), a metadata digest (training
highlights, not the 15 KB tag table) and the key report (counts and the first keys that were not mapped).

>>> info = inspect_file("style.safetensors")                            # doctest: +SKIP
>>> info["family"], info["layers"], info["report"]["counts"]             # doctest: +SKIP
('sd1', 264, {'mapped': 792, 'unsupported': 0, 'unknown': 0})
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Any

from ..adapter import Adapter

# ss_* / modelspec keys worth showing; everything else is counted, not printed.
_HIGHLIGHTS = (
    "ss_output_name",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
    "ss_base_model_version",
    "ss_v2",
    "ss_sd_model_name",
    "ss_resolution",
    "ss_clip_skip",
    "ss_num_train_images",
    "ss_num_epochs",
    "ss_epoch",
    "ss_max_train_steps",
    "ss_learning_rate",
    "ss_unet_lr",
    "ss_text_encoder_lr",
    "ss_optimizer",
    "ss_mixed_precision",
    "ss_training_comment",
    "ss_training_started_at",
    "ss_training_finished_at",
    "modelspec.title",
    "modelspec.architecture",
    "modelspec.implementation",
    "modelspec.author",
    "modelspec.description",
    "modelspec.trigger_phrase",
    "modelspec.license",
    "sshs_model_hash",
)
_MAX_VALUE = 200
_TOP_TAGS = 10


def _clip(value: str) -> str:
    return value if len(value) <= _MAX_VALUE else value[: _MAX_VALUE - 1] + "…"


def _top_tags(raw: str) -> list[list]:
    """The most frequent training tags from ``ss_tag_frequency`` ({dataset: {tag: count}}), summed over datasets."""
    try:
        table = json.loads(raw)
    except (TypeError, ValueError):
        return []
    counts: collections.Counter = collections.Counter()
    if isinstance(table, dict):
        for tags in table.values():
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    if isinstance(n, (int, float)):
                        counts[str(tag).strip()] += int(n)
    return [[tag, n] for tag, n in counts.most_common(_TOP_TAGS)]


def metadata_summary(metadata: dict[str, str], file: str | os.PathLike | None = None) -> dict[str, Any]:
    """Highlights of a header's metadata; ``sshs_model_hash`` is checked against the file when one is given.

    >>> metadata_summary({"ss_network_dim": "8", "ss_tag_frequency": '{"d": {"cat": 3}}'})["top_tags"]
    [['cat', 3]]
    """
    out: dict[str, Any] = {
        "keys": len(metadata),
        "highlights": {k: _clip(metadata[k]) for k in _HIGHLIGHTS if k in metadata},
        "other_keys": sorted(k for k in metadata if k not in _HIGHLIGHTS and k != "ss_tag_frequency"),
    }
    if "ss_tag_frequency" in metadata:
        out["top_tags"] = _top_tags(metadata["ss_tag_frequency"])
    if "lora_adapter_metadata" in metadata:
        out["diffusers_adapter_config"] = True
    stored = metadata.get("sshs_model_hash")
    if stored and file is not None and Path(file).is_file() and Path(file).suffix == ".safetensors":
        from ..io.safetensors import sshs_model_hash

        try:
            out["sshs_model_hash_matches"] = sshs_model_hash(file) == stored.lower().removeprefix("0x")
        except (OSError, ValueError):
            out["sshs_model_hash_matches"] = False
    return out


def _counts(values: list) -> dict[str, int]:
    counter = collections.Counter(values)
    return {str(k): n for k, n in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))}


def _block_summary(adapter: Adapter) -> dict[str, int]:
    """Layers per block label, in UNet order; keys outside the family's standard model count as ``OTHER``."""
    from ..naming import module_index

    try:
        index = module_index(family=adapter.family)
    except Exception:  # the naming tables need diffusers; a summary without blocks beats no summary
        return {}
    labels = collections.Counter(index.block(key) for key in adapter.deltas)
    order = {label: i for i, label in enumerate(index.block_labels())}
    return {label: labels[label] for label in sorted(labels, key=lambda lb: (order.get(lb, len(order)), lb))}


def _delta_stats(deltas: dict[str, Any]) -> dict[str, Any]:
    """Kinds, dtypes, rank / alpha / scale of a set of deltas (placed on a model or not)."""
    ranks = [d.rank for d in deltas.values() if d.rank is not None]
    scales = [float(d.scale) for d in deltas.values()]
    return {
        "layers": len(deltas),
        "parameters": sum(t.numel() for d in deltas.values() for t in d.tensors()),
        "kinds": _counts([d.kind for d in deltas.values()]),
        "dtypes": _counts([str(t.dtype).removeprefix("torch.") for d in deltas.values() for t in d.tensors()]),
        "rank": {"min": min(ranks) if ranks else None, "max": max(ranks) if ranks else None, "counts": _counts(ranks)},
        "alpha": {"counts": _counts(["none" if d.alpha is None else float(d.alpha) for d in deltas.values()])},
        "scale": {"min": min(scales) if scales else None, "max": max(scales) if scales else None},
    }


def inspect_adapter(adapter: Adapter, *, file: str | os.PathLike | None = None, max_keys: int = 10) -> dict[str, Any]:
    """The summary of an Adapter already in memory (what ``inspect_file`` returns after reading).

    >>> import torch
    >>> from lorablend import Adapter, LowRankDelta
    >>> a = Adapter("x", "sd1", {"unet.mid_block.attentions.0.proj_in": LowRankDelta(torch.zeros(4, 8), torch.zeros(8, 4), alpha=2.0)})
    >>> inspect_adapter(a)["rank"]
    {'min': 4, 'max': 4, 'counts': {'4': 1}}
    """
    deltas = adapter.deltas
    components: dict[str, dict[str, Any]] = {}
    for comp in adapter.components():
        keys = [k for k in deltas if k.split(".", 1)[0] == comp]
        components[comp] = {
            "layers": len(keys),
            "kinds": _counts([deltas[k].kind for k in keys]),
            "parameters": sum(t.numel() for k in keys for t in deltas[k].tensors()),
        }
    stats = _delta_stats(deltas)
    report = adapter.report
    not_mapped = (report.unsupported + report.unknown) if report is not None else []
    info: dict[str, Any] = {
        "file": str(file) if file is not None else (report.source if report is not None else None),
        "name": adapter.name,
        "format": adapter.format,
        "family": adapter.family,
        **stats,
        "parameters": adapter.num_parameters(),
        "kinds": adapter.kinds(),
        "components": components,
        "blocks": _block_summary(adapter),
        "metadata": metadata_summary(adapter.metadata, file),
        "report": {
            "counts": report.counts() if report is not None else {},
            "complete": report.complete if report is not None else True,
            "not_mapped": [
                {"key": r.key, "status": r.status, "reason": r.reason} for r in not_mapped[: max(0, max_keys)]
            ],
        },
    }
    dora_axes = [d.axis for d in deltas.values() if d.kind == "dora"]
    if dora_axes:
        info["dora_axis"] = _counts(dora_axes)
    if file is not None and Path(file).is_file():
        info["size_bytes"] = Path(file).stat().st_size
    return info


def inspect_file(path: str | os.PathLike, *, max_keys: int = 10, family: str | None = None) -> dict[str, Any]:
    """Read a LoRA file (any supported format) and summarise it; raises ``LoraFormatError`` if it cannot be read.
    ``family`` reads a file whose layers fit several models alike as that family's (``load_adapter(family=)``).

    >>> inspect_file("style.safetensors")["format"]                        # doctest: +SKIP
    'kohya'
    """
    from ..errors import LoraFormatError
    from ..io import load_adapter
    from ..io.load import read_layers

    try:
        adapter = load_adapter(path, family=family)
    except LoraFormatError as err:  # no family places it: describe its layers (none that make a delta: raise)
        try:
            layers = read_layers(path)
        except LoraFormatError:
            raise err from None
        if not layers.deltas:
            raise
        return inspect_unplaced(layers, why=str(err), max_keys=max_keys)
    source = adapter.report.source if adapter.report is not None and adapter.report.source else path
    return inspect_adapter(adapter, file=source if Path(str(source)).is_file() else path, max_keys=max_keys)


def inspect_unplaced(layers: Any, *, why: str, max_keys: int = 10) -> dict[str, Any]:
    """The summary of a LoRA file no family we cover places (``io.load.read_layers``): family ``unknown``, its
    format, kinds, ranks, the file's own module names, which families know those names, and what it would need.

    >>> import torch
    >>> from lorablend.io.load import UnplacedLayers
    >>> from lorablend.kinds import LowRankDelta
    >>> layers = UnplacedLayers("x.safetensors", "kohya", {}, {"lora_unet_x": LowRankDelta(torch.ones(2, 3),
    ...     torch.ones(4, 2))}, {}, [], {})
    >>> info = inspect_unplaced(layers, why="fits no model")
    >>> info["family"], info["rank"]["max"], info["modules"][0]["shape"]
    ('unknown', 2, [4, 3])
    """
    deltas, total = layers.deltas, len(layers.deltas) + len(layers.problems)
    best = next(iter(layers.names_known.items()), None)
    if best is not None and best[1] == total:
        needed = (f"every module name is a layer of {best[0]}, but not every shape fits its standard model: load it "
                  f"against the model it was made for (load_adapter(file, target=pipeline), or "
                  f"pipeline.load_lora_weights(file)), whose layers have the shapes listed here")
    else:
        known = f" ({best[0]} knows {best[1]} of its {total} module names)" if best else ""
        needed = (f"a model with layers of these names and shapes{known}: lorablend places a LoRA on the families it "
                  f"covers (lorablend.adapter.FAMILIES) or on a pipeline passed as target=")
    not_placed = [{"key": k, "status": s, "reason": r} for k, s, r in layers.leftovers]
    not_placed += [{"key": name, "status": "unsupported", "reason": p} for name, p in layers.problems.items()]
    info: dict[str, Any] = {
        "file": layers.label,
        "format": layers.format,
        "family": "unknown",
        **_delta_stats(deltas),
        "why_unknown": why,
        "needed": needed,
        "names_known": layers.names_known,
        "modules": [{"name": name, "kind": d.kind, "rank": d.rank, "shape": list(d.shape)}
                    for name, d in list(deltas.items())[: max(0, max_keys)]],
        "metadata": metadata_summary(layers.metadata, layers.label),
        "report": {"counts": {"mapped": 0, "unsupported": sum(r["status"] == "unsupported" for r in not_placed),
                              "unknown": sum(r["status"] == "unknown" for r in not_placed)},
                   "complete": False, "not_mapped": not_placed[: max(0, max_keys)]},
    }
    if Path(str(layers.label)).is_file():
        info["size_bytes"] = Path(str(layers.label)).stat().st_size
    return info


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}×{n}" for k, n in counts.items()) or "-"


def render_text(info: dict[str, Any]) -> str:
    """The summary as a few lines for a terminal.

    >>> print(render_text({"file": "x.safetensors", "format": "kohya", "family": "sd1", "layers": 0}))
    x.safetensors: kohya, sd1, 0 layers
    """
    lines = [f"{info.get('file')}: {info.get('format')}, {info.get('family')}, {info.get('layers')} layers"
             + (f", {info['parameters']:,} parameters" if "parameters" in info else "")
             + (f", {info['size_bytes']:,} bytes" if "size_bytes" in info else "")]
    for comp, c in info.get("components", {}).items():
        lines.append(f"  {comp}: {c['layers']} layers ({_fmt_counts(c['kinds'])})")
    if info.get("family") == "unknown":
        lines.append(f"  family unknown: {info['why_unknown']}")
        lines.append(f"  needed: {info['needed']}")
        lines.append(f"  kinds: {_fmt_counts(info['kinds'])}; modules as the file names them:")
        lines += [f"    {m['name']}: {m['kind']}, rank {m['rank']}, ΔW {tuple(m['shape'])}" for m in info["modules"]]
        if info["layers"] > len(info["modules"]):
            lines.append(f"    … and {info['layers'] - len(info['modules'])} more modules (--keys N lists more)")
    if "rank" in info:
        r = info["rank"]
        lo, hi = info["scale"]["min"], info["scale"]["max"]
        scale = "" if lo is None else f"   scale: {lo:g}" + ("" if hi == lo else f"…{hi:g}")
        lines.append(f"  rank: {_fmt_counts(r['counts'])}   alpha: {_fmt_counts(info['alpha']['counts'])}{scale}")
    if info.get("dtypes"):
        lines.append(f"  dtypes: {_fmt_counts(info['dtypes'])}")
    if info.get("dora_axis"):
        lines.append(f"  DoRA magnitude axis: {_fmt_counts(info['dora_axis'])}")
    if info.get("blocks"):
        lines.append(f"  blocks: {_fmt_counts(info['blocks'])}")
    meta = info.get("metadata")
    if meta:
        lines.append(f"  metadata: {meta['keys']} keys")
        for k, v in meta["highlights"].items():
            lines.append(f"    {k} = {v}")
        if "sshs_model_hash_matches" in meta:
            lines.append(f"    sshs_model_hash matches the file: {'yes' if meta['sshs_model_hash_matches'] else 'NO'}")
        if meta.get("top_tags"):
            lines.append("    top tags: " + ", ".join(f"{t} ({n})" for t, n in meta["top_tags"]))
    rep = info.get("report")
    if rep and info.get("family") == "unknown":  # nothing is placed: only the keys no module took
        lines += [f"  not read: {r['key']} ({r['reason']})" for r in rep["not_mapped"]]
    elif rep and rep.get("counts"):
        c = rep["counts"]
        lines.append(f"  keys: {c['mapped']} mapped, {c['unsupported']} unsupported, {c['unknown']} unknown")
        for r in rep["not_mapped"]:
            lines.append(f"    {r['status']}: {r['key']}" + (f" ({r['reason']})" if r["reason"] else ""))
        hidden = c["unsupported"] + c["unknown"] - len(rep["not_mapped"])
        if hidden > 0:
            lines.append(f"    … and {hidden} more (--keys N lists more)")
    return "\n".join(lines)


__all__ = ["inspect_file", "inspect_adapter", "inspect_unplaced", "metadata_summary", "render_text"]
