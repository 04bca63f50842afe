"""lorablend vs diffusers + PEFT on the same UNet and the same LoRA files, in one run.

Each system runs in its own subprocess (one after the other, never at the same time), so that its memory
high-water mark is its own and neither sees the other's state. Both build the identical real-size UNet
(deterministic weights) inside a diffusers pipeline, read the identical files from disk and are driven through
the same pipeline-level calls — diffusers' own names, which lorablend keeps:

    pipe.load_lora_weights(path, adapter_name=...)      # diffusers: lora_state_dict + unet.load_lora_adapter (PEFT)
    pipe.set_adapters(names, adapter_weights=...)
    pipe.fuse_lora(components=["unet"], lora_scale=1.0, adapter_names=...)
    pipe.unfuse_lora(components=["unet"])
    pipe.unet(**inputs)                                 # one denoising step, unfused adapters active

Timed: load per LoRA (kohya/SGM names and diffusers names), set_adapters with 2 and with 50 loaded adapters,
the base forward and the unfused forward with 1, 2, 4 adapters, fuse, unfuse, switch (unfuse → set_adapters →
fuse another pair); checked: restore error after unfuse (against regenerated original weights) and the
agreement of the two systems' outputs.

First calls (cold rows): before the main runs, each system's wrap / first load / second load / first fuse /
first unfuse run in fresh processes of their own, beside a fresh process timing the floors of the same calls on
the same model and files (``floor.py``: ``load_file`` + one copy; one plain ``addmm(W0, U, D)`` per touched
layer), in ``--cold-rounds`` rounds whose order turns around every round. ``--cold-only`` runs just those.

    python benchmarks/bench_runtime.py --model sd15 --latent 16 --threads 2          # CPU
    python benchmarks/bench_runtime.py --model sdxl --device cuda --dtype float16 --resolution 1024
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

MAIN = ["A", "B", "C", "D"]  # kohya-format LoRAs (SGM names for SDXL)
DIFF = ["E", "F"]  # diffusers-format LoRAs
N_LOADED = 50


# ============================================================================ the two systems


class _Pipeline:
    """The diffusers-named calls both systems answer to: the benchmark times the same code path for each."""

    pipe: object

    def load(self, path: Path, name: str) -> None:
        self.pipe.load_lora_weights(str(path), adapter_name=name)

    def set_adapters(self, names, weights) -> None:
        self.pipe.set_adapters(list(names), adapter_weights=list(weights))

    def fuse(self, names) -> None:
        self.pipe.fuse_lora(components=["unet"], lora_scale=1.0, adapter_names=list(names))

    def unfuse(self) -> None:
        self.pipe.unfuse_lora(components=["unet"])

    def unload(self) -> None:
        self.pipe.unload_lora_weights()

    def disable(self) -> None:
        self.pipe.disable_lora()

    def enable(self) -> None:
        self.pipe.enable_lora()



class Theirs(_Pipeline):
    label = "diffusers+PEFT"

    def __init__(self, pipe, args) -> None:
        import peft  # noqa: F401  (imports out of the timed region)
        import peft.tuners.lora  # noqa: F401

        self.pipe = pipe
        self.wrap_s = 0.0  # nothing to wrap: diffusers' LoRA methods live on the pipeline

    def settle(self) -> None:
        """diffusers + PEFT does all its work inside each call: nothing deferred."""

    def extra_memory(self) -> dict:
        return {}


class Ours(_Pipeline):
    label = "lorablend"

    def __init__(self, pipe, args) -> None:
        import lorablend
        import lorablend.io  # noqa: F401  (imports out of the timed region)

        # keep_fuse_buffers (opt-in): fused tensors kept after unfuse for the next fuse (one copy of the touched weights)
        keep = bool(args.keep_fuse_buffers) or args.system == "ours-kept"
        t0 = time.perf_counter()
        self.pipe = lorablend.DiffusionPipeline(pipe, pristine_device=args.pristine_device, keep_fuse_buffers=keep)
        self.wrap_s = time.perf_counter() - t0  # indexes the pipeline's modules once: part of the first contact

    def settle(self) -> None:
        """lorablend may defer rebuilding blended terms to the next forward; do it now so it is timed."""
        prepare = getattr(self.pipe.runtime, "prepare", None)
        if prepare is not None:
            prepare()

    def extra_memory(self) -> dict:
        return {k: v / 2**30 for k, v in self.pipe.runtime.memory().items()}


# "ours-kept": lorablend with keep_fuse_buffers=True, timed on fuse / unfuse / switch only (its other rows are ours')
SYSTEMS = {"theirs": Theirs, "ours": Ours, "ours-kept": Ours}


# ============================================================================ one system, in its own process


def live_weight(unet, path: str) -> torch.Tensor:
    mod = unet.get_submodule(path)
    return getattr(mod, "base_layer", mod).weight.detach()  # PEFT wraps the original module as base_layer


@torch.no_grad()
def restore_error(unet, pool, targets) -> dict:
    """max |W − W0| over the touched weights, and how many are not bit-exact (W0 regenerated from the seed)."""
    worst, inexact, changed = 0.0, 0, 0
    for path, _shape in targets:
        w = live_weight(unet, path)
        w0 = C.expected_param(pool, path + ".weight", tuple(w.shape), w.dtype)
        if not torch.equal(w, w0):
            inexact += 1
            diff = (w.float() - w0.float()).abs()
            worst = max(worst, float(diff.max()))
            changed += int((diff > 0).sum())
    return {"max_abs": worst, "not_bit_exact": inexact, "of": len(targets), "entries_changed": changed}


def profile_forward(fn, device) -> str:
    """Top operators of one forward (torch.profiler, by self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        C.sync(device)
    keys = ["self_device_time_total", "self_cuda_time_total"] if torch.device(device).type == "cuda" else []
    for key in keys + ["self_cpu_time_total"]:
        try:
            return prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=40)
        except Exception:  # noqa: BLE001 - the sort key's name changed across torch versions
            continue
    return ""


