"""Same-run floors: what a LoRA load and a fuse cost with nothing but the file's bytes and the arithmetic.

The floor runs in its own fresh process of the benchmark, on the same model (same build, same seed) and the
same LoRA files as both systems, so that "ours / floor" compares like with like on this machine, this hour:

* **load floor**: ``safetensors.torch.load_file(path)`` + one copy of every tensor to the model's device
  (``tensor.to(device, copy=True)``; on a CPU a clone into fresh memory, as a loaded adapter must own its
  bytes). Each file's copy stays alive, as a loaded adapter does. The first file is the cold floor (a fresh
  process holding the model), the median of the others the warm one.
* **fuse floor**: one plain ``torch.addmm(W0, U, D)`` per touched layer, where ``U``/``D`` concatenate the
  factors of the two fused LoRAs (inner dimension = the sum of their ranks, 64 here: what lorablend's fuse
  multiplies), in the weight's dtype, built before the clock starts. Cold = the first pass in the process
  (every output is fresh memory, all outputs alive until the pass ends, as fused weights are); warm = the
  median of later passes of the same calls (each pass allocates anew after the previous outputs were freed,
  as fuse after unfuse does); reused = the median of passes into outputs allocated and touched before
  (``out=``: the floor for ``keep_fuse_buffers=True``).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

import common as C


def load_floor(paths: list[Path], device) -> tuple[list[dict], list[dict]]:
    """A timed row (``common.once_row``) per file for ``load_file`` + one copy to ``device``, in order, and the
    copies (kept alive, as loaded adapters are)."""
    from safetensors.torch import load_file

    rows, kept = [], []
    for path in paths:
        def load():
            return {k: v.to(device, copy=True) for k, v in load_file(str(path)).items()}

        row, tensors = C.once_row(load, device)
        rows.append(row)
        kept.append(tensors)
    return rows, kept


def median_row(rows: list[dict]) -> dict:
    """Rows of single calls as one row: the median wall and CPU seconds, every wall sample."""
    return {"median": statistics.median(r["median"] for r in rows), "samples": [r["median"] for r in rows],
            "cpu": statistics.median(r["cpu"] for r in rows)}


def fuse_factors(model: str, unet, targets, files: list[dict], weights: list[float]) -> list[tuple]:
    """``(W0 as (out, -1), U, D)`` per touched layer for fusing kohya-format LoRA state dicts ``files`` with
    ``weights``: ``U = [w_i · alpha_i/rank_i · up_i]``, ``D = [down_i]``, in the weight's dtype and device."""
    from lorablend.naming import module_index

    idx = module_index(family="sdxl" if model == "sdxl" else "sd1")
    layers = []
    for path, _shape in targets:
        weight = unet.get_submodule(path).weight.detach()
        rows = weight.shape[0]
        ups, downs = [], []
        key = idx.kohya_name("unet." + path)
        for sd, w in zip(files, weights):
            down, up = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"]
            rank = down.shape[0]
            alpha = float(sd[f"{key}.alpha"]) if f"{key}.alpha" in sd else rank
            ups.append(up.reshape(rows, rank).to(weight) * (w * alpha / rank))
            downs.append(down.reshape(rank, -1).to(weight))
        layers.append((weight.view(rows, -1), torch.cat(ups, 1).contiguous(), torch.cat(downs, 0).contiguous()))
    return layers


def fuse_floor(layers: list[tuple], device, cycles: int) -> dict:
    """Timed rows of the cold pass, the later passes and the passes into reused outputs (see the module doc)."""
    def plain():
        return [torch.addmm(w, u, d) for w, u, d in layers]

    cold, outputs = C.once_row(plain, device)
    del outputs
    later = []
    for _ in range(cycles):
        row, outputs = C.once_row(plain, device)
        later.append(row)
        del outputs  # freed before the next pass, as unfuse frees the fused weights
    buffers = [torch.empty_like(w) for w, _, _ in layers]

    def into_buffers():
        for (w, u, d), b in zip(layers, buffers):
            torch.addmm(w, u, d, out=b)

    into_buffers()  # touched once: "reused" means memory the process already has
    reused = [C.once_row(into_buffers, device)[0] for _ in range(cycles)]
    return {"fuse_first": cold, "fuse_later": median_row(later), "fuse_reused": median_row(reused)}
