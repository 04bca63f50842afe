"""lorablend vs diffusers + PEFT on a Flux.1 transformer at the real width, with kohya sd-scripts LoRA files.

The model is FLUX.1-dev's transformer (``FluxTransformer2DModel``, the real config numbers below: 3072 wide, 24
heads × 128, mlp 12288) with deterministic random weights (``common.Pool``), inside a ``FluxPipeline`` whose text
encoders and VAE are the tiny ones of ``lorablend.fixtures.tiny_transformers`` (never run: the transformer is timed
directly with random text states and pooled projections, as ``bench_runtime`` times ``pipe.unet``).
``--model flux`` is the whole transformer (19 double + 38 single blocks: 11.9 B weights, for a GPU in bf16);
``--model flux-small`` keeps the real width with 2 double + 4 single blocks (1.31 B weights: 4.9 GiB in fp32,
which a shared 2-core / 23 GiB machine can hold next to lorablend's pristine copies while fused).

The LoRA files have the real kohya sd-scripts Flux layout at rank 16 (BFL names, as in a real Civitai file:
``lora_unet_double_blocks_N_img_attn_qkv`` = one LoRA over the fused q/k/v rows, ``…_img_mlp_0``, ``…_img_mod_lin``,
``lora_unet_single_blocks_N_linear1`` = q/k/v/mlp rows, ``…_linear2``, ``…_modulation_lin``; alpha 8, bf16), for
the blocks that exist. diffusers reads them through its own converter (``pipe.load_lora_weights(path)``:
``_convert_kohya_flux_lora_to_diffusers``, which splits the fused rows at the real widths) and PEFT.

Each system runs in its own subprocess (one after the other), then a third process times the floors on the same
model and files (``floor.py``): ``load_file`` + one copy, and one plain ``addmm(W0, U, D)`` per touched weight
(the q/k/v and mlp weights under a fused kohya LoRA each get their rows of ``up``). Rows: first load (fresh
process), later loads, set_adapters, fuse 2 adapters (first, later), unfuse (restore bit-exact?), the transformer
forward with 1 and 2 unfused adapters against the disabled base (interleaved rounds).

    python benchmarks/bench_flux.py --model flux-small --threads 2                      # CPU (make bench)
    python benchmarks/bench_flux.py --model flux --device cuda --dtype bfloat16 --resolution 1024
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

# FLUX.1-dev's transformer/config.json (../shared/realdata/configs/flux1-dev), copied: a bench machine may lack it.
FLUX1_DEV = {
    "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": True, "in_channels": 64,
    "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38,
    "patch_size": 1, "pooled_projection_dim": 768,
}
BLOCKS = {"flux": (19, 38), "flux-small": (2, 4)}  # (double, single) blocks at the real width
KEYLIST = C.REALDATA / "newfamily_loras" / "keylists_invokeai" / "flux_lora_kohya_format.json"
# kohya (BFL) module → the diffusers modules whose weights are its rows, in row order
DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",), "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",), "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
          "modulation_lin": ("norm.linear",)}
FILES = ["A", "B", "C", "D"]  # A, B: the blended / fused pair; C, D: more loads for the median
WEIGHTS = [0.7, 0.8]


def flux_config(model: str, double: int | None = None, single: int | None = None) -> dict:
    d, s = BLOCKS[model]
    return {**FLUX1_DEV, "num_layers": d if double is None else double,
            "num_single_layers": s if single is None else single}


def meta_transformer(cfg: dict):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(cfg)


def kohya_layout(transformer) -> list[tuple[str, list[tuple[str, tuple]]]]:
    """[(kohya module name, [(diffusers module path, weight shape), …] in row order)] for every block there is."""
    out = []
    for prefix, parts, count in (("double_blocks", DOUBLE, transformer.config.num_layers),
                                 ("single_blocks", SINGLE, transformer.config.num_single_layers)):
        block = "transformer_blocks" if prefix == "double_blocks" else "single_transformer_blocks"
        for i in range(count):
            for part, modules in parts.items():
                paths = [f"{block}.{i}.{m}" for m in modules]
                out.append((f"lora_unet_{prefix}_{i}_{part}",
                            [(p, tuple(transformer.get_submodule(p).weight.shape)) for p in paths]))
    return out


def check_keylist(rank: int) -> str:
    """Our names and shapes for the whole FLUX.1-dev transformer against the real file's key list, where present."""
    if not KEYLIST.exists():
        return "real key list not present (../shared): names and shapes not checked against it"
    real = json.loads(KEYLIST.read_text())["state_dict_shapes"]
    ours = {}
    for name, mods in kohya_layout(meta_transformer(FLUX1_DEV)):
        ours[f"{name}.alpha"] = []
        ours[f"{name}.lora_down.weight"] = [rank, mods[0][1][1]]
        ours[f"{name}.lora_up.weight"] = [sum(s[0] for _, s in mods), rank]
    if ours != real:
        missing, extra = sorted(set(real) - set(ours))[:5], sorted(set(ours) - set(real))[:5]
        raise SystemExit(f"kohya layout differs from {KEYLIST.name}: missing {missing}, extra {extra}")
    return f"names and shapes = {KEYLIST.name} ({len(real)} keys) for the whole FLUX.1-dev transformer"