def cprofile_top(fn, n: int = 12) -> str:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(n)
    return "\n".join(line for line in s.getvalue().splitlines() if line.strip())[:6000]


def build_model(args, out: dict):
    """The system-independent model of every child: (unet, its weight pool, the pipeline, touched layers)."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    t0 = time.perf_counter()
    unet, pool = C.build_unet(args.model, device, dtype, seed=args.seed)
    pipe = C.build_pipeline(args.model, unet, device, dtype)
    out["build_s"] = time.perf_counter() - t0
    targets = [(p, tuple(m.weight.shape)) for p, m in C.target_modules(unet)]
    out["touched_layers"] = len(targets)
    out["touched_weights"] = sum(torch.Size(s).numel() for _, s in targets)
    return unet, pool, pipe, targets


def run_cold(args) -> dict:
    """The first calls a user makes, in a fresh process: wrap the pipeline just built, the first
    load_lora_weights, a second one, then the first fuse_lora of both (memory the process never touched).

    Its own process because the main run has already run forwards (and the other loads) by the time it
    loads or fuses: freed activations and buffers would then serve as warm memory, which a user's first
    call after building a pipeline does not have. The LoRA files sit in the page cache for every system
    alike (the parent wrote or read them): "cold" is the process and the pipeline, not the disk.
    """
    C.setup_threads(args.threads)
    C.quiet_libraries()
    device = torch.device(args.device)
    files = {k: Path(v) for k, v in json.loads(Path(args.files).read_text()).items()}
    out: dict = {"system": args.system, "part": "cold", "times": {}, "errors": {}}
    _unet, _pool, pipe, _targets = build_model(args, out)
    T = out["times"]
    try:
        system = SYSTEMS[args.system](pipe, args)
    except Exception as e:  # noqa: BLE001 - a missing library part is a table entry, not a crash
        out["unavailable"] = f"{type(e).__name__}: {e}"
        return out
    out["wrap_s"] = system.wrap_s
    first, second = MAIN[:2]
    T["load_first"] = C.once_row(lambda: system.load(files[first], first), device)[0]
    T["load_second"] = C.once_row(lambda: system.load(files[second], second), device)[0]
    if not args.loads_only:
        system.set_adapters(MAIN[:2], [0.7, 0.8])
        rss0 = C.Memory.rss_gib()
        T["fuse_first"] = C.once_row(lambda: (system.fuse(MAIN[:2]), system.settle()), device)[0]
        out["fuse_first_extra_rss_gib"] = C.Memory.rss_gib() - rss0
        T["unfuse_first"] = C.once_row(lambda: (system.unfuse(), system.settle()), device)[0]
    out["machine"] = C.machine_info()  # (after the timed calls: it imports every library to read versions)
    return out


def run_floor(args) -> dict:
    """The same-run floors (``floor.py``) on the same model and files, in a fresh process of their own."""
    import floor

    C.setup_threads(args.threads)
    C.quiet_libraries()
    device = torch.device(args.device)
    files = {k: Path(v) for k, v in json.loads(Path(args.files).read_text()).items()}
    out: dict = {"system": "floor", "part": "floor", "times": {}, "errors": {}}
    unet, _pool, _pipe, targets = build_model(args, out)
    T = out["times"]
    order = MAIN + DIFF  # the first file is the cold floor, as A is each system's first load
    rows, kept = floor.load_floor([files[n] for n in order], device)
    out["load_samples"] = dict(zip(order, rows))
    T["load_first"], T["load_later"] = rows[0], floor.median_row(rows[1:])
    if not args.loads_only:
        layers = floor.fuse_factors(args.model, unet, targets, [kept[0], kept[1]], [0.7, 0.8])
        out["fuse_inner_dim"] = int(layers[0][1].shape[1])
        T.update(floor.fuse_floor(layers, device, args.cycles))
    out["machine"] = C.machine_info()
    return out


def run_system(args) -> dict:
    C.setup_threads(args.threads)
    C.quiet_libraries()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    files = {k: Path(v) for k, v in json.loads(Path(args.files).read_text()).items()}
    out: dict = {"system": args.system, "times": {}, "errors": {}}
    mem = C.Memory(device)
    unet, pool, pipe, targets = build_model(args, out)
    mem.mark("model built")
    kw = C.unet_inputs(args.model, unet, args.latent, device, dtype, batch=args.batch)

    def forward():
        with torch.no_grad():
            return unet(**kw, return_dict=False)[0]

    T = out["times"]
    R = args.repeats
    if args.part != "loads":
        T["forward_base"] = C.timed(forward, device, repeats=R, warmup=1)
        base_out = forward().float().cpu()

    try:
        system = SYSTEMS[args.system](pipe, args)
    except Exception as e:  # noqa: BLE001 - a missing library part is a table entry, not a crash
        out["unavailable"] = f"{type(e).__name__}: {e}"
        out["memory"] = mem.phases
        return out

    def step(name, fn):
        """Run one benchmark section; a failure is recorded and the run goes on."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            out["errors"][name] = f"{type(e).__name__}: {e}"
            C.log(f"[{args.system}] {name} failed:\n{traceback.format_exc()}")

    # ---- load, and set_adapters with 2 loaded
    loads = {"kohya": [], "diffusers": []}

    def load(name, fmt):
        dt, _ = C.once(lambda: system.load(files[name], name), device)
        loads[fmt].append(dt)

    def load_first_two():
        for name in MAIN[:2]:
            load(name, "kohya")

    step("load", load_first_two)
    mem.mark("2 LoRAs loaded")
    flip = [0]

    def set_two():
        flip[0] ^= 1  # alternate the weights so that nothing can be skipped as unchanged
        system.set_adapters(MAIN[:2], [0.7, 0.8] if flip[0] else [0.6, 0.9])

    def set_two_settled():
        set_two()
        system.settle()

    def time_set_adapters(tag):
        T[f"set_adapters_{tag}"] = C.timed(set_two, device, repeats=args.set_repeats)
        T[f"set_adapters_{tag}_settled"] = C.timed(set_two_settled, device, repeats=args.set_repeats)

    lite = args.system == "ours-kept"  # fuse / unfuse / switch only
    if not lite and args.part != "forwards":
        step("set_adapters_2", lambda: time_set_adapters("2"))

    def load_rest():
        for name in MAIN[2:]:
            load(name, "kohya")
        for name in [] if lite or args.part == "forwards" else DIFF:
            load(name, "diffusers")

    step("load_rest", load_rest)
    T["load_kohya"] = {"median": _median(loads["kohya"]), "samples": loads["kohya"]}
    T["load_diffusers"] = {"median": _median(loads["diffusers"]), "samples": loads["diffusers"]}
    mem.mark(f"{len(MAIN) + len(DIFF)} LoRAs loaded")
    if args.part == "loads":
        out["memory"] = mem.phases
        return out

    # ---- unfused forward with 1, 2, 4 active adapters, interleaved with the base forward (adapters disabled)
    # Rounds alternate the settings so that drift in machine load hits every setting alike; the overhead of
    # each setting is the median over rounds of t_k / t_base of the same round. The disabled base of PEFT
    # still passes through its wrapper layers (so its overhead reads slightly low: conservative for us).
    weights = [0.7, 0.8, 0.5, 0.6]

    def forwards():
        settings = ["off", 1, 2, 4]
        samples = {k: [] for k in settings}
        for _ in range(R):
            for k in settings:
                if k == "off":
                    system.disable()
                else:
                    system.enable()
                    system.set_adapters(MAIN[:k], weights[:k])
                forward()  # warm-up after the state change
                dt, _ = C.once(forward, device)
                samples[k].append(dt)
        T["forward_off"] = {"median": _median(samples["off"]), "samples": samples["off"]}
        for k in (1, 2, 4):
            T[f"forward_{k}"] = {"median": _median(samples[k]), "samples": samples[k]}
            ratios = [a / b for a, b in zip(samples[k], samples["off"])]
            out[f"overhead_{k}"] = _median(ratios) - 1
        system.set_adapters(MAIN[:2], weights[:2])
        torch.save(forward().float().cpu(), Path(args.outdir) / f"{args.system}-out-unfused2.pt")

    if not lite and args.part != "main":
        step("forwards", forwards)
    if args.part == "forwards":
        out["memory"] = mem.phases
        return out
    mem.mark("after unfused forwards")

    # ---- fuse, unfuse, restore error, switch
    def fuse_cycles():
        system.set_adapters(MAIN[:2], [0.7, 0.8])
        fus, unf = [], []
        for i in range(args.cycles):
            rss0 = C.Memory.rss_gib()
            dt, _ = C.once(lambda: (system.fuse(MAIN[:2]), system.settle()), device)
            fus.append(dt)
            if i == 0:
                out["fuse_extra_rss_gib"] = C.Memory.rss_gib() - rss0
                out["runtime_memory_gib_fused"] = system.extra_memory()
                mem.mark("fused (2 adapters)")
                torch.save(forward().float().cpu(), Path(args.outdir) / f"{args.system}-out-fused2.pt")
            dt, _ = C.once(lambda: (system.unfuse(), system.settle()), device)
            unf.append(dt)
            if i == 0:
                out["restore_after_1"] = restore_error(unet, pool, targets)
        T["fuse"] = {"median": _median(fus), "samples": fus}
        # The first fuse writes into memory the process never touched; on some VMs those page faults cost more
        # than the arithmetic (up to ~2 s/GiB measured here), so the first and the later fuses are shown apart.
        T["fuse_first"] = {"median": fus[0], "samples": fus[:1]}
        if len(fus) > 1:
            T["fuse_later"] = {"median": _median(fus[1:]), "samples": fus[1:]}
        T["unfuse"] = {"median": _median(unf), "samples": unf}
        out["restore_after_cycles"] = restore_error(unet, pool, targets)
        mem.mark("after fuse/unfuse cycles")

    step("fuse", fuse_cycles)

    def switch_cycles():
        combos = [(MAIN[2:4], [0.5, 0.6]), (MAIN[:2], [0.7, 0.8])]
        system.set_adapters(MAIN[:2], [0.7, 0.8])
        system.fuse(MAIN[:2])
        sw = []
        for i in range(args.cycles):
            names, w = combos[i % 2]

            def switch():
                system.unfuse()
                system.set_adapters(names, w)
                system.fuse(names)
                system.settle()

            dt, _ = C.once(switch, device)
            sw.append(dt)
        system.unfuse()
        T["switch"] = {"median": _median(sw), "samples": sw}
        out["restore_after_switches"] = restore_error(unet, pool, targets)

    step("switch", switch_cycles)

    if lite:
        out["memory"] = mem.phases
        return out

    # ---- profiles (after the timed parts; the profiler slows what it watches)
    if args.profile:
        def profiles():
            system.set_adapters(MAIN[:2], [0.7, 0.8])
            forward()
            out["profile_forward2"] = profile_forward(forward, device)
            out["cprofile_forward2"] = cprofile_top(forward)
            out["cprofile_fuse"] = cprofile_top(lambda: system.fuse(MAIN[:2]))
            out["cprofile_unfuse"] = cprofile_top(system.unfuse)
            extra = sorted(files)[-1]
            out["cprofile_load"] = cprofile_top(lambda: system.load(files[extra], "profiled_load"))
        step("profile", profiles)

    # ---- set_adapters with 50 loaded adapters
    def fifty():
        loaded = len(MAIN) + len(DIFF) + (1 if args.profile else 0)
        fill = [n for n in sorted(files) if n.startswith("fill")][: max(0, args.loaded - loaded)]
        for name in fill:
            system.load(files[name], name)
        out["loaded_for_50"] = loaded + len(fill)
        mem.mark(f"{loaded + len(fill)} LoRAs loaded (for set_adapters)")
        time_set_adapters("50")

    step("set_adapters_50", fifty)

    # ---- the base forward again, after every adapter is unloaded (so machine drift shows in the reference)
    def base_again():
        system.unload()
        T["forward_base_after"] = C.timed(forward, device, repeats=R, warmup=1)
        after = forward().float().cpu()
        out["base_after_unload_max_abs"] = float((after - base_out).abs().max())

    step("base_after", base_again)
    samples = T["forward_base"]["samples"] + T.get("forward_base_after", {}).get("samples", [])
    T["forward_base_all"] = {"median": _median(samples), "samples": samples}
    out["memory"] = mem.phases
    out["base_out_norm"] = float(base_out.norm())
    return out


