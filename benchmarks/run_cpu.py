"""`make bench`: the CPU suite (offline start-up + runtime side by side + Flux.1 runtime + quantized bases + svd
merge) in about 15 minutes on a 2-core machine (the Flux part ~5 of them; `--skip-flux` leaves it out).

The runtime part uses the real SD1.5 UNet (860 M weights, 192 touched layers) rather than SDXL: SDXL in fp32
needs ~10 GiB for the UNet plus ~8 GiB for lorablend's pristine copies while fused, more than a shared
2-core / 23 GiB machine can give; `--model sdxl` runs it anyway where memory allows. The merge part is always
SDXL-shaped (it needs no UNet). The Flux part (`bench_flux.py`) is a real-width Flux.1 transformer with 2 double +
4 single blocks in fp32 (1.3 B weights) and kohya-Flux files at rank 16: the whole FLUX.1-dev transformer is
11.9 B weights, 44 GiB in fp32 (`benchmarks/gpu.sh` runs it in bf16 on a GPU). Tables go to stdout and to
bench-output/ (RESULTS-cpu.md + per-part files).

    .venv/bin/python benchmarks/run_cpu.py                 # what `make bench` runs
    .venv/bin/python benchmarks/run_cpu.py --model sdxl --latent 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["sd15", "sdxl"], default="sd15")
    p.add_argument("--latent", type=int, default=16, help="latent side: 16 = 128² px images")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--repeats", type=int, default=8, help="interleaved forward rounds")
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--outdir", default=str(C.REPO / "bench-output"))
    p.add_argument("--skip-merge", action="store_true")
    p.add_argument("--skip-runtime", action="store_true")
    p.add_argument("--skip-offline", action="store_true")
    p.add_argument("--skip-flux", action="store_true", help="leave out the Flux.1 transformer rows (bench_flux.py)")
    p.add_argument("--skip-quant", action="store_true", help="leave out the quantized-base rows (bench_quant.py)")
    args = p.parse_args(argv)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    cache = str(out / "lora-cache")
    C.setup_threads(args.threads)
    t0 = time.perf_counter()
    parts = []
    info = C.machine_info()
    header = [
        "# lorablend benchmarks — CPU",
        "",
        f"Machine: {info['nproc']} cores ({info['cpu']}), torch threads {args.threads}, "
        f"MemAvailable at start {C.mem_available_gib():.1f} GiB. Versions: python {info['python']}, torch {info['torch']}, "
        f"diffusers {info['diffusers']}, peft {info['peft']}, transformers {info['transformers']}, "
        f"safetensors {info['safetensors']}.",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}` (cwd {Path.cwd()}).",
        "",
    ]
    if not args.skip_offline:  # first: fresh processes, before the runtime part fills memory
        import bench_offline

        parts.append(bench_offline.main(["--outdir", str(out)])["text"])
    if not args.skip_runtime:
        if args.model == "sdxl" and C.mem_available_gib() < 24:
            C.log(f"warning: SDXL fp32 needs ~21 GiB at peak; {C.mem_available_gib():.1f} GiB available")
        import bench_runtime

        rt = bench_runtime.main([
            "--model", args.model, "--latent", str(args.latent), "--threads", str(args.threads),
            "--repeats", str(args.repeats), "--cycles", str(args.cycles), "--outdir", str(out), "--cache", cache,
            "--profile",
        ])
        parts.append(rt["text"])
    if not args.skip_flux:
        import bench_flux

        # 2 fuse/unfuse cycles (the first shown apart) and 3 forward rounds: a real-width forward costs seconds
        # here and diffusers+PEFT's fuse / unfuse of 1.2 B touched weights about ten, so more would pass 5 minutes
        fx = bench_flux.main(["--model", "flux-small", "--threads", str(args.threads), "--outdir", str(out),
                              "--cache", cache, "--cycles", "2", "--repeats", "3"])
        parts.append(fx["text"])
    if not args.skip_quant:  # LoRAs on NF4 / int8 / fp8 / GGUF / torchao layers, and a real-width GGUF bake
        import bench_quant

        parts.append(bench_quant.run(["--threads", str(args.threads), "--tokens", "64", "--rounds", "3",
                                      "--no-mlp", "--bake"])["text"])
    if not args.skip_merge:
        import bench_merge

        mg = bench_merge.main(["--threads", str(args.threads), "--outdir", str(out), "--cache", cache,
                               "--repeats", "2", "--dense-repeats", "1"])
        parts.append(mg["text"])
    total = time.perf_counter() - t0
    text = "\n".join(header) + "\n" + "\n\n".join(parts) + f"\n\nTotal wall time: {total:.0f} s.\n"
    (out / "RESULTS-cpu.md").write_text(text)
    (out / "machine.json").write_text(json.dumps(info, indent=1))
    print(f"\nTotal wall time: {total:.0f} s. Tables in {out}/RESULTS-cpu.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
