"""`lorablend serve` under load vs a server that loads LoRAs per request the diffusers way, on loopback.

For each model (the tiny SD1.5 test pipeline; the real-size SD1.5 UNet with deterministic random weights from the
real config, a 16×16 latent so that it runs on a CPU), 20 LoRA files of ranks 4–32, and a list of requests with
random mixes of 1–3 of them (random weights and seeds; the same list for both systems), 8 client threads send
the requests over HTTP as fast as the server answers. Two servers, each in its own subprocess, one after the other:

* **lorablend**: `lorablend.serve.create_app` (one pipeline, the adapter cache, any mixes in one batch through
  per-sample LoRA weights, switching through the unfused runtime; nothing reloaded once cached).
* **lorablend, per-mix batches**: the same server with `mixed_batches=False`: only requests with equal mixes share a
  batch (the server before issue 20).
* **diffusers per request**: a plain diffusers pipeline behind the same JSON route that, per request, does
  `load_lora_weights(file, adapter_name=...)` for each LoRA of the mix, `set_adapters(names, weights)`, generates,
  then `unload_lora_weights()` (PEFT injection and removal each time): what a server without an adapter runtime does.

Both generate from the same seeded numpy noise. Reported per system: errors (must be 0), p50 / p99 request latency
(client side, queueing included), switch latency (lorablend: load-if-missing + set_adapters + rebuilding the blended
terms, per batch; baseline: the loads + set_adapters + unload per request), throughput (images/s over the measured
phase), RSS growth of the server process from after the warm-up (one pass that touches every LoRA) to the end, and
the largest pixel difference between the two systems' images of the same request (8-bit levels).

Then the cost of mixing inside one batch, in-process on the same pipeline: one call of B images with B different
mixes (`LoraRuntime.call_sample_weights`, the union of their LoRAs set at weight 1) against B images of one mix (the
mean over the B mixes: the issue's target, ≤ 1.15× at B = 4 on CPU), B one-image calls (per-mix batching when mixes
never repeat), B images of the first mix only, and the union as one mix; medians of `--repeat`, wall and CPU seconds.

    python benchmarks/bench_serve.py --system batchcost --model sd15 --latent 32 --repeat 3   # that table alone

    python benchmarks/bench_serve.py                                  # defaults: a few minutes on 2 CPU cores
    python benchmarks/bench_serve.py --requests 200 --sd15-requests 200 --threads 2
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

RANKS = (4, 8, 16, 32)
PROMPTS = ("a bowl of ramen", "a lighthouse at dusk", "a red fox in snow", "an ink drawing of a cat")


# ============================================================================ models and LoRA files


def tiny_model(out: Path, n_loras: int) -> tuple[object, Path]:
    """The tiny SD1.5 pipeline and `n_loras` LoRA files for it (every Linear/Conv or attention only)."""
    from lorablend.fixtures.tiny_unets import random_adapter, tiny_pipeline
    from lorablend.io import save_adapter

    pipe = tiny_pipeline("sd1")
    folder = out / "tiny-loras"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_loras):
        path = folder / f"lora{i:02d}.safetensors"
        if not path.exists():
            adapter = random_adapter(pipe, f"lora{i:02d}", rank=RANKS[i % len(RANKS)], seed=100 + i,
                                     targets="attn" if i % 2 else "all")
            save_adapter(adapter, path, format="kohya", target=pipe)
    return pipe, folder


def sd15_model(out: Path, n_loras: int) -> tuple[object, Path]:
    """The real-size SD1.5 UNet (common.build_unet) in a pipeline with a one-layer 768-wide text encoder (the UNet's
    cross-attention width), the tiny VAE and a DDIM scheduler; LoRA files over its attention layers."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from lorablend.fixtures.tiny_unets import CLIP_TEXT, VAE, tiny_tokenizer

    unet, _ = C.build_unet("sd15", "cpu", torch.float32)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(**{**CLIP_TEXT, "hidden_size": 768, "intermediate_size": 768,
                                           "num_attention_heads": 12, "num_hidden_layers": 1, "projection_dim": 768}))
    sched = DDIMScheduler.from_config(json.loads(
        (C.CONFIGS / C.MODEL_DIRS["sd15"] / "scheduler" / "scheduler_config.json").read_text()))
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**VAE), text_encoder=text, tokenizer=tiny_tokenizer(), unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    targets = [(name, tuple(mod.weight.shape)) for name, mod in C.target_modules(unet)]
    specs = [(f"L{i:02d}", "kohya", RANKS[i % len(RANKS)], float(RANKS[i % len(RANKS)]) / 2) for i in range(n_loras)]
    files = C.lora_files(out / "sd15-loras-cache", "sd15", targets, specs)
    folder = out / "sd15-loras"
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in files.items():  # served by stem: one short name per file; a hard link (the server refuses
        link = folder / f"{name}.safetensors"  # symlinks that lead out of --lora-dir)
        if not link.exists():
            try:
                os.link(path, link)
            except OSError:
                shutil.copyfile(path, link)
    return pipe, folder