def write_kohya_flux(path: Path, name: str, layout, rank: int, alpha: float, dtype=torch.bfloat16) -> None:
    from safetensors.torch import save_file

    pool, sd = C._lora_pool(), {}
    for key, mods in layout:
        shape = (sum(s[0] for _, s in mods), mods[0][1][1])
        down, up = C.lora_tensors(pool, name, key, shape, rank)
        sd[f"{key}.lora_down.weight"] = down.to(dtype)
        sd[f"{key}.lora_up.weight"] = up.to(dtype)
        sd[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
                                      "ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux"})
    os.replace(tmp, path)


def prepare_files(args) -> Path:
    layout = kohya_layout(meta_transformer(flux_config(args.model, args.double, args.single)))
    note = check_keylist(args.rank)
    C.log(f"kohya-Flux layout: {note}")
    cfg = flux_config(args.model, args.double, args.single)
    folder = Path(args.cache) / f"flux-d{cfg['num_layers']}-s{cfg['num_single_layers']}"
    files = {}
    for name in FILES:
        path = folder / f"{name}-kohya-r{args.rank}-a{args.rank / 2:g}.safetensors"
        if not path.exists():
            write_kohya_flux(path, name, layout, args.rank, args.rank / 2)
        files[name] = str(path)
    out = Path(args.outdir) / "flux-files.json"
    out.write_text(json.dumps({"files": files, "keylist": note}, indent=1))
    return out


# ============================================================================ the model


@torch.no_grad()
def build_model(args, out: dict):
    """(transformer, its weight pool, the FluxPipeline around it, touched weights [(path, shape)], layout)."""
    from diffusers import FluxPipeline

    from lorablend.fixtures.tiny_transformers import tiny_flux_pipeline

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    t0 = time.perf_counter()
    transformer = meta_transformer(flux_config(args.model, args.double, args.single))
    transformer = transformer.to(dtype).to_empty(device=device)  # cast on meta: no fp32 copy of a bf16 model
    pool = C.Pool(args.seed, device)
    for name, p in transformer.named_parameters():
        C._fill_param(pool, name, p.data)
    transformer.eval().requires_grad_(False)
    components = dict(tiny_flux_pipeline().components)  # tiny CLIP-L, T5, VAE: never run here
    components["transformer"] = transformer
    pipe = FluxPipeline(**components)
    out["build_s"] = time.perf_counter() - t0
    layout = kohya_layout(transformer)
    targets = [m for _, mods in layout for m in mods]
    out["touched_layers"] = len(targets)
    out["touched_weights"] = sum(torch.Size(s).numel() for _, s in targets)
    out["params"] = sum(p.numel() for p in transformer.parameters())
    return transformer, pool, pipe, targets, layout


