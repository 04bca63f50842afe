"""`lorablend sweep` over 1 and 2 workers: throughput, LoRA switches per cell (grouped by mix vs the naive order),
and what Ray adds per cell.

Models: the tiny SD1.5 test pipeline (32×32) and the real-size SD1.5 UNet with deterministic random weights from
the real config (bench_serve.sd15_model: a one-layer text encoder, the tiny VAE; a 16×16 latent, no CFG, so it runs
on a CPU), each saved to a folder once (workers load from it, as on a cluster). Two LoRA files, weights {0, 0.5, 1}
each (9 mixes) × prompts × seeds. Runs, one after the other, each into a fresh folder:

* `local` (1 worker in this process), `ray` with 1 worker, `ray` with 2 workers (one Ray instance for the whole
  benchmark, `num_cpus` = the largest worker count; every worker pinned to one thread by Ray's OMP_NUM_THREADS=1,
  and this process too, so one worker is one core everywhere).

Reported per run: wall seconds (from the run's start: actor start and pipeline load included), cells/s, the
seconds to the first cell written (start-up) and the cells/s after it (steady state), the cells' own compute time (switch + generate, summed over the manifest), and the rest per cell ((wall × workers −
compute) / cells: loading, Ray's start-up and transfers, the driver writing files). Ray's overhead per cell is
`ray 1 worker` minus `local` of that rest. Images of every run are compared with the local run's (max 8-bit diff).

    python benchmarks/bench_scale.py                         # tiny: 2 prompts × 2 seeds × 9 mixes; SD1.5: 1 × 2 × 9
    python benchmarks/bench_scale.py --skip-sd15 --seeds 4

Serving (tiny model): the same random-mix requests to the one-process server and to Ray Serve with 1 and 2
replicas: p50 latency with one client (Ray's per-request cost is the difference to local), images/s from
`--clients` threads, errors (must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one worker is one core, here as in a Ray actor

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPTS = ("a bowl of ramen", "a lighthouse at dusk", "a red fox in snow", "an ink drawing of a cat")


def model_folder(kind: str, out: Path) -> tuple[Path, list[Path], dict]:
    """The model saved as a pipeline folder (once) and two LoRA files; the generation settings for it."""
    import bench_serve as S

    folder = out / f"{kind}-model"
    pipe, lora_dir = (S.tiny_model if kind == "tiny" else S.sd15_model)(out, 2)
    if not (folder / "model_index.json").exists():
        pipe.save_pretrained(folder)
    loras = sorted(lora_dir.glob("*.safetensors"))[:2]
    settings = (dict(steps=2, width=32, height=32) if kind == "tiny" else
                dict(steps=1, width=32, height=32, guidance_scale=1.0))
    return folder, loras, settings


def one_run(spec, out: Path, engine: str, workers: int) -> dict:
    from lorablend.sweep import SweepRunSettings, run_sweep

    shutil.rmtree(out, ignore_errors=True)
    stamps: list[float] = []
    started = time.perf_counter()
    summary = run_sweep(spec, out, SweepRunSettings(engine=engine, workers=workers, device="cpu",
                                            on_cell=lambda line: stamps.append(time.perf_counter())))
    wall = time.perf_counter() - started
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    compute = sum(x["timings"]["switch"] + x["timings"]["generate"] for x in lines)
    switch_s = sum(x["timings"]["switch"] for x in lines)
    cells = len(lines)
    return {"engine": engine, "workers": workers, "cells": cells, "wall_s": round(wall, 2),
            "cells_per_s": round(cells / wall, 3), "compute_s": round(compute, 2),
            "start_s": round(stamps[0] - started, 2),  # to the first cell written: start-up and model load
            "steady_cells_per_s": round((cells - 1) / (stamps[-1] - stamps[0]), 3) if cells > 1 else None,
            "rest_per_cell_s": round((wall * workers - compute) / cells, 3), "switches": summary["switches"],
            "switch_s_mean": round(switch_s / max(1, summary["switches"]), 4),
            "switches_naive": summary["switches_naive"], "out": str(out)}


def max_diff(a: Path, b: Path) -> float:
    from PIL import Image

    worst = 0.0
    for line in (a / "manifest.jsonl").read_text().splitlines():
        file = json.loads(line)["file"]
        x = np.asarray(Image.open(a / file), dtype=np.int16)
        y = np.asarray(Image.open(b / file), dtype=np.int16)
        worst = max(worst, float(np.abs(x - y).max()))
    return worst


def bench_model(kind: str, args, out: Path) -> list[dict]:
    from lorablend.sweep import SweepSettings

    folder, loras, settings = model_folder(kind, out)
    seeds = list(range(args.seeds if kind == "tiny" else args.sd15_seeds))
    prompts = list(PROMPTS[: args.prompts if kind == "tiny" else 1])
    spec = SweepSettings(str(folder), [(str(p), p.stem) for p in loras], [0.0, 0.5, 1.0], prompts, seeds, **settings)
    rows = []
    for engine, workers in (("local", 1), ("ray", 1), ("ray", 2)):
        row = one_run(spec, out / f"{kind}-{engine}-{workers}", engine, workers)
        row["model"] = kind
        rows.append(row)
        print(json.dumps(row), flush=True)
    for row in rows[1:]:
        row["max_diff_vs_local_levels"] = max_diff(Path(rows[0]["out"]), Path(row["out"]))
    local, ray1 = rows[0], rows[1]
    rows.append({"model": kind, "ray_overhead_per_cell_s": round(ray1["rest_per_cell_s"] - local["rest_per_cell_s"], 3),
                 "speedup_2_vs_1_ray": round(rows[2]["cells_per_s"] / ray1["cells_per_s"], 2),
                 "switches_per_cell": round(local["switches"] / local["cells"], 3),
                 "switches_per_cell_naive": round(local["switches_naive"] / local["cells"], 3)})
    return rows


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(system: str, replicas: int, url: str, bodies: list[dict], warm: list[dict], clients: int) -> dict:
    """Sequential requests (one client: latency, Ray's per-request cost shows here), then all of them from
    `clients` threads (throughput)."""
    import bench_serve as S

    S.drive(url, warm, clients)
    one, _ = S.drive(url, bodies[:10], 1)
    many, wall = S.drive(url, bodies, clients)
    latencies = sorted(r["latency"] for r in one)
    return {"serve": system, "replicas": replicas, "requests": len(bodies), "clients": clients,
            "errors": sum(not r["ok"] for r in one + many), "p50_one_client_s": round(latencies[len(latencies) // 2], 3),
            "images_per_s": round(len(bodies) / wall, 3)}


def bench_serving(args, out: Path) -> list[dict]:
    """The same requests (random mixes of 1-3 of 6 LoRAs) to the one-process server, then to Ray with 1 and 2
    replicas (tiny model)."""
    import bench_serve as S
    from ray import serve

    from lorablend import DiffusionPipeline
    from lorablend.serve import ServeSettings, create_app
    from lorablend.serve.ray_app import RayServeSettings, deploy

    folder, _, _ = model_folder("tiny", out)
    _, lora_dir = S.tiny_model(out, 6)
    names = sorted(p.stem for p in lora_dir.glob("*.safetensors"))
    settings = {"steps": 2, "guidance_scale": 7.5, "width": 32, "height": 32}
    bodies, warm = S.make_requests(names, args.requests, 1, settings), S.warmup_requests(names, settings)
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    server, thread, url = S.start(create_app(pipe, ServeSettings(lora_dir=lora_dir)))
    rows = [measure("local", 1, url, bodies, warm, args.clients)]
    server.should_exit = True
    thread.join()
    for replicas in (1, 2):
        port = free_port()
        deploy(str(folder), ServeSettings(lora_dir=lora_dir), RayServeSettings(replicas=replicas, device="cpu"),
               port=port, blocking=False)
        try:
            rows.append(measure("ray", replicas, f"http://127.0.0.1:{port}", bodies, warm, args.clients))
        finally:
            serve.shutdown()
        print(json.dumps(rows[-1]), flush=True)
    rows.append({"serve": "ray overhead per request (one client, p50)",
                 "seconds": round(rows[1]["p50_one_client_s"] - rows[0]["p50_one_client_s"], 3)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench-output/scale", help="work folder (models, LoRAs, sweeps)")
    p.add_argument("--prompts", type=int, default=2, help="tiny model: prompts (default 2)")
    p.add_argument("--seeds", type=int, default=2, help="tiny model: seeds (default 2)")
    p.add_argument("--sd15-seeds", type=int, default=2, help="SD1.5: seeds (default 2; one prompt)")
    p.add_argument("--skip-sd15", action="store_true", help="only the tiny model")
    p.add_argument("--skip-serve", action="store_true", help="no serving measurements")
    p.add_argument("--requests", type=int, default=40, help="serving: requests (default 40)")
    p.add_argument("--clients", type=int, default=4, help="serving: client threads (default 4)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args()
    import ray

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = bench_model("tiny", args, out)
        if not args.skip_sd15:
            rows += bench_model("sd15", args, out)
        if not args.skip_serve:
            rows += bench_serving(args, out)
    finally:
        ray.shutdown()
    for row in rows:
        print(json.dumps({k: v for k, v in row.items() if k != "out"}))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