# ============================================================================ requests and clients


def make_requests(names: list[str], n: int, seed: int, settings: dict) -> list[dict]:
    """`n` request bodies: 1–3 LoRAs each, weights in [0.3, 1.2], a random seed and prompt."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        mix = {name: round(rng.uniform(0.3, 1.2), 2) for name in rng.sample(names, rng.randint(1, 3))}
        out.append({"prompt": rng.choice(PROMPTS), "loras": mix, "seed": rng.randrange(2**31),
                    "response_format": "json", **settings})
    return out


def warmup_requests(names: list[str], settings: dict) -> list[dict]:
    """One pass that touches every LoRA (three per request)."""
    return [{"prompt": PROMPTS[0], "loras": {n: 0.5 for n in names[i:i + 3]}, "seed": i, "response_format": "json",
             **settings} for i in range(0, len(names), 3)]


def drive(url: str, bodies: list[dict], clients: int) -> tuple[list[dict], float]:
    """Send every body from `clients` threads; per request: status, latency, timings, first image; and the wall."""
    import httpx

    lock, queue, results = threading.Lock(), list(enumerate(bodies)), [None] * len(bodies)

    def client() -> None:
        with httpx.Client(base_url=url, timeout=3600) as http:
            while True:
                with lock:
                    if not queue:
                        return
                    i, body = queue.pop(0)
                t0 = time.perf_counter()
                try:
                    r = http.post("/v1/images", json=body)
                    ok = r.status_code == 200
                    data = r.json() if ok else {"detail": r.text[:300]}
                except Exception as exc:  # noqa: BLE001 - every failure is an error row
                    ok, data = False, {"detail": repr(exc)}
                results[i] = {"ok": ok, "latency": time.perf_counter() - t0, "timings": data.get("timings", {}),
                              "image": (data.get("images") or [None])[0], "detail": data.get("detail")}

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for _ in range(clients):
            pool.submit(client)
    return results, time.perf_counter() - started


# ============================================================================ the two servers


def baseline_app(pipe, lora_dir: Path):
    """The diffusers-way server: one lock, and per request load → set_adapters → generate → unload."""
    from fastapi import FastAPI

    app, lock = FastAPI(), threading.Lock()

    def run(body: dict) -> dict:
        names = sorted(body["loras"])
        with lock:
            t0 = time.perf_counter()
            for name in names:
                pipe.load_lora_weights(str(lora_dir / f"{name}.safetensors"), adapter_name=name)
            pipe.set_adapters(names, adapter_weights=[body["loras"][n] for n in names])
            t1 = time.perf_counter()
            image = generate(pipe, body)
            t2 = time.perf_counter()
            pipe.unload_lora_weights()
            t3 = time.perf_counter()
        return {"images": [image], "timings": {"switch": (t1 - t0) + (t3 - t2), "generate": t2 - t1}}

    @app.post("/v1/images")
    def images(body: dict) -> dict:  # a plain def: FastAPI runs it in its thread pool
        return run(body)

    return app


def generate(pipe, body: dict) -> str:
    """One image from the body's seed, the same numpy noise lorablend draws; base64 PNG."""
    from PIL import Image

    scale = pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, body["height"] // scale, body["width"] // scale)
    latents = torch.from_numpy(np.random.Generator(np.random.PCG64(body["seed"])).standard_normal(shape))
    out = pipe(body["prompt"], latents=latents.to(pipe.unet.dtype), num_inference_steps=body["steps"],
               guidance_scale=body["guidance_scale"], width=body["width"], height=body["height"],
               output_type="np").images[0]
    buffer = io.BytesIO()
    Image.fromarray((out * 255).round().astype("uint8")).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def start(app) -> tuple[object, threading.Thread, str]:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


