"""The denoiser under torch.compile with LoRAs switching (static mode, ``compile_denoiser``), in one run.

Rows: the eager UNet forward (base, and with 2 LoRAs through the eager hooks), the compiled base forward
(``torch.compile`` of a copy of the plain UNet), the static-mode compiled forward with 0 and with 2 active LoRAs
(timed in turns with the compiled base, so that a shared machine's load falls on both alike), the
first call of each compiled form (compile time), the time of a switch (``set_adapters`` + writing the buffers)
over random mixes of 1-3 of 20 LoRAs of ranks 4-16 and two target sets, and the graphs, graph breaks and
recompiles dynamo counted after warm-up. Also the largest difference between the compiled and the eager output
for the same mix.

    python benchmarks/bench_compile.py --model tiny-sdxl --threads 2
    python benchmarks/bench_compile.py --model sd15 --latent 16 --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


def build(model: str, device: str, dtype: torch.dtype):
    from lorablend import DiffusionPipeline

    if model.startswith("tiny-"):
        from lorablend.fixtures.tiny_unets import tiny_pipeline

        pipe = tiny_pipeline(model.split("-", 1)[1], torch_dtype=dtype).to(device)
    else:
        unet, _ = C.build_unet(model, device, dtype)
        pipe = C.build_pipeline(model, unet, device, dtype)
    return DiffusionPipeline(pipe)


def inputs(unet, latent: int, batch: int, device: str, dtype: torch.dtype) -> dict:
    """One denoising step's inputs from the UNet's config (77 text tokens, SDXL's added conditions when used)."""
    cfg = unet.config
    gen = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    kw = {"sample": rnd(batch, cfg.in_channels, latent, latent),
          "timestep": torch.tensor([500] * batch, device=device),
          "encoder_hidden_states": rnd(batch, 77, cfg.cross_attention_dim)}
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        px = latent * 8
        time_ids = torch.tensor([[px, px, 0, 0, px, px]] * batch, device=device, dtype=dtype)
        kw["added_cond_kwargs"] = {"text_embeds": rnd(batch, text_dim), "time_ids": time_ids}
    return kw


def dynamo_counts() -> dict:
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def interleaved(fns: dict, rounds: int, before: dict | None = None) -> dict:
    """Median seconds of each callable, timed in turns (one call of each per round), so that load from other
    work on a shared machine falls on all of them alike. ``before[name]`` runs untimed before its call."""
    samples: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if before and name in before:
                before[name]()
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in samples.items()}


def run(args) -> dict:
    from lorablend.fixtures.tiny_unets import random_adapter
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    pipe = build(args.model, args.device, dtype)
    unet = pipe.unet
    base_unet = copy.deepcopy(unet)  # the plain UNet, compiled on its own for the "compiled base" rows
    names = []
    for i in range(args.adapters):
        adapter = random_adapter(pipe.pipe, f"lora{i}", rank=4 + 4 * (i % 4), seed=i, components=["unet"],
                                 targets="attn" if i % 2 else "all")
        pipe.load_lora_weights(adapter)
        names.append(adapter.name)
    kw = inputs(unet, args.latent, args.batch, args.device, dtype)

    def call(model):
        def forward():
            with torch.no_grad():
                out = model(**kw).sample
            C.sync(args.device)
            return out
        return forward

    base, ours = call(base_unet), call(unet)
    two = (names[1], names[2])  # an "attn" LoRA (rank 8) and an "all" one (rank 12)
    pipe.set_adapters(list(two), [0.8, 0.6])
    ours(), base()  # warm
    rows: dict = {}
    eager = interleaved({"eager_base_s": base, "eager_2_loras_s": ours}, args.repeats)
    rows.update(eager)
    eager_out = ours()

    torch._dynamo.reset()
    own_forward = base_unet.forward  # the original bound method: calling it stays eager

    def eager_base():
        with torch.no_grad():
            own_forward(**kw)
        C.sync(args.device)

    base_unet.forward = torch.compile(own_forward, backend=args.backend, fullgraph=True)
    rows["compile_base_first_call_s"], _ = C.once(base, args.device)
    counters.clear()
    t0 = time.perf_counter()
    static = pipe.compile_denoiser(max_rank=args.max_rank, backend=args.backend)
    rows["static_install_s"] = time.perf_counter() - t0
    rows["compile_static_first_call_s"], out = C.once(ours, args.device)
    rows["max_abs_diff_vs_eager"] = float((out - eager_out).abs().max())
    rows["output_max_abs"] = float(eager_out.abs().max())
    ours(), base()
    warm = dynamo_counts()

    def set_on():
        pipe.enable_lora()
        static.sync()

    def set_off():
        pipe.disable_lora()
        static.sync()

    rows.update(interleaved({"eager_base_in_turns_s": eager_base, "compiled_base_s": base,
                             "compiled_static_2_loras_s": ours,
                             "compiled_static_0_loras_s": ours}, args.repeats,
                            before={"compiled_static_2_loras_s": set_on, "compiled_static_0_loras_s": set_off}))
    pipe.enable_lora()
    switches = []
    rng = random.Random(0)
    for _ in range(args.switches):
        mix = rng.sample(names, rng.randint(1, 3))
        t0 = time.perf_counter()
        pipe.set_adapters(mix, [rng.uniform(0.2, 1.2) for _ in mix])
        static.sync()
        switches.append(time.perf_counter() - t0)
        with pipe.runtime.call_scale(rng.choice([1.0, 0.5])):
            ours()
    after = dynamo_counts()
    rows.update({
        "switch_median_s": statistics.median(switches), "switch_max_s": max(switches), "switches": len(switches),
        "static_graphs": warm["graphs"], "graph_breaks": after["graph_breaks"],
        "recompiles_during_switches": after["graphs"] - warm["graphs"], "capacity": static.capacity,
        "pair_layers": static.pair_layers, "dense_layers": len(static.layers) - static.pair_layers,
        "static_buffer_mib": static.memory() / 2**20,
    })
    rows["ratio_static_2_loras_vs_compiled_base"] = rows["compiled_static_2_loras_s"] / rows["compiled_base_s"]
    rows["ratio_compiled_base_vs_eager_base"] = rows["compiled_base_s"] / rows["eager_base_in_turns_s"]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny-sdxl", "tiny-sd1", "sd15", "sdxl"], default="tiny-sdxl")
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--batch", type=int, default=2, help="2: one image with classifier-free guidance")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--max-rank", type=int, default=64)
    p.add_argument("--adapters", type=int, default=20)
    p.add_argument("--switches", type=int, default=24)
    p.add_argument("--repeats", type=int, default=15, help="rounds of interleaved timing")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args()
    C.setup_threads(args.threads)
    C.quiet_libraries()
    rows = run(args)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": C.machine_info(), "rows": rows}
    for key, value in rows.items():  # (eager_base_s / eager_2_loras_s: in turns with each other, before compiling)
        print(f"{key:42s} {value * 1e3:10.2f} ms" if key.endswith("_s") else f"{key:42s} {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