def _median(xs):
    import statistics

    return statistics.median(xs) if xs else None


# ============================================================================ the parent: files, both runs, table


def prepare_files(args) -> Path:
    """Write the LoRA files both systems read; return the JSON that lists them."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        meta = UNet2DConditionModel.from_config(C.unet_config(args.model))
    targets = [(p, tuple(m.weight.shape)) for p, m in C.target_modules(meta)]
    specs = [(n, "kohya", args.rank, args.rank / 2) for n in MAIN]
    specs += [(n, "diffusers", args.rank, None) for n in DIFF]
    specs += [(f"fill{i:02d}", "diffusers", args.filler_rank, None) for i in range(args.loaded)]
    t0 = time.perf_counter()
    files = C.lora_files(Path(args.cache), args.model, targets, specs)
    C.log(f"LoRA files ready in {time.perf_counter() - t0:.1f} s ({len(targets)} layers each)")
    path = Path(args.outdir) / "runtime-files.json"
    path.write_text(json.dumps({k: str(v) for k, v in files.items()}, indent=1))
    return path


# For the forward rounds on a CPU: glibc keeps freed memory instead of handing it back to the kernel, so each
# forward's activations reuse warm pages. On this VM a page touched for the first time costs up to ~2 s/GiB, which
# otherwise adds tens of ms of noise per forward, differently in every round (both systems run under it alike).
KEEP_HEAP = {"MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
             "MALLOC_TOP_PAD_": str(256 << 20)}
FORWARD_KEYS = ("forward_off", "forward_1", "forward_2", "forward_4", "overhead_1", "overhead_2", "overhead_4")


def run_cold_rounds(args, files: Path) -> dict:
    """Each system's first calls and the floors, one fresh process each, in ``--cold-rounds`` rounds whose order
    turns around every round (ours, theirs, floor, floor, theirs, ours, …); each row is the median over rounds.

    Why rounds and turning orders: on a VM, memory a process frees stays cheap for the next process for a
    while, and memory the guest never touched costs a host page fault per page (measured here: first touch of
    1 GiB took 0.36 s of CPU right after other processes exited, 1.9-2.9 s in a process that had already
    taken 3.6 GB), so whichever process goes first pays more for its first fuse.
    """
    order = [s for s in ("ours", "theirs") if s in args.systems.split(",")] + ["floor"]
    rounds: dict[str, list[dict]] = {name: [] for name in order}
    for r in range(max(1, args.cold_rounds)):
        for name in order if r % 2 == 0 else order[::-1]:
            rounds[name].append(run_child(args, name, files, part="floor" if name == "floor" else "cold"))
    return {name: _median_over_rounds(runs) for name, runs in rounds.items()}


def _median_over_rounds(runs: list[dict]) -> dict:
    """One child result from several rounds: each timed row the median of its rounds (wall and CPU), samples kept."""
    ok = [r for r in runs if "unavailable" not in r]
    if not ok:
        return runs[0]
    out = dict(ok[-1])
    out["rounds"] = len(ok)
    out["times"] = {}
    for key in ok[0].get("times", {}):
        rows = [r["times"][key] for r in ok if key in r.get("times", {})]
        out["times"][key] = {"median": _median([x["median"] for x in rows]),
                             "samples": [x["median"] for x in rows]}
        if all("cpu" in x for x in rows):
            out["times"][key]["cpu"] = _median([x["cpu"] for x in rows])
    for key in ("wrap_s", "fuse_first_extra_rss_gib"):
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            out[key] = _median(values)
    return out


def run_child(args, system: str, files: Path, part: str = "all", env: dict | None = None) -> dict:
    res_path = Path(args.outdir) / f"runtime-{system}{'' if part == 'all' else '-' + part}.json"
    if res_path.exists():
        res_path.unlink()
    cmd = [sys.executable, __file__, "--child", "--system", system, "--files", str(files), "--result", str(res_path),
           "--part", part]
    cmd += _forward_args(args)
    C.log(f"--- {system} ({part}): {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    if proc.returncode != 0 or not res_path.exists():
        return {"system": system, "unavailable": f"process failed (exit {proc.returncode}); see stderr above"}
    res = json.loads(res_path.read_text())
    res["wall_s"] = time.perf_counter() - t0
    return res


def _forward_args(args) -> list[str]:
    out = []
    for k in ("model", "device", "dtype", "latent", "batch", "threads", "repeats", "set_repeats", "cycles", "rank",
              "filler_rank", "loaded", "seed", "outdir", "cache", "pristine_device"):
        v = getattr(args, k)
        if v is not None:
            out += [f"--{k.replace('_', '-')}", str(v)]
    if args.profile:
        out.append("--profile")
    if args.keep_fuse_buffers:
        out.append("--keep-fuse-buffers")
    return out


TARGETS = {
    "load_kohya": "≥ 10× faster",
    "load_diffusers": "≥ 10× faster",
    "set_adapters_2": "≥ 20× faster",
    "set_adapters_50": "≥ 20× faster, flat 2→50",
    "fuse": "≥ 4× faster",
    "unfuse": "≥ 10× faster, bit-exact",
}


def report(args, ours: dict, theirs: dict, kept: dict | None = None) -> str:
    gpu = torch.device(args.device).type == "cuda"
    lines = []
    head = (f"## Runtime: {args.model.upper()} UNet (real config, random weights), {args.device} {args.dtype}, "
            f"latent {args.latent}×{args.latent} (= {args.latent * 8}² px), batch {args.batch}, "
            f"LoRA rank {args.rank} (alpha {args.rank / 2:g}), "
            f"{ours.get('touched_layers', theirs.get('touched_layers', '?'))} touched layers")
    lines.append(head)
    lines.append("")
    machine = ours.get("machine") or theirs.get("machine")
    if machine:
        lines.append(f"CPU: {machine.get('cpu', '?')} ({machine.get('nproc', '?')} cores), torch threads "
                     f"{machine.get('torch_threads', '?')}" + (f"; GPU: {machine['gpu']}" if "gpu" in machine else "")
                     + ".")
        lines.append("")
    for res in (ours, theirs):
        if "unavailable" in res:
            lines.append(f"**{res['system']}: not available ({res['unavailable']})**")
        for k, v in res.get("errors", {}).items():
            lines.append(f"**{res['system']}: section `{k}` failed: {v}**")
    rows = []

    def t(res, key):
        v = res.get("times", {}).get(key)
        return None if v is None else v["median"]

    def ratio(a, b):
        return f"{b / a:.1f}×" if a and b else "—"

    n50 = ours.get("loaded_for_50", theirs.get("loaded_for_50", args.loaded))
    for key, label in (("load_kohya", "load one LoRA, kohya/SGM names (median per LoRA)"),
                       ("load_diffusers", "load one LoRA, diffusers names (median per LoRA)"),
                       ("set_adapters_2", "set_adapters, 2 loaded (the call)"),
                       ("set_adapters_2_settled", "set_adapters, 2 loaded, incl. deferred rebuild"),
                       ("set_adapters_50", f"set_adapters, {n50} loaded (the call)"),
                       ("set_adapters_50_settled", f"set_adapters, {n50} loaded, incl. deferred rebuild")):
        a, b = t(ours, key), t(theirs, key)
        rows.append([label, C.fmt_s(a), C.fmt_s(b), ratio(a, b), TARGETS[key.replace("_settled", "")]])
    for suffix, what in (("", "the call"), ("_settled", "incl. rebuild")):
        a2, a50 = t(ours, "set_adapters_2" + suffix), t(ours, "set_adapters_50" + suffix)
        b2, b50 = t(theirs, "set_adapters_2" + suffix), t(theirs, "set_adapters_50" + suffix)
        if a2 and a50:
            rows.append([f"set_adapters growth 2→{n50} loaded ({what})", f"{a50 / a2:.2f}×",
                         f"{b50 / b2:.2f}×" if b2 and b50 else "—", "", "flat (≈1×)"])
    base_a, base_b = t(ours, "forward_base_all"), t(theirs, "forward_base_all")
    rows.append(["UNet forward, base (no LoRA; before load + after unload)", C.fmt_s(base_a), C.fmt_s(base_b), "",
                 "(reference)"])
    off_a, off_b = t(ours, "forward_off"), t(theirs, "forward_off")
    rows.append(["UNet forward, adapters loaded but disabled (interleaved base)", C.fmt_s(off_a), C.fmt_s(off_b), "",
                 "(base of the overheads below)"])
    frac = "1/4" if gpu else "1/2"
    for k in (1, 2, 4):
        a, b = t(ours, f"forward_{k}"), t(theirs, f"forward_{k}")
        oa, ob = ours.get(f"overhead_{k}"), theirs.get(f"overhead_{k}")
        cell = lambda x, o: f"{C.fmt_s(x)} ({o * 100:+.1f} %)" if x and o is not None else "—"  # noqa: E731
        r = f"overhead {oa / ob:.2f}×" if oa is not None and ob and ob > 0 else "—"
        rows.append([f"UNet forward, {k} adapter{'s' if k > 1 else ''} unfused (overhead vs base)", cell(a, oa),
                     cell(b, ob), r, f"overhead ≤ {frac} of theirs" if k > 1 else "(reported)"])
    for key, label in (("fuse", f"fuse 2 adapters (median of {args.cycles} cycles)"),
                       ("fuse_first", "fuse 2 adapters, first cycle (fresh memory)"),
                       ("fuse_later", "fuse 2 adapters, later cycles (median)"),
                       ("unfuse", "unfuse")):
        a, b = t(ours, key), t(theirs, key)
        if a or b:
            rows.append([label, C.fmt_s(a), C.fmt_s(b), ratio(a, b), TARGETS[key.split("_")[0]]])
    step_target = f"< one UNet step ({C.fmt_s(base_a)})" + ("" if gpu and args.latent == 128 else " [target is at 1024² GPU]")
    a, b = t(ours, "switch"), t(theirs, "switch")
    rows.append(["switch combination (unfuse + set_adapters + fuse)", C.fmt_s(a), C.fmt_s(b), ratio(a, b), step_target])
    if kept and "unavailable" not in kept:
        for key, label, target in (("fuse_later", "fuse 2 adapters, keep_fuse_buffers=True, later cycles",
                                    TARGETS["fuse"]),
                                   ("unfuse", "unfuse, keep_fuse_buffers=True", TARGETS["unfuse"]),
                                   ("switch", "switch combination, keep_fuse_buffers=True", step_target)):
            a, b = t(kept, key), t(theirs, key)
            rows.append([label, C.fmt_s(a), C.fmt_s(b), ratio(a, b), target])
    for key, label in (("restore_after_1", "restore error after the first fuse/unfuse"),
                       ("restore_after_cycles", f"restore error after {args.cycles} fuse/unfuse cycles"),
                       ("restore_after_switches", f"restore error after {args.cycles} switches + unfuse")):
        cells = []
        for res in (ours, theirs, kept or {}):
            e = res.get(key)
            cells.append("—" if e is None else f"max {e['max_abs']:.2g}, {e['not_bit_exact']}/{e['of']} not exact")
        if kept:
            cells[0] += f" (kept buffers: {cells[2]})"
        rows.append([label, cells[0], cells[1], "", "0 / all exact"])
    if args.loads_only:  # only the rows that were timed
        rows = [r for r in rows if not (r[1] in ("—", "") and r[2] in ("—", ""))]
    lines.append(C.table(["operation", "lorablend (ours)", "diffusers+PEFT (theirs)", "ratio", "target"], rows))
    lines.append("")
    lines.append("ratio = theirs / ours for times (higher is better for us); for forwards, ours' overhead / theirs' "
                 "(lower is better), each overhead being the median over interleaved rounds of t_k / t_disabled − 1. "
                 "lorablend builds blended terms lazily (on the next forward); 'incl. deferred rebuild', fuse, unfuse "
                 "and switch include that work (runtime.prepare()), so no cost hides in the next forward.")
    if not gpu and args.forward_process != "same" and not args.loads_only:
        lines.append("On the CPU the forward rounds run in a second process per system in which glibc keeps freed memory "
                     f"({', '.join(f'{k}={v}' for k, v in KEEP_HEAP.items())}): first-touch page faults on this VM "
                     "(up to ~2 s/GiB) otherwise add noise of tens of ms per forward. Everything else runs with default "
                     "settings, so the fuse rows include the page faults a user would see.")
    # agreement of outputs
    agree = []
    for tag in ("unfused2", "fused2"):
        pa, pb = Path(args.outdir) / f"ours-out-{tag}.pt", Path(args.outdir) / f"theirs-out-{tag}.pt"
        if pa.exists() and pb.exists():
            xa, xb = torch.load(pa), torch.load(pb)
            agree.append(f"{tag}: max |ours − theirs| = {float((xa - xb).abs().max()):.3g} "
                         f"(output max |x| {float(xb.abs().max()):.3g})")
    if agree:
        lines.append("Same weights, same result — " + "; ".join(agree) + ".")
    # memory
    lines.append("")
    lines.append("### Memory per phase (host RSS now / process high-water mark" + (", CUDA now / peak" if gpu else "")
                 + "), GiB")
    mrows = []
    phases = [p["phase"] for p in (ours.get("memory") or theirs.get("memory") or [])]
    by = lambda res: {p["phase"]: p for p in res.get("memory", [])}  # noqa: E731
    mo, mt = by(ours), by(theirs)
    for ph in phases + [p for p in mt if p not in phases]:
        def cell(m):
            p = m.get(ph)
            if not p:
                return "—"
            s = f"{p['rss_gib']:.2f} / {p['maxrss_gib']:.2f}"
            if "cuda_gib" in p:
                s += f" ; {p['cuda_gib']:.2f} / {p['cuda_peak_gib']:.2f}"
            return s
        mrows.append([ph, cell(mo), cell(mt)])
    lines.append(C.table(["phase", "lorablend", "diffusers+PEFT"], mrows))
    tw = ours.get("touched_weights") or theirs.get("touched_weights")
    if tw and not args.loads_only:
        esize = torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
        lines.append("")
        lines.append(f"Touched weights: {tw / 1e9:.3f} B = {tw * esize / 2**30:.2f} GiB in {args.dtype}. "
                     f"Extra host RSS right after the first fuse: ours {ours.get('fuse_extra_rss_gib', float('nan')):.2f} GiB, "
                     f"theirs {theirs.get('fuse_extra_rss_gib', float('nan')):.2f} GiB. "
                     f"lorablend runtime memory while fused (GiB): {ours.get('runtime_memory_gib_fused', {})} "
                     f"(pristine copies on {args.pristine_device or 'the weights device'}"
                     f"{'; fuse buffers kept for reuse' if args.keep_fuse_buffers else ''}).")
    lines.append("")
    lines.append(f"Build: ours {ours.get('build_s', float('nan')):.1f} s, theirs {theirs.get('build_s', float('nan')):.1f} s "
                 f"(not timed in the table). Subprocess wall: ours {ours.get('wall_s', float('nan')):.0f} s, "
                 f"theirs {theirs.get('wall_s', float('nan')):.0f} s.")
    return "\n".join(lines)


def cold_report(args, cold: dict, runs: dict) -> str:
    """The first calls (fresh processes) beside the warm medians of the main run and the same-run floors."""
    ours_c, theirs_c, fl = (cold.get(k, {}) for k in ("ours", "theirs", "floor"))
    ours_w, theirs_w, kept_w = (runs.get(k, {}) for k in ("ours", "theirs", "ours-kept"))
    machine = next((r["machine"] for r in (ours_c, theirs_c, fl, ours_w) if "machine" in r), {})

    t, cell, q = C.timing_of, C.timing_cell, C.timing_ratio

    rows = []

    def row(label, a, b, f, target):
        if a or b or f:
            rows.append([label, cell(a), cell(b), cell(f), q(a, b), q(a, f), target])

    wrap = ours_c.get("wrap_s")
    row("wrap the built pipeline (`lorablend.DiffusionPipeline(pipe)`)", None if wrap is None else {"median": wrap},
        None, None, "(reported; diffusers has nothing to wrap)")
    row("**first** load_lora_weights (kohya), fresh process, freshly wrapped pipeline", t(ours_c, "load_first"),
        t(theirs_c, "load_first"), t(fl, "load_first"), "≥ 10× faster (ours/theirs ≤ 0.10)")
    row("second load_lora_weights, same process", t(ours_c, "load_second"), t(theirs_c, "load_second"),
        t(fl, "load_later"), "≥ 10× faster")
    row("load, main run (median per LoRA, kohya)", t(ours_w, "load_kohya"), t(theirs_w, "load_kohya"),
        t(fl, "load_later"), "≥ 10× faster")
    row("**first** fuse_lora (2 adapters), fresh process, fresh memory", t(ours_c, "fuse_first"),
        t(theirs_c, "fuse_first"), t(fl, "fuse_first"), "ours/floor ≤ 1.5")
    row("fuse, later cycles of the main run (median)", t(ours_w, "fuse_later"), t(theirs_w, "fuse_later"),
        t(fl, "fuse_later"), "ours/floor ≤ 1.5")
    row("fuse, keep_fuse_buffers=True, later cycles (floor: into reused outputs)", t(kept_w, "fuse_later"),
        t(theirs_w, "fuse_later"), t(fl, "fuse_reused"), "ours/floor ≤ 1.5")
    row("first unfuse_lora (after the first fuse)", t(ours_c, "unfuse_first"), t(theirs_c, "unfuse_first"), None,
        "(reported)")
    lines = [f"### First calls (cold) and same-run floors: {args.model.upper()}, {args.device} {args.dtype}",
             "",
             f"CPU: {machine.get('cpu', '?')} ({machine.get('nproc', '?')} cores), torch threads "
             f"{machine.get('torch_threads', '?')}" + (f"; GPU: {machine['gpu']}" if "gpu" in machine else "") + ".",
             "",
             C.table(["operation", "lorablend (ours)", "diffusers+PEFT (theirs)", "floor", "ours/theirs", "ours/floor",
                      "target"], rows),
             "",
             "Time ratios, lower is better (ours/theirs 0.10 = 10× faster). Medians over "
             f"{ours_c.get('rounds', fl.get('rounds', 1))} rounds of fresh processes whose order turns around every "
             "round (memory freed by one process is cheap for the next on a VM). Each system's first calls run in a "
             "fresh process of their own: build the pipeline, wrap it (ours), load A, load B, set_adapters, fuse both, "
             "unfuse, nothing before (the main run has already run forwards and loads by then, whose freed memory "
             "would make its first calls warm). Floors, in a fresh process on the same model and files "
             "(`benchmarks/floor.py`): load = `safetensors.torch.load_file` + one copy of every tensor to the "
             "model's device (first file cold, median of the other five warm); fuse = one plain "
             f"`torch.addmm(W0, U, D)` per touched layer, inner dimension {fl.get('fuse_inner_dim', '?')} (the two "
             "LoRAs' factors side by side, as our fuse multiplies), factors built before the clock: first pass "
             "cold (fresh outputs), later passes after freeing the previous outputs (as fuse after unfuse), and "
             "passes into outputs touched before (the floor of keep_fuse_buffers=True). (cpu …) is the process's "
             "CPU time over the same call, all threads, page faults included: on a machine shared with other work "
             "it shows what the wall time of one call cannot."]
    for res in (ours_c, theirs_c, fl):
        if "unavailable" in res:
            lines.append(f"**{res.get('system')} first calls: not available ({res['unavailable']})**")
    extra = [res.get("fuse_first_extra_rss_gib") for res in (ours_c, theirs_c)]
    if any(v is not None for v in extra):
        a, b = (float("nan") if v is None else v for v in extra)
        lines.append(f"Extra host RSS right after the first fuse: ours {a:.2f} GiB, theirs {b:.2f} GiB.")
    return "\n".join(lines)


def profiles_text(ours: dict, theirs: dict) -> str:
    parts = []
    for res in (ours, theirs):
        for key in ("profile_forward2", "cprofile_forward2", "cprofile_load", "cprofile_fuse", "cprofile_unfuse"):
            if key in res:
                parts.append(f"### {res['system']}: {key}\n```\n{res[key]}\n```")
    return "\n\n".join(parts)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["sdxl", "sd15"], default="sd15")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--latent", type=int, default=None, help="latent side (image side / 8); default from --resolution")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (1024 → latent 128)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per setting (after one warm-up)")
    p.add_argument("--set-repeats", type=int, default=10)
    p.add_argument("--cycles", type=int, default=3, help="fuse/unfuse cycles and switches")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--loaded", type=int, default=N_LOADED, help="adapters loaded for the second set_adapters timing")
    p.add_argument("--filler-rank", type=int, default=4, help="rank of the extra adapters that make 50 loaded")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pristine-device", default=None, help="lorablend: where pristine copies live (default: weights' device)")
    p.add_argument("--keep-fuse-buffers", action="store_true",
                   help="lorablend: keep fused tensors after unfuse and reuse them (LoraRuntime(keep_fuse_buffers=True))")
    p.add_argument("--profile", action="store_true", help="add torch.profiler / cProfile tops to the output")
    p.add_argument("--forward-process", choices=["auto", "separate", "same"], default="auto",
                   help="forward rounds in a separate process under KEEP_HEAP (auto: on a CPU) or in the main one")
    p.add_argument("--systems", default="theirs,ours,ours-kept")
    p.add_argument("--outdir", default=str(C.REPO / "bench-output"))
    p.add_argument("--cache", default=str(C.REPO / "bench-output" / "lora-cache"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--system", default=None, help=argparse.SUPPRESS)
    p.add_argument("--files", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--part", default="all", choices=["all", "main", "forwards", "loads", "cold", "floor"],
                   help=argparse.SUPPRESS)
    p.add_argument("--skip-cold", action="store_true",
                   help="skip the first-call processes (cold wrap / load / fuse of each system) and the floor process")
    p.add_argument("--cold-rounds", type=int, default=3,
                   help="rounds of first-call and floor processes (order turned around every round; median shown: "
                        "with 3, one round disturbed by other work on the machine does not move it)")
    p.add_argument("--cold-only", action="store_true",
                   help="run only the first-call processes and the floor process (the cold table, no warm rows)")
    p.add_argument("--loads-only", action="store_true",
                   help="time only load and set_adapters with 2 loaded (e.g. SDXL on a CPU without room for fusing)")
    args = p.parse_args(argv)
    if args.latent is None:
        args.latent = (args.resolution or 128) // 8
    Path(args.outdir).mkdir(parents=True, exist_ok=True)
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.child:
        res = {"cold": run_cold, "floor": run_floor}.get(args.part, run_system)(args)
        res.setdefault("machine", C.machine_info())
        Path(args.result).write_text(json.dumps(res, indent=1))
        return res
    C.setup_threads(args.threads)
    files = prepare_files(args)
    results = {}
    cold = {} if args.skip_cold else run_cold_rounds(args, files)
    if args.cold_only:
        args.systems = ""
    # forwards in their own process (see KEEP_HEAP) on a CPU; a GPU's caching allocator has no such noise
    isolate = {"auto": torch.device(args.device).type == "cpu", "separate": True, "same": False}[args.forward_process]
    for system in [s for s in args.systems.split(",") if s]:
        if args.loads_only:
            if system != "ours-kept":
                results[system] = run_child(args, system, files, part="loads")
            continue
        if not isolate or system == "ours-kept":
            results[system] = run_child(args, system, files)
            continue
        res = run_child(args, system, files, part="main")
        fwd = run_child(args, system, files, part="forwards", env=KEEP_HEAP)
        for key in FORWARD_KEYS:
            if key in fwd.get("times", {}):
                res.setdefault("times", {})[key] = fwd["times"][key]
            elif key in fwd:
                res[key] = fwd[key]
        res.setdefault("errors", {}).update({f"forwards/{k}": v for k, v in fwd.get("errors", {}).items()})
        if "unavailable" in fwd:
            res.setdefault("errors", {})["forwards"] = fwd["unavailable"]
        res["wall_s"] = res.get("wall_s", 0) + fwd.get("wall_s", 0)
        results[system] = res
    ours = results.get("ours", {"system": "ours", "unavailable": "not run"})
    theirs = results.get("theirs", {"system": "theirs", "unavailable": "not run"})
    parts = [] if args.cold_only else [report(args, ours, theirs, results.get("ours-kept"))]
    if cold:
        parts.append(cold_report(args, cold, results))
    text = "\n\n".join(parts)
    print(text, flush=True)
    out = Path(args.outdir)
    (out / f"runtime-{args.model}-{args.device}.md").write_text(text + "\n")
    machine = next((r["machine"] for r in [*cold.values(), *results.values()] if "machine" in r), C.machine_info())
    (out / f"runtime-{args.model}-{args.device}.json").write_text(json.dumps(
        {"machine": machine, "args": vars(args), "runs": results, "cold": cold}, indent=1, default=str))
    prof = profiles_text(ours, theirs)
    if prof:
        (out / f"runtime-{args.model}-{args.device}-profiles.md").write_text(prof + "\n")
    return {"ours": ours, "theirs": theirs, "text": text}


if __name__ == "__main__":
    main()