# ============================================================================ one system, in its own process


def child(args) -> dict:
    C.setup_threads(args.threads)
    C.quiet_libraries()
    out = Path(args.out)
    build = tiny_model if args.model == "tiny" else sd15_model
    pipe, lora_dir = build(out, args.loras)
    names = sorted(p.stem for p in lora_dir.glob("*.safetensors"))
    settings = ({"steps": args.steps, "guidance_scale": 7.5, "width": 32, "height": 32} if args.model == "tiny" else
                {"steps": args.sd15_steps, "guidance_scale": args.sd15_guidance, "width": args.latent * 2,
                 "height": args.latent * 2})  # the tiny VAE scales by 2: a 16×16 latent is a 32×32 image
    if args.system == "batchcost":
        return batch_cost(pipe, lora_dir, names, settings, args)
    if args.system in ("ours", "permix"):
        from lorablend import DiffusionPipeline
        from lorablend.serve import ServeSettings, create_app

        app = create_app(DiffusionPipeline(pipe), ServeSettings(lora_dir=lora_dir, max_batch=args.max_batch,
                                                                cache_bytes=args.cache_bytes,
                                                                mixed_batches=args.system == "ours"))
    else:
        app = baseline_app(pipe, lora_dir)
    server, thread, url = start(app)
    warm, _ = drive(url, warmup_requests(names, settings), args.clients)
    rss_warm = C.Memory.rss_gib()
    n = args.requests if args.model == "tiny" else args.sd15_requests
    results, wall = drive(url, make_requests(names, n, args.seed, settings), args.clients)
    rss_end = C.Memory.rss_gib()
    server.should_exit = True
    thread.join()
    return {"results": results, "warm_errors": sum(not r["ok"] for r in warm), "wall": wall,
            "rss_warm_gib": rss_warm, "rss_end_gib": rss_end, "settings": settings, "loras": len(names)}


