"""LoRAs on quantized bases (issue 18), on real-width Flux.1 layers: one double block's image-stream linears
(q, k, v, out 3072×3072; mlp 3072→12288→3072), each quantized every way the CPU runs (bitsandbytes NF4 / int8,
scaled fp8, GGUF Q8_0 / Q4_0, torchao int8), with 2 rank-32 LoRAs on every layer. One run, ratios:

* **unfused forward**: the quantized layers' own forwards + the LoRA term (the runtime's hook) / the same forwards
  without LoRA (goal ≤ 1.3×), median of interleaved rounds, ``tokens`` rows of input;
* **fuse**: ``LayerState.write_fused`` of the 2 LoRAs on every layer (what ``fuse_lora`` runs per layer) / a
  same-run floor = dequantize + one addmm + requantize of the same layers with the format's own functions;
* **unfuse**: restoring every layer (rebinding the original objects), and a check that the bytes are the originals;
* **GGUF bake** (``--bake``): a real-width Flux file with 1 double + 1 single block in BFL names, Q8_0, through
  ``lorablend.offline.bake.bake`` in a subprocess: MB/s of file and peak RSS.

    .venv/bin/python benchmarks/bench_quant.py                 # ~3 minutes on 2 cores
    .venv/bin/python benchmarks/bench_quant.py --tokens 64 --methods nf4,gguf-Q8_0 --bake
"""

from __future__ import annotations

import argparse
import contextvars
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

from lorablend.kinds import LowRankDelta  # noqa: E402
from lorablend.quant import format_of  # noqa: E402
from lorablend.quant.convert import quantize_model  # noqa: E402
from lorablend.runtime.layer_state import LayerTable  # noqa: E402

WIDTH, MLP = 3072, 12288
SHAPES = [(WIDTH, WIDTH)] * 4 + [(WIDTH, MLP), (MLP, WIDTH)]  # (in, out); --no-mlp: the first four
METHODS = ["nf4", "int8", "scaled-fp8", "gguf-Q8_0", "gguf-Q4_0", "torchao-int8"]


def build(method: str, shapes: list, seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(i, o) for i, o in shapes])
    for layer in model:
        torch.nn.init.normal_(layer.weight, std=0.02)
    assert len(quantize_model(model, method)) == len(shapes)
    return model


def loras(shapes: list, rank: int = 32) -> list[list[LowRankDelta]]:
    g = torch.Generator().manual_seed(1)
    return [[LowRankDelta(down=torch.randn(rank, i, generator=g) * 0.01, up=torch.randn(o, rank, generator=g) * 0.01)
             for i, o in shapes] for _ in range(2)]


def chain(model: torch.nn.Sequential, xs: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for layer, x in zip(model, xs):
            layer(x)


def run_method(method: str, tokens: int, rounds: int, shapes: list) -> dict:
    model = build(method, shapes)
    table = LayerTable(contextvars.ContextVar("scale", default=1.0))
    states = [table.add(f"transformer.l{i}", "transformer", m) for i, m in enumerate(model)]
    deltas = loras(shapes)
    for i, state in enumerate(states):
        for a, name in enumerate(("a", "b")):
            state.loaded[name] = deltas[a][i]
            table.weights.setdefault(name, {})[state.key] = 0.7 if a == 0 else 0.5
    xs = [torch.randn(tokens, i) for i, _ in shapes]
    chain(model, xs)  # warm-up (bitsandbytes packs 4-bit weights for its CPU kernel on the first forward)
    base, lora = [], []
    for _ in range(rounds):  # interleaved: without, with
        for state in states:
            state.set_contributors([])
        t = time.perf_counter(); chain(model, xs); base.append(time.perf_counter() - t)
        for state in states:
            state.set_contributors([("a", state.loaded["a"]), ("b", state.loaded["b"])])
        table.version += 1
        chain(model, xs)  # (the term is built on the first forward after a change: not a steady-state cost)
        t = time.perf_counter(); chain(model, xs); lora.append(time.perf_counter() - t)
    for state in states:
        state.set_contributors([])
    before = [dict(s.quant.stored_state(s.module)) for s in states]
    entries = [[(0.7, deltas[0][i]), (0.5, deltas[1][i])] for i in range(len(states))]

    def floor() -> None:  # dequantize + one addmm of both LoRAs + requantize, the format's own functions
        for state, e in zip(states, entries):
            fmt, snap = state.quant, state.quant.snapshot(state.module)
            w = fmt.dequantize(state.module, snap)
            up = torch.cat([c * d.up for c, d in e], 1)
            down = torch.cat([d.down for _, d in e], 0)
            w.addmm_(up, down)
            fmt.requantize(state.module, snap, w, 0)
            fmt.restore(state.module, snap)

    fuse, unfuse, floors = [], [], []
    for _ in range(2):
        t = time.perf_counter(); floor(); floors.append(time.perf_counter() - t)
        t = time.perf_counter()
        for state, e in zip(states, entries):
            state.write_fused(e)
        fuse.append(time.perf_counter() - t)
        t = time.perf_counter()
        for state in states:
            state.write_fused([])
            state.release_pristine()
        unfuse.append(time.perf_counter() - t)
    exact = all(_same(b, s.quant.stored_state(s.module)) for b, s in zip(before, states))
    med = statistics.median
    return {"method": method, "label": states[0].quant.label(states[0].module), "base_ms": 1e3 * med(base),
            "lora_ms": 1e3 * med(lora), "overhead": med(lora) / med(base), "fuse_ms": 1e3 * med(fuse),
            "floor_ms": 1e3 * med(floors), "fuse_vs_floor": med(fuse) / med(floors), "unfuse_ms": 1e3 * med(unfuse),
            "unfuse_exact": exact}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y) for x, y in zip(a.values(), b.values()))