def flux_inputs(transformer, args) -> dict:
    """One denoising step's inputs: ``resolution``² px = (resolution/16)² packed latent tokens of 64 channels."""
    from diffusers import FluxPipeline

    cfg, device, dtype = transformer.config, torch.device(args.device), getattr(torch, args.dtype)
    side = args.resolution // 16  # VAE /8, then 2×2 patches packed into one token
    gen = torch.Generator(device="cpu").manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    b = args.batch
    return {
        "hidden_states": rnd(b, side * side, cfg.in_channels),
        "encoder_hidden_states": rnd(b, args.text_tokens, cfg.joint_attention_dim),
        "pooled_projections": rnd(b, cfg.pooled_projection_dim),
        "timestep": torch.full((b,), 0.5, device=device, dtype=dtype),
        "img_ids": FluxPipeline._prepare_latent_image_ids(b, side, side, device, dtype),
        "txt_ids": torch.zeros(args.text_tokens, 3, device=device, dtype=dtype),
        "guidance": torch.full((b,), 3.5, device=device, dtype=dtype) if cfg.guidance_embeds else None,
        "return_dict": False,
    }


# ============================================================================ the two systems


class Theirs:
    label = "diffusers+PEFT"

    def __init__(self, pipe, args) -> None:
        import peft.tuners.lora  # noqa: F401  (imports out of the timed region)

        self.pipe, self.wrap_s = pipe, None

    def settle(self) -> None:
        """diffusers + PEFT does its work inside each call."""


class Ours:
    label = "lorablend"

    def __init__(self, pipe, args) -> None:
        import lorablend
        import lorablend.io  # noqa: F401

        t0 = time.perf_counter()
        self.pipe = lorablend.DiffusionPipeline(pipe, pristine_device=args.pristine_device)
        self.wrap_s = time.perf_counter() - t0

    def settle(self) -> None:
        """lorablend may defer rebuilding blended terms to the next forward: do it now, inside the clock."""
        self.pipe.prepare()


