"""The GGUF bake row of bench_quant.py, run in its own process (its peak RSS is the bake's): a real-width Flux.1
transformer file in BFL names (FLUX.1-dev widths, 1 double + 1 single block; shapes from lorablend's own name
tables on the meta device), random weights written as Q8_0 (F32 where a row is not whole blocks) tensor by tensor,
then ``lorablend.offline.bake.bake`` of a rank-32 LoRA on every attention and MLP layer of both blocks. Prints one
JSON line: file size, bake seconds, MB/s, peak RSS (``ru_maxrss``: it counts the pages of the memory-mapped input
that were read, which the kernel can drop, so it bounds the working set from above).

    .venv/bin/python benchmarks/bench_quant_bake.py /tmp/somewhere write
    .venv/bin/python benchmarks/bench_quant_bake.py /tmp/somewhere bake
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

FLUX_DEV = {"patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 128,
            "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
            "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}


def bfl_shapes() -> tuple[dict[str, tuple[int, ...]], object]:
    """BFL tensor name -> shape for the FLUX_DEV config, and the module index it came from."""
    from lorablend.naming.meta import build_meta_components
    from lorablend.runtime.model_view import ModelView

    index = ModelView.of(build_meta_components(FLUX_DEV, [], denoiser="flux")).index
    shapes: dict[str, tuple[int, ...]] = {}
    for name in index.source_names():
        targets = index.lookup_rows(name)
        info = index.modules[targets[0][0]]
        rows = max((max(b for _, b in spans) if spans else index.modules[k].weight_shape[0]) for k, spans in targets)
        if info.kind == "norm":
            shapes[f"{name}.scale"] = (rows,)
            continue
        shapes[f"{name}.weight"] = (rows, *info.weight_shape[1:])
        if info.has_bias:
            shapes[f"{name}.bias"] = (rows,)
    return shapes, index


def write_file(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    import gguf

    from lorablend.quant.gguf import quantize_gguf

    q8 = gguf.GGMLQuantizationType.Q8_0
    writer = gguf.GGUFWriter(path, "flux")
    kinds = {}
    for name, shape in shapes.items():
        quant = len(shape) == 2 and shape[1] % 32 == 0
        kinds[name] = quant
        if quant:
            raw = [shape[0], shape[1] // 32 * 34]
            writer.add_tensor_info(name, raw, np.dtype(np.uint8), raw[0] * raw[1], raw_dtype=q8)
        else:
            writer.add_tensor_info(name, list(shape), np.dtype(np.float32), int(np.prod(shape)) * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        w = (rng.standard_normal(shape, dtype=np.float32) * 0.02)
        writer.write_tensor_data(quantize_gguf(w, q8) if kinds[name] else w)
        del w
    writer.close()


def lora(index) -> object:
    from lorablend import Adapter
    from lorablend.kinds import LowRankDelta

    g = torch.Generator().manual_seed(1)
    deltas = {}
    for key, info in index.modules.items():
        if info.kind != "linear" or not any(s in key for s in (".attn.", ".ff.", ".ff_context.", "proj_mlp", "proj_out")):
            continue
        out_f, in_f = info.weight_shape
        deltas[key] = LowRankDelta(down=torch.randn(32, in_f, generator=g) * 0.01,
                                   up=torch.randn(out_f, 32, generator=g) * 0.01)
    return Adapter("bench", "flux", deltas)


def main(folder: str, phase: str) -> None:
    """``write``: the input file; ``bake``: the bake alone in a fresh process (so its ru_maxrss is the bake's)."""
    from lorablend.offline.bake import bake

    folder = Path(folder)
    src, out = folder / "flux-2blocks-Q8_0.gguf", folder / "baked.gguf"
    shapes, index = bfl_shapes()
    if phase == "write":
        write_file(src, shapes)
        return
    adapter = lora(index)
    t = time.perf_counter()
    report = bake(src, [(adapter, 0.8)], out)
    seconds = time.perf_counter() - t
    size = src.stat().st_size / 1e6
    print(json.dumps({"file_mb": round(size, 1), "weights": int(sum(np.prod(s) for s in shapes.values())),
                      "touched_layers": report.touched, "seconds": round(seconds, 2),
                      "mb_per_s": round(size / seconds, 1),
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))
    src.unlink()
    out.unlink()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