def run(argv=None) -> dict:
    """The benchmark; returns ``{"text": markdown, "rows": [...]}`` (what run_cpu.py collects)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=256, help="rows of input per forward (image + text tokens)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--no-mlp", action="store_true", help="only q, k, v, out (a third of the weights: a busy machine)")
    p.add_argument("--bake", action="store_true", help="also bake a real-width Flux GGUF file (a few GB of disk)")
    p.add_argument("--json", default=None, help="write the rows here too")
    args = p.parse_args(argv)
    C.setup_threads(args.threads)
    C.quiet_libraries()
    shapes = SHAPES[:4] if args.no_mlp else list(SHAPES)
    info = C.machine_info()
    lines = [f"# LoRAs on quantized bases — {info['cpu']}, {info['nproc']} cores, torch threads {args.threads}, "
             f"torch {info['torch']}, diffusers {info['diffusers']}"]
    mlp = "" if len(shapes) == 4 else f", {WIDTH}→{MLP}→{WIDTH}"
    lines += [f"Real-width Flux double-block image stream (4× {WIDTH}²{mlp}), 2 rank-32 LoRAs per layer, "
              f"{args.tokens} tokens per forward; medians", "",
              "| format | base fwd ms | +2 LoRAs ms | overhead | fuse ms | floor ms | fuse/floor | unfuse ms | exact |",
              "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    rows = []
    for method in args.methods.split(","):
        r = run_method(method, args.tokens, args.rounds, shapes)
        rows.append(r)
        lines.append(f"| {r['label']} | {r['base_ms']:.1f} | {r['lora_ms']:.1f} | {r['overhead']:.2f}× | "
                     f"{r['fuse_ms']:.0f} | {r['floor_ms']:.0f} | {r['fuse_vs_floor']:.2f}× | {r['unfuse_ms']:.2f} | "
                     f"{r['unfuse_exact']} |")
        print(lines[-1], flush=True)
    if args.bake:
        row = bake_row()
        rows.append(row)
        lines += ["", f"GGUF bake (Q8_0, FLUX.1-dev widths, 1 double + 1 single block, rank-32 LoRA on "
                      f"{row['touched_layers']} layers): {row['file_mb']} MB in {row['seconds']} s = "
                      f"{row['mb_per_s']} MB/s, peak RSS {row['peak_rss_gib']} GiB"]
        print(lines[-1], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return {"text": "\n".join(lines), "rows": rows}


def main(argv=None) -> int:
    run(argv)
    return 0


def bake_row() -> dict:
    """A real-width Flux GGUF (1 double + 1 single block, BFL names, Q8_0) written, then baked in a fresh process
    (bench_quant_bake.py): MB/s and the bake's peak RSS."""
    import tempfile

    folder = tempfile.mkdtemp(prefix="bench-quant-")
    script = str(Path(__file__).resolve().parent / "bench_quant_bake.py")
    subprocess.run([sys.executable, script, folder, "write"], check=True)
    out = subprocess.run([sys.executable, script, folder, "bake"], capture_output=True, text=True, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return row


if __name__ == "__main__":
    raise SystemExit(main())