def batch_cost(pipe, lora_dir: Path, names: list[str], settings: dict, args) -> dict:
    """Seconds of one B-image call with B different mixes, against: B images of the FIRST mix (its rank only: the
    row kept from before), B images of ONE mix averaged over the B mixes (the fair "B mixes vs B images of one mix":
    the mix drawn from the same distribution), B one-image calls, one per mix (what per-mix batching pays when mixes
    never repeat), and B images of the union of the mixes as one mix (the same low-rank work without per-sample
    weights). Medians of ``--repeat`` interleaved rounds; wall and this process's CPU seconds."""
    from lorablend import DiffusionPipeline

    ours = DiffusionPipeline(pipe)
    ours.set_progress_bar_config(disable=True)
    for name in names:
        ours.load_lora_weights(str(lora_dir / f"{name}.safetensors"), adapter_name=name)
    b = args.max_batch
    mixes = [body["loras"] for body in make_requests(names, b, args.seed + 1, settings)]
    union = sorted({n for m in mixes for n in m})
    kw = dict(num_inference_steps=settings["steps"], guidance_scale=settings["guidance_scale"],
              width=settings["width"], height=settings["height"], output_type="np")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]

    def seeds(n: int = b, first: int = 0) -> list:
        return [np.random.Generator(np.random.PCG64(first + i)) for i in range(n)]

    def set_mix(mix: dict) -> None:
        ours.set_adapters(list(mix), list(mix.values()))
        ours.prepare()

    def mixed() -> None:
        with ours.runtime.call_sample_weights(mixes):
            ours(prompts, generator=seeds(), **kw)

    labels = ["one_mix", "same_mix", "singles", "union", "mixed"]
    times: dict[str, list] = {k: [] for k in labels}
    cpu: dict[str, list] = {k: [] for k in labels}

    def timed(call) -> tuple[float, float]:
        # wall time, and this process's CPU time: on a machine shared with other work the CPU seconds move
        # less with the others' load than the wall seconds do
        w0, c0 = time.perf_counter(), time.process_time()
        call()
        return time.perf_counter() - w0, time.process_time() - c0

    def record(label: str, wall_cpu: tuple[float, float]) -> None:
        times[label].append(wall_cpu[0])
        cpu[label].append(wall_cpu[1])

    for _ in range(args.repeat):  # interleaved, so that the machine's drift falls on all alike
        same, single = [], []
        for i, mix in enumerate(mixes):
            set_mix(mix)
            if i == 0:
                record("one_mix", timed(lambda: ours(prompts, generator=seeds(), **kw)))
                same.append((times["one_mix"][-1], cpu["one_mix"][-1]))
            else:
                same.append(timed(lambda: ours(prompts, generator=seeds(), **kw)))
            single.append(timed(lambda i=i: ours(prompts[i], generator=seeds(1, i), **kw)))
        record("same_mix", tuple(float(np.mean(v)) for v in zip(*same)))
        record("singles", tuple(float(np.sum(v)) for v in zip(*single)))
        set_mix({n: 1.0 for n in union})
        record("mixed", timed(mixed))
        record("union", timed(lambda: ours(prompts, generator=seeds(), **kw)))  # (one mix for every image)
    return {"batch": b, "union": len(union), "mix_sizes": [len(m) for m in mixes], "repeat": args.repeat,
            "latent": None if args.model == "tiny" else args.latent,
            "wall": {k: float(np.median(v)) for k, v in times.items()},
            "cpu": {k: float(np.median(v)) for k, v in cpu.items()}}


def cost_rows(model: str, cost: dict) -> list[list[str]]:
    """The batch-cost table's two rows of one model (wall, CPU): the seconds, then the mixed call over each."""
    rows = []
    for unit in ("wall", "cpu"):
        t = cost[unit]
        rows.append([model, unit, str(cost["batch"]), str(cost["union"])]
                    + [C.fmt_s(t[k]) for k in ("one_mix", "same_mix", "singles", "union", "mixed")]
                    + [f"{t['mixed'] / t[k]:.2f}x" for k in ("same_mix", "singles", "one_mix", "union")])
    return rows


COST_HEADERS = ["model", "seconds", "B", "LoRAs in the union", "first mix only (B images)",
                "one mix, mean of the B mixes (B images)", "B one-image calls", "union as one mix", "B mixes",
                "B mixes / one mix (mean)", "B mixes / B one-image calls", "B mixes / first mix only",
                "B mixes / union"]


# ============================================================================ the table


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def image_diff(a: list[dict], b: list[dict]) -> float:
    """Largest per-pixel difference between the two systems' images of the same request, in 8-bit levels."""
    from PIL import Image

    worst = 0.0
    for x, y in zip(a, b):
        if x["image"] and y["image"]:
            ix, iy = (np.asarray(Image.open(io.BytesIO(base64.b64decode(r["image"]))), np.float32) for r in (x, y))
            worst = max(worst, float(np.abs(ix - iy).max()))
    return worst