def run_system(args) -> dict:
    import bench_runtime as R

    C.setup_threads(args.threads)
    C.quiet_libraries()
    device = torch.device(args.device)
    files = json.loads(Path(args.files).read_text())["files"]
    out: dict = {"system": args.system, "times": {}, "errors": {}}
    T = out["times"]
    mem = C.Memory(device)
    transformer, pool, pipe, targets, _ = build_model(args, out)
    mem.mark("model built")
    kw = flux_inputs(transformer, args)

    def forward():
        with torch.no_grad():
            return transformer(**kw)[0]

    # the reference only (the overheads divide by the interleaved disabled forwards): few calls, as each costs seconds
    T["forward_base"] = C.timed(forward, device, repeats=max(1, args.repeats // 2), warmup=1)
    base_out = forward().float().cpu()
    try:
        system = {"ours": Ours, "theirs": Theirs}[args.system](pipe, args)
    except Exception as e:  # noqa: BLE001 - a missing library part is a table entry, not a crash
        out["unavailable"] = f"{type(e).__name__}: {e}"
        return out
    out["wrap_s"] = system.wrap_s
    p = system.pipe

    def step(name, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - recorded, and the run goes on
            out["errors"][name] = f"{type(e).__name__}: {e}"
            C.log(f"[{args.system}] {name} failed:\n{traceback.format_exc()}")

    def loads():  # the first load of a freshly built (and wrapped) pipeline, then the others
        rows = [C.once_row(lambda: p.load_lora_weights(files[n], adapter_name=n), device)[0] for n in FILES]
        T["load_first"] = rows[0]
        out["load_samples"] = dict(zip(FILES, rows))
        import floor

        T["load_later"] = floor.median_row(rows[1:])

    step("load", loads)
    mem.mark(f"{len(FILES)} LoRAs loaded")
    flip = [0]

    def set_two():
        flip[0] ^= 1  # alternate the weights so that nothing can be skipped as unchanged
        p.set_adapters(FILES[:2], adapter_weights=WEIGHTS if flip[0] else [0.6, 0.9])

    def set_adapters():
        T["set_adapters"] = C.timed(set_two, device, repeats=args.set_repeats)
        T["set_adapters_settled"] = C.timed(lambda: (set_two(), system.settle()), device, repeats=args.set_repeats)

    step("set_adapters", set_adapters)

    def fuse_cycles():
        p.set_adapters(FILES[:2], adapter_weights=WEIGHTS)
        fus, unf = [], []
        for i in range(args.cycles):
            rss0 = C.Memory.rss_gib()
            fus.append(C.once_row(lambda: (p.fuse_lora(components=["transformer"], lora_scale=1.0,
                                                       adapter_names=FILES[:2]), system.settle()), device)[0])
            if i == 0:
                out["fuse_extra_rss_gib"] = C.Memory.rss_gib() - rss0
                mem.mark("fused (2 adapters)")
                torch.save(forward().float().cpu(), Path(args.outdir) / f"flux-{args.system}-out-fused2.pt")
            unf.append(C.once_row(lambda: (p.unfuse_lora(components=["transformer"]), system.settle()), device)[0])
            if i == 0:
                out["restore_after_1"] = R.restore_error(transformer, pool, targets)
        import floor

        T["fuse_first"], T["unfuse_first"] = fus[0], unf[0]
        if len(fus) > 1:
            T["fuse_later"], T["unfuse_later"] = floor.median_row(fus[1:]), floor.median_row(unf[1:])
        out["restore_after_cycles"] = R.restore_error(transformer, pool, targets)
        mem.mark("after fuse/unfuse cycles")

    step("fuse", fuse_cycles)

    def forwards():
        # Rounds alternate the settings so that drift in machine load hits each alike; the overhead of a setting
        # is the median over rounds of t_k / t_off of the same round (PEFT's disabled base still runs its wrappers).
        # No warm-up forward per state change (a real-width forward costs seconds on a CPU): settle() does
        # lorablend's deferred rebuild out of the clock instead (and frees the fuse buffers an unfuse holds until
        # the next forward, as a forward would).
        settings = ["off", 1, 2]
        samples = {k: [] for k in settings}
        last = None
        for _ in range(args.repeats):
            for k in settings:
                if k == "off":
                    p.disable_lora()
                else:
                    p.enable_lora()
                    p.set_adapters(FILES[:k], adapter_weights=WEIGHTS[:k])
                system.settle()
                dt, last = C.once(forward, device)
                samples[k].append(dt)
        for k in settings:
            T[f"forward_{k}"] = {"median": statistics.median(samples[k]), "samples": samples[k]}
        for k in (1, 2):
            out[f"overhead_{k}"] = statistics.median(a / b for a, b in zip(samples[k], samples["off"])) - 1
        # the last timed call ran with 2 adapters unfused (settings end with 2): its output is the one compared
        torch.save(last.float().cpu(), Path(args.outdir) / f"flux-{args.system}-out-unfused2.pt")
        mem.mark("after unfused forwards")

    step("forwards", forwards)
    out["memory"] = mem.phases
    out["base_out_norm"] = float(base_out.norm())
    return out


def run_floor(args) -> dict:
    import floor

    C.setup_threads(args.threads)
    C.quiet_libraries()
    device = torch.device(args.device)
    files = json.loads(Path(args.files).read_text())["files"]
    out: dict = {"system": "floor", "times": {}, "errors": {}}
    transformer, _pool, _pipe, _targets, layout = build_model(args, out)
    T = out["times"]
    rows, kept = floor.load_floor([Path(files[n]) for n in FILES], device)
    T["load_first"], T["load_later"] = rows[0], floor.median_row(rows[1:])
    layers = fuse_factors(transformer, layout, kept[:2], WEIGHTS)
    out["fuse_inner_dim"] = int(layers[0][1].shape[1])
    T.update(floor.fuse_floor(layers, device, args.cycles))
    return out


def fuse_factors(transformer, layout, files: list[dict], weights: list[float]) -> list[tuple]:
    """``(W0, U, D)`` per touched weight: ``U`` = each LoRA's rows of ``w · alpha/rank · up`` side by side,
    ``D`` = the downs stacked (a fused kohya q/k/v LoRA shares its down between the q, k and v weights)."""
    layers = []
    for key, mods in layout:
        start = 0
        for path, shape in mods:
            w0 = transformer.get_submodule(path).weight.detach()
            ups, downs = [], []
            for sd, w in zip(files, weights):
                down, up = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"]
                scale = w * float(sd[f"{key}.alpha"]) / down.shape[0]
                ups.append(up[start:start + shape[0]].to(w0) * scale)
                downs.append(down.to(w0))
            layers.append((w0, torch.cat(ups, 1).contiguous(), torch.cat(downs, 0).contiguous()))
            start += shape[0]
    return layers


# ============================================================================ the parent


def run_child(args, system: str, files: Path) -> dict:
    res_path = Path(args.outdir) / f"flux-{system}.json"
    res_path.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", "--system", system, "--files", str(files), "--result", str(res_path)]
    for k in ("model", "double", "single", "device", "dtype", "resolution", "text_tokens", "batch", "threads",
              "repeats", "set_repeats", "cycles", "rank", "seed", "outdir", "cache", "pristine_device"):
        v = getattr(args, k)
        if v is not None:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    C.log(f"--- flux {system}: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0 or not res_path.exists():
        return {"system": system, "unavailable": f"process failed (exit {proc.returncode}); see stderr above"}
    res = json.loads(res_path.read_text())
    res["wall_s"] = time.perf_counter() - t0
    return res


def report(args, ours: dict, theirs: dict, fl: dict, keylist: str) -> str:
    gpu = torch.device(args.device).type == "cuda"
    cfg = flux_config(args.model, args.double, args.single)
    any_res = next((r for r in (ours, theirs, fl) if "touched_layers" in r), {})
    side = args.resolution // 16
    lines = [f"## Flux.1 transformer ({args.model}: real width 3072, {cfg['num_layers']} double + "
             f"{cfg['num_single_layers']} single blocks, {any_res.get('params', 0) / 1e9:.2f} B weights, random), "
             f"{args.device} {args.dtype}, {args.resolution}² px = {side * side} image + {args.text_tokens} text "
             f"tokens, batch {args.batch}; kohya-Flux LoRAs rank {args.rank} (alpha {args.rank / 2:g}), "
             f"{any_res.get('touched_layers', '?')} touched weights", ""]
    machine = ours.get("machine") or theirs.get("machine") or {}
    gpu_name = f"; GPU: {machine['gpu']}" if "gpu" in machine else ""
    lines += [f"CPU: {machine.get('cpu', '?')} ({machine.get('nproc', '?')} cores), torch threads "
              f"{machine.get('torch_threads', '?')}{gpu_name}.", ""]
    for res in (ours, theirs, fl):
        if "unavailable" in res:
            lines.append(f"**{res['system']}: not available ({res['unavailable']})**")
        for k, v in res.get("errors", {}).items():
            lines.append(f"**{res['system']}: section `{k}` failed: {v}**")

    t, cell, q = C.timing_of, C.timing_cell, C.timing_ratio

    rows = []

    def row(label, key, target, floor_key=None, compare=True):
        a, b = t(ours, key), t(theirs, key)
        f = t(fl, floor_key) if floor_key else None
        if a or b or f:
            rows.append([label, cell(a), cell(b), cell(f), q(a, b) if compare else "", q(a, f), target])

    wrap = ours.get("wrap_s")
    if wrap is not None:
        rows.append(["wrap the built pipeline (`lorablend.DiffusionPipeline(pipe)`)", C.fmt_s(wrap), "—", "—",
                     "", "", "(reported)"])
    row("**first** load_lora_weights (kohya-Flux), fresh process", "load_first", "ours/theirs ≤ 0.10", "load_first")
    row(f"load_lora_weights, next {len(FILES) - 1} (median)", "load_later", "ours/theirs ≤ 0.10", "load_later")
    row("set_adapters, 2 loaded (the call)", "set_adapters", "ours/theirs ≤ 0.05")
    row("set_adapters, 2 loaded, incl. deferred rebuild", "set_adapters_settled", "ours/theirs ≤ 0.05")
    row("**first** fuse_lora (2 adapters), fresh memory", "fuse_first", "ours/floor ≤ 1.5", "fuse_first")
    row(f"fuse_lora (2 adapters), later cycles (median of {args.cycles - 1})", "fuse_later", "ours/floor ≤ 1.5",
        "fuse_later")
    row("first unfuse_lora", "unfuse_first", "ours/theirs ≤ 0.10")
    row("unfuse_lora, later cycles (median)", "unfuse_later", "ours/theirs ≤ 0.10")
    for key, label in (("restore_after_1", "restore error after the first unfuse"),
                       ("restore_after_cycles", f"restore error after {args.cycles} fuse/unfuse cycles")):
        cells = []
        for res in (ours, theirs):
            e = res.get(key)
            cells.append("—" if e is None else f"max {e['max_abs']:.2g}, {e['not_bit_exact']}/{e['of']} not exact")
        rows.append([label, cells[0], cells[1], "", "", "", "0, all exact"])
    # the same model in both processes: a difference here is the machine's, not either system's
    row("transformer forward, base (before any load)", "forward_base", "(reference)", compare=False)
    row("transformer forward, adapters loaded but disabled", "forward_off", "(base of the overheads)", compare=False)
    frac = "1/4" if gpu else "1/2"
    for k in (1, 2):
        a, b = t(ours, f"forward_{k}"), t(theirs, f"forward_{k}")
        oa, ob = ours.get(f"overhead_{k}"), theirs.get(f"overhead_{k}")
        c = lambda x, o: f"{C.fmt_s(x['median'])} ({o * 100:+.1f} %)" if x and o is not None else "—"  # noqa: E731
        r = f"overhead {oa / ob:.2f}" if oa is not None and ob and ob > 0 else "—"
        rows.append([f"transformer forward, {k} adapter{'s' if k > 1 else ''} unfused (overhead vs disabled)",
                     c(a, oa), c(b, ob), "", r, "", f"overhead ≤ {frac} of theirs" if k > 1 else "(reported)"])
    lines.append(C.table(["operation", "lorablend (ours)", "diffusers+PEFT (theirs)", "floor", "ours/theirs",
                          "ours/floor", "target (SD rows' targets)"], rows))
    lines.append("")
    lines.append(
        "Ratios ours/theirs and ours/floor, lower is better (0.10 = 10× faster), all three measured in this run on "
        "the same weights and files, one process per system, one after the other (ours, theirs, floor). Single calls "
        "(first load, fuse, unfuse) show wall time and (cpu …) the process's CPU time over the call, all threads, "
        "page faults included: on a machine shared with other work the wall time of one call carries whatever the "
        "scheduler did meanwhile. Floors (`benchmarks/floor.py`, fresh process, same model and files): load = "
        "`safetensors.torch.load_file` + one copy of every tensor (first file cold, median of the other three); "
        f"fuse = one plain `torch.addmm(W0, U, D)` per touched weight, inner dimension {fl.get('fuse_inner_dim', '?')} "
        "(both LoRAs' factors side by side, each weight of a fused kohya q/k/v or linear1 LoRA with its rows of up), "
        "factors built before the clock. lorablend's set_adapters, fuse and unfuse rows include its deferred "
        "rebuild (`runtime.prepare()`). diffusers reads the kohya-Flux file through its converter "
        "(`_convert_kohya_flux_lora_to_diffusers`); restore error = max |W − W0| over the touched weights against "
        f"originals regenerated from the seed. LoRA files: {keylist}.")
    agree = []
    for tag in ("unfused2", "fused2"):
        pa, pb = (Path(args.outdir) / f"flux-{s}-out-{tag}.pt" for s in ("ours", "theirs"))
        if pa.exists() and pb.exists():
            xa, xb = torch.load(pa), torch.load(pb)
            agree.append(f"{tag}: max |ours − theirs| = {float((xa - xb).abs().max()):.3g} "
                         f"(output max |x| {float(xb.abs().max()):.3g})")
    if agree:
        lines.append("Same weights, same result — " + "; ".join(agree) + ".")
    mem = []
    for res in (ours, theirs):
        phases = res.get("memory") or []
        if phases:
            key = "cuda_peak_gib" if "cuda_peak_gib" in phases[-1] else "maxrss_gib"
            mem.append(f"{res['system']} " + ", ".join(f"{ph['phase']} {ph[key]:.2f}" for ph in phases))
    tw = any_res.get("touched_weights")
    if tw:
        esize = torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
        lines.append(f"Touched weights: {tw / 1e9:.3f} B = {tw * esize / 2**30:.2f} GiB in {args.dtype}. "
                     f"Extra RSS right after the first fuse: ours {ours.get('fuse_extra_rss_gib', float('nan')):.2f} "
                     f"GiB, theirs {theirs.get('fuse_extra_rss_gib', float('nan')):.2f} GiB. High-water mark by phase "
                     f"({'CUDA peak' if gpu else 'host ru_maxrss'}, GiB): " + "; ".join(mem) + ".")
    nan = float("nan")
    lines.append(f"Build (not timed in the table): ours {ours.get('build_s', nan):.1f} s, theirs "
                 f"{theirs.get('build_s', nan):.1f} s. Process wall: ours {ours.get('wall_s', nan):.0f} s, "
                 f"theirs {theirs.get('wall_s', nan):.0f} s, floor {fl.get('wall_s', nan):.0f} s.")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(BLOCKS), default="flux-small")
    p.add_argument("--double", type=int, default=None, help="double blocks (default: the model's)")
    p.add_argument("--single", type=int, default=None, help="single blocks (default: the model's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--resolution", type=int, default=128, help="image side in px: (side/16)² packed latent tokens")
    p.add_argument("--text-tokens", type=int, default=32, help="T5 tokens (FLUX.1-dev: 512)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3, help="interleaved forward rounds (and base forwards)")
    p.add_argument("--set-repeats", type=int, default=10)
    p.add_argument("--cycles", type=int, default=3, help="fuse/unfuse cycles (the first shown apart)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pristine-device", default=None, help="lorablend: where pristine copies live")
    p.add_argument("--systems", default="ours,theirs,floor")
    p.add_argument("--outdir", default=str(C.REPO / "bench-output"))
    p.add_argument("--cache", default=str(C.REPO / "bench-output" / "lora-cache"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--system", default=None, help=argparse.SUPPRESS)
    p.add_argument("--files", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    Path(args.outdir).mkdir(parents=True, exist_ok=True)
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.child:
        res = (run_floor if args.system == "floor" else run_system)(args)
        res["machine"] = C.machine_info()
        Path(args.result).write_text(json.dumps(res, indent=1))
        return res
    C.setup_threads(args.threads)
    t0 = time.perf_counter()
    load0, mem0 = os.getloadavg()[0], C.mem_available_gib()
    files = prepare_files(args)
    C.log(f"kohya-Flux files ready in {time.perf_counter() - t0:.1f} s")
    # ours first: a VM's fresh memory is dearest to the first process, so any such bias goes against us
    results = {s: run_child(args, s, files) for s in args.systems.split(",") if s}
    none = lambda s: {"system": s, "unavailable": "not run"}  # noqa: E731
    ours, theirs, fl = (results.get(s, none(s)) for s in ("ours", "theirs", "floor"))
    text = report(args, ours, theirs, fl, json.loads(files.read_text())["keylist"])
    # a shared machine: other work's load shows in every wall time (ratios in one run are the figures to read)
    text += (f"\nMachine state: load average (1 min) {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
             f"({os.cpu_count()} cores); MemAvailable {mem0:.1f} GiB at the start. Wall time of this part: "
             f"{time.perf_counter() - t0:.0f} s.")
    print(text, flush=True)
    out = Path(args.outdir)
    (out / f"flux-{args.model}-{args.device}.md").write_text(text + "\n")
    (out / f"flux-{args.model}-{args.device}.json").write_text(
        json.dumps({"args": vars(args), "runs": results}, indent=1, default=str))
    return {"ours": ours, "theirs": theirs, "floor": fl, "text": text}


if __name__ == "__main__":
    main()
