"""Unfused adapters saved beside a pipeline's components, and read back when the folder is loaded again.

``DiffusionPipeline.save_pretrained`` writes the weights as they are (what is fused is in them) and, when adapters
are loaded but not fused, a ``lorablend_adapters/`` folder beside the components: one ``<n>.safetensors`` per
adapter in the ``onetrainer`` layout (every Delta kind on every module, losslessly, named against the pipeline's
own modules) and ``adapters.json`` (the load order, the active set with each adapter's ``set_adapters`` weight, and
whether the adapters are enabled). ``DiffusionPipeline.from_pretrained`` loads them back, so the reloaded pipeline
makes the same images, as diffusers + PEFT promise. diffusers' own loader ignores the folder (it is no component of
``model_index.json``).

>>> plan = plan_saved_adapters(pipeline.runtime)                         # doctest: +SKIP
>>> write_saved_adapters("saved-pipeline", plan)                         # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..adapter import Adapter
from ..outputs import atomic_write
from .safetensors import serialize
from .write import adapter_state_dict

FOLDER = "lorablend_adapters"
MANIFEST = "adapters.json"


def plan_saved_adapters(runtime: Any) -> dict[str, Any]:
    """Everything :func:`write_saved_adapters` will write, computed (and refused) before anything touches the
    disk: ``{"files": {file name: (tensors, metadata)}, "manifest": {...}}``; no files when every loaded adapter is
    fused. Refused with the way out: an adapter fused into some of its components only.

    >>> plan_saved_adapters(pipeline.runtime)["manifest"]["active"]      # doctest: +SKIP
    [['ikea', 0.7], ['feng', 0.8]]
    """
    files, order = {}, []
    for name, bound in runtime.adapters.items():
        fused = set(runtime.fused_components(name))
        if fused == set(bound.components()):
            continue  # in the weights already
        if fused:
            raise ValueError(f"save_pretrained: adapter {name!r} is fused into {sorted(fused)} but not into the rest "
                             f"of {bound.components()}: fuse it everywhere or unfuse it first (nothing was written)")
        adapter = Adapter(name, bound.adapter.family, {k: layer.delta for k, layer in bound.layers.items()},
                          dict(bound.adapter.metadata))
        files[f"{len(order)}.safetensors"] = _state_dict(adapter, runtime.view.index)
        order.append(name)
    active = [[n, runtime.weight_specs.get(n)] for n in runtime.active if n in order]
    # (set_adapters takes numbers and dicts / lists of numbers only: JSON holds every weight it took)
    manifest = json.dumps({"adapters": order, "active": active, "enabled": bool(runtime.enabled)}, indent=2)
    return {"files": files, "manifest": manifest if order else None}


def _state_dict(adapter: Adapter, index: Any) -> tuple[dict, dict]:
    """The ``onetrainer`` layout (every Delta kind, lossless) where every module has a flat name; else diffusers'
    (low-rank kinds: Wan 2.2's ``transformer_2`` has no flat names of its own); else a refusal with the ways out."""
    problems = []
    for layout in ("onetrainer", "diffusers"):
        try:
            return adapter_state_dict(adapter, layout, target=index)
        except (ValueError, KeyError, IndexError) as e:
            problems.append(f"{layout}: {type(e).__name__}: {e}")
    raise ValueError(f"save_pretrained: adapter {adapter.name!r} cannot be written beside the pipeline "
                     f"({'; '.join(problems)}): fuse_lora() it, or unload_lora_weights() and keep it with "
                     f"lorablend.save_adapter (nothing was written)")


def write_saved_adapters(folder: str | os.PathLike, plan: dict[str, Any]) -> list[Path]:
    """Write a :func:`plan_saved_adapters` plan into ``folder/lorablend_adapters`` (each file atomically; the
    manifest last, so a folder without it holds no adapters to reload). Returns the paths written.

    >>> write_saved_adapters("saved-pipeline", plan)                     # doctest: +SKIP
    """
    if plan["manifest"] is None:
        return []
    where = Path(folder) / FOLDER
    where.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, (tensors, metadata) in plan["files"].items():
        header, chunks = serialize(tensors, metadata)
        written.append(atomic_write(where / file_name, [header, *chunks], overwrite=True))
    return written + [atomic_write(where / MANIFEST, [plan["manifest"].encode()], overwrite=True)]


def reload_saved_adapters(pipeline: Any, folder: str | os.PathLike) -> list[str]:
    """Load the adapters a saved folder holds into ``pipeline`` (a ``lorablend.DiffusionPipeline``) in their order,
    then set the saved active set and weights. Returns their names (none when the folder holds none).

    >>> reload_saved_adapters(pipeline, "saved-pipeline")                # doctest: +SKIP
    ['ikea', 'feng']
    """
    manifest_path = Path(folder) / FOLDER / MANIFEST
    if not manifest_path.is_file():
        return []
    manifest = json.loads(manifest_path.read_text())
    for i, name in enumerate(manifest["adapters"]):
        pipeline.load_lora_weights(str(Path(folder) / FOLDER / f"{i}.safetensors"), adapter_name=name)
    pipeline.set_adapters([n for n, _ in manifest["active"]], [w for _, w in manifest["active"]])
    if not manifest["enabled"]:
        pipeline.disable_lora()
    return list(manifest["adapters"])


__all__ = ["FOLDER", "MANIFEST", "plan_saved_adapters", "reload_saved_adapters", "write_saved_adapters"]