def row(model: str, label: str, data: dict) -> list[str]:
    res = data["results"]
    lat = [r["latency"] for r in res if r["ok"]]
    switch = [r["timings"].get("switch", float("nan")) for r in res if r["ok"]]
    errors = sum(not r["ok"] for r in res) + data["warm_errors"]
    growth = (data["rss_end_gib"] - data["rss_warm_gib"]) * 1024
    return [model, label, str(len(res)), str(errors), C.fmt_s(pct(lat, 50)), C.fmt_s(pct(lat, 99)),
            C.fmt_s(pct(switch, 50)), C.fmt_s(pct(switch, 99)), f"{len(lat) / data['wall']:.2f}", f"{growth:+.0f} MiB"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,sd15", help="comma-separated: tiny, sd15 (default both)")
    p.add_argument("--requests", type=int, default=48, help="measured requests on the tiny model (default 48)")
    p.add_argument("--sd15-requests", type=int, default=16, help="measured requests on SD1.5 (default 16)")
    p.add_argument("--clients", type=int, default=8, help="concurrent client threads (default 8)")
    p.add_argument("--loras", type=int, default=20, help="LoRA files (default 20)")
    p.add_argument("--steps", type=int, default=2, help="tiny model: inference steps (default 2)")
    p.add_argument("--sd15-steps", type=int, default=1, help="SD1.5: inference steps (default 1)")
    p.add_argument("--sd15-guidance", type=float, default=1.0, help="SD1.5: guidance scale (default 1: no CFG)")
    p.add_argument("--latent", type=int, default=16, help="SD1.5 latent side (default 16)")
    p.add_argument("--max-batch", type=int, default=4, help="lorablend's --max-batch (default 4)")
    p.add_argument("--cache-bytes", type=int, default=4 * 2**30, help="lorablend's --cache-bytes (default 4 GiB)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=5, help="calls per side of the batch-cost comparison (default 5)")
    p.add_argument("--out", default=str(C.REPO / "bench-output" / "serve"), help="LoRA files and results go here")
    p.add_argument("--system", choices=["ours", "permix", "baseline", "batchcost"],
                   help="run one part alone, e.g. batchcost (the batch-cost table of --model)")
    p.add_argument("--model", choices=["tiny", "sd15"], help="with --system batchcost: the model")
    args = p.parse_args(argv)
    if args.system:
        result = child(args)
        if args.system == "batchcost":  # run alone: the table on stderr too (stdout's last line stays the JSON)
            C.log(C.table(COST_HEADERS, cost_rows(args.model, result)))
        print(json.dumps(result))
        return 0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows, raw, costs = [], {}, []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        runs = {}
        for system in ("ours", "permix", "baseline", "batchcost"):
            C.log(f"bench_serve: {model} / {system} ...")
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--system", system,
                   "--model", model]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                C.log(done.stderr[-3000:])
                raise SystemExit(f"bench_serve: the {system} server on {model} failed")
            runs[system] = json.loads(done.stdout.strip().splitlines()[-1])
        cost = runs.pop("batchcost")
        costs.extend(cost_rows(model, cost))
        raw[model] = {**runs, "batchcost": cost}
        rows.append(row(model, "lorablend serve (any mix per batch)", runs["ours"]) + ["—"])
        rows.append(row(model, "lorablend serve, per-mix batches", runs["permix"]))
        rows[-1].append(f"{image_diff(runs['ours']['results'], runs['permix']['results']):.0f}")
        rows.append(row(model, "diffusers, load per request", runs["baseline"]))
        rows[-1].append(f"{image_diff(runs['ours']['results'], runs['baseline']['results']):.0f}")
    headers = ["model", "server", "requests", "errors", "p50", "p99", "switch p50", "switch p99", "images/s",
               "RSS growth", "max diff vs any-mix (levels)"]
    info = C.machine_info()
    print(f"CPU: {info['cpu']} ({info['nproc']} cores, {args.threads} torch threads); {args.clients} clients, "
          f"{args.loras} LoRAs (ranks {'/'.join(map(str, RANKS))}), mixes of 1-3; loopback\n")
    print(C.table(headers, rows))
    print("\nOne batch of B different mixes vs B images of one mix (same pipeline, in-process, median):\n")
    print(C.table(COST_HEADERS, costs))
    (Path(args.out) / "results.json").write_text(json.dumps(
        {m: {s: {k: v for k, v in d.items() if k != "results"} for s, d in r.items()} for m, r in raw.items()},
        indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
