"""Peak memory of fusing into one quantized layer (issue 18: "≤ the largest touched layer's dequantized size + the
LoRA"): for each format, a fresh process builds one real-width Flux MLP layer (3072 → 12288, 37.7 M weights,
151 MB in fp32) quantized that way and a rank-32 LoRA, then fuses (``LayerState.write_fused``, the per-layer path of
``fuse_lora``). Reported: the peak RSS during the fuse above the RSS just before it (Linux: ``/proc/self/clear_refs``
resets the peak, ``VmHWM`` is read after), in MiB and as a multiple of the layer's fp32 size, twice: as the first
fuse of the process (one-time costs included: a library's lazy imports and caches), and after a warm-up fuse into
a 256 → 128 layer of the same format (what each further layer of a model costs).

    .venv/bin/python benchmarks/bench_quant_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys

METHODS = ["nf4", "int8", "scaled-fp8", "gguf-Q8_0", "gguf-Q4_0", "torchao-int8"]

CHILD = r"""
import contextvars, json, sys, torch
from lorablend.kinds import LowRankDelta
from lorablend.quant.convert import quantize_model
from lorablend.runtime.layer_state import LayerTable
torch.set_num_threads(1)
method, warm = sys.argv[1], sys.argv[2] == "warm"
if warm:  # one fuse into a small layer of the format: its library's first-use costs happen here
    small = torch.nn.Sequential(torch.nn.Linear(256, 128))
    quantize_model(small, method)
    tiny = LowRankDelta(down=torch.randn(4, 256) * 0.01, up=torch.randn(128, 4) * 0.01)
    LayerTable(contextvars.ContextVar("w", default=1.0)).add("transformer.w", "transformer", small[0]).write_fused(
        [(1.0, tiny)])
model = torch.nn.Sequential(torch.nn.Linear(3072, 12288))
quantize_model(model, method)
g = torch.Generator().manual_seed(0)
delta = LowRankDelta(down=torch.randn(32, 3072, generator=g) * 0.01, up=torch.randn(12288, 32, generator=g) * 0.01)
state = LayerTable(contextvars.ContextVar("s", default=1.0)).add("transformer.x", "transformer", model[0])
import gc; gc.collect()
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
open("/proc/self/clear_refs", "w").write("5")  # (Linux: the peak RSS starts again from the RSS now)
before = status("VmRSS")
state.write_fused([(0.8, delta)])
print(json.dumps({"method": method, "growth_mb": (status("VmHWM") - before) / 1024}))
"""


def main() -> int:
    fp32_mb = 3072 * 12288 * 4 / 2**20
    print(f"| format | peak RSS growth, first fuse of the process | after a warm-up fuse | × the layer's fp32 size "
          f"({fp32_mb:.0f} MiB), first / warm |")
    print("|---|---|---|---|")
    for method in METHODS:
        mb = []
        for warm in ("cold", "warm"):
            out = subprocess.run([sys.executable, "-c", CHILD, method, warm], capture_output=True, text=True, check=True)
            mb.append(json.loads(out.stdout.strip().splitlines()[-1])["growth_mb"])
        print(f"| {method} | {mb[0]:.0f} MiB | {mb[1]:.0f} MiB | {mb[0] / fp32_mb:.2f}× / {mb[1] / fp32_mb:.2f}× |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
