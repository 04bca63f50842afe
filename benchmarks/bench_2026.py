"""lorablend vs diffusers + PEFT on a Qwen-Image or Wan 14B transformer at the real width, a few blocks deep.

The model is the real transformer class built from the real config numbers below (Qwen-Image: 3072 wide, 24 heads
× 128, mlp 12288; Wan 2.1 / 2.2 14B: 5120 wide, 40 heads × 128, ffn 13824) with ``--blocks`` blocks and
deterministic random weights (``common.Pool``), inside the tiny pipeline of ``lorablend.fixtures.tiny_2026`` (its
text encoder and VAE are never run). The LoRA files have the real trainers' layouts at rank 16 in diffusers / PEFT
names, bf16, for the blocks that exist: Qwen-Image as diffusers' train script writes it (``to_q``, ``to_k``,
``to_v``, ``to_out.0`` of every block), Wan as musubi-tuner covers it (self- and cross-attention q / k / v / o,
``ffn.0``, ``ffn.2`` of every block). Both systems read the same files (diffusers: its own loader and PEFT).

Each system runs in its own subprocess, one after the other, then a third process times the floors on the same
model and files: ``load_file`` + one copy, and one plain ``addmm(W0, U, D)`` per touched weight. Rows: first load
(fresh process), later loads, set_adapters (lorablend: with its deferred rebuild, ``prepare()``), fuse 2 adapters,
unfuse (and whether the weights come back bit for bit).

    python benchmarks/bench_2026.py --model qwen-image --blocks 2 --threads 2
    python benchmarks/bench_2026.py --model wan-14b --blocks 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

# the real transformer configs (../shared/realdata/newfamily_loras/2026/configs), copied: a bench machine may lack it
MODELS = {
    "qwen-image": ("qwen", {"attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": False,
                            "in_channels": 64, "joint_attention_dim": 3584, "num_attention_heads": 24,
                            "num_layers": 60, "out_channels": 16, "patch_size": 2},
                   "transformer_blocks", ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")),
    "wan-14b": ("wan", {"added_kv_proj_dim": None, "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06,
                        "ffn_dim": 13824, "freq_dim": 256, "in_channels": 16, "num_attention_heads": 40,
                        "num_layers": 40, "out_channels": 16, "patch_size": [1, 2, 2],
                        "qk_norm": "rms_norm_across_heads", "text_dim": 4096},
                "blocks", ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                           "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")),
}
FILES = ["A", "B", "C", "D"]  # A, B: the fused pair; C, D: more loads for the median
WEIGHTS = [0.7, 0.8]


def build(args, meta: bool = False) -> tuple:
    """(transformer with random real-width weights, its pool, the pipeline around it, touched [(path, shape)]);
    ``meta``: the module tree only (names and shapes, no memory)."""
    from lorablend.fixtures.tiny_2026 import tiny_2026_pipeline

    family, config, stack, suffixes = MODELS[args.model]
    pipe = tiny_2026_pipeline(family)
    cls = type(pipe.transformer)
    with torch.device("meta"):
        transformer = cls.from_config({**config, "num_layers": args.blocks})
    if meta:
        return transformer, None, pipe, _targets(transformer, stack, suffixes)
    transformer = transformer.to_empty(device="cpu")
    pool = C.Pool(args.seed, "cpu")
    for name, p in transformer.named_parameters():
        C._fill_param(pool, name, p.data)
    transformer.eval().requires_grad_(False)
    pipe.transformer = transformer
    return transformer, pool, pipe, _targets(transformer, stack, suffixes)


def _targets(transformer, stack: str, suffixes: tuple[str, ...]) -> list[tuple[str, tuple]]:
    return [(name, tuple(m.weight.shape)) for name, m in transformer.named_modules()
            if name.startswith(stack + ".") and name.endswith(suffixes) and isinstance(m, torch.nn.Linear)]


def write_files(args, targets) -> dict[str, str]:
    from safetensors.torch import save_file

    folder = Path(args.cache) / f"{args.model}-b{args.blocks}"
    folder.mkdir(parents=True, exist_ok=True)
    pool, files = C._lora_pool(), {}
    for name in FILES:
        path = folder / f"{name}-peft-r{args.rank}.safetensors"
        if not path.exists():
            sd = {}
            for module, shape in targets:
                down, up = C.lora_tensors(pool, name, module, shape, args.rank)
                sd[f"transformer.{module}.lora_A.weight"] = down.to(torch.bfloat16)
                sd[f"transformer.{module}.lora_B.weight"] = up.to(torch.bfloat16)
            save_file(sd, str(path))
        files[name] = str(path)
    return files


def run_system(args) -> dict:
    import bench_runtime as R
    import floor

    C.setup_threads(args.threads)
    C.quiet_libraries()
    files = json.loads(Path(args.files).read_text())
    transformer, pool, pipe, targets = build(args)
    out: dict = {"system": args.system, "times": {}, "touched": len(targets),
                 "touched_weights": sum(torch.Size(s).numel() for _, s in targets),
                 "params": sum(p.numel() for p in transformer.parameters())}
    T = out["times"]
    if args.system == "floor":
        rows, kept = floor.load_floor([Path(files[n]) for n in FILES], "cpu")
        T["load_first"], T["load_later"] = rows[0], floor.median_row(rows[1:])
        layers = []
        for path, _ in targets:
            w = transformer.get_submodule(path).weight.detach()
            ups = [kept[i][f"transformer.{path}.lora_B.weight"].to(w) * WEIGHTS[i] for i in range(2)]
            downs = [kept[i][f"transformer.{path}.lora_A.weight"].to(w) for i in range(2)]
            layers.append((w, torch.cat(ups, 1).contiguous(), torch.cat(downs, 0).contiguous()))
        T.update(floor.fuse_floor(layers, "cpu", args.cycles))
        return out
    if args.system == "ours":
        import lorablend

        pipe = lorablend.DiffusionPipeline(pipe, keep_fuse_buffers=args.keep_fuse_buffers)
        settle = pipe.prepare
    else:
        import peft.tuners.lora  # noqa: F401  (imported out of the clock)

        def settle():
            return None
    rows = [C.once_row(lambda n=n: pipe.load_lora_weights(files[n], adapter_name=n), "cpu")[0] for n in FILES]
    T["load_first"], T["load_later"] = rows[0], floor.median_row(rows[1:])
    flip = [0]

    def set_two():
        flip[0] ^= 1
        pipe.set_adapters(FILES[:2], adapter_weights=WEIGHTS if flip[0] else [0.6, 0.9])
        settle()

    T["set_adapters"] = C.timed(set_two, "cpu", repeats=args.set_repeats)
    pipe.set_adapters(FILES[:2], adapter_weights=WEIGHTS)
    fus, unf = [], []
    for _ in range(args.cycles + 1):
        fus.append(C.once_row(lambda: (pipe.fuse_lora(components=["transformer"], adapter_names=FILES[:2]),
                                       settle()), "cpu")[0])
        unf.append(C.once_row(lambda: (pipe.unfuse_lora(components=["transformer"]), settle()), "cpu")[0])
    T["fuse_first"], T["unfuse_first"] = fus[0], unf[0]
    T["fuse_later"], T["unfuse_later"] = floor.median_row(fus[1:]), floor.median_row(unf[1:])
    out["restore"] = R.restore_error(transformer, pool, targets)
    return out


def _cell(row: dict | None) -> str:
    return "—" if row is None else f"{C.fmt_s(row['median'])} (cpu {C.fmt_s(row.get('cpu', row['median']))})" \
        if "cpu" in row else C.fmt_s(row["median"])


def _ratio(a: dict | None, b: dict | None) -> str:
    return "—" if a is None or b is None else f"{a['median'] / b['median']:.2f}"


def report(args, results: dict) -> str:
    ours, theirs, fl = (results.get(k, {}).get("times", {}) for k in ("ours", "theirs", "floor"))
    info = C.machine_info()
    head = (f"### {args.model} transformer (real width, {args.blocks} blocks, "
            f"{results['ours']['params'] / 1e9:.2f} B weights, random), cpu float32; PEFT LoRAs rank {args.rank}, "
            f"bf16, {results['ours']['touched']} touched weights ({results['ours']['touched_weights'] / 1e6:.0f} M "
            f"entries); {info.get('cpu', '?')}, {args.threads} threads")
    rows = []
    for key, label, floor_key in (("load_first", "**first** load_lora_weights, fresh process", "load_first"),
                                  ("load_later", "later loads (median of 3)", "load_later"),
                                  ("set_adapters", "set_adapters (2 adapters, settled)", None),
                                  ("fuse_first", "fuse_lora 2 adapters, first", "fuse_first"),
                                  ("fuse_later", f"fuse_lora 2 adapters, later (median of {args.cycles})"
                                   + (", into the kept fused tensors (floor: into reused outputs)"
                                      if args.keep_fuse_buffers else ""),
                                   "fuse_reused" if args.keep_fuse_buffers else "fuse_later"),
                                  ("unfuse_first", "unfuse_lora, first", None),
                                  ("unfuse_later", "unfuse_lora, later", None)):
        f = fl.get(floor_key) if floor_key else None
        rows.append([label, _cell(ours.get(key)), _cell(theirs.get(key)), _cell(f),
                     _ratio(ours.get(key), theirs.get(key)), _ratio(ours.get(key), f),
                     _ratio(*(None if r is None or "cpu" not in r else {"median": r["cpu"]}
                              for r in (ours.get(key), f)))])
    table = C.table(["row", "lorablend", "diffusers+PEFT", "floor", "ours/theirs", "ours/floor",
                     "ours/floor cpu"], rows)
    restore = (f"after unfuse: lorablend {results['ours']['restore']['not_bit_exact']} / "
               f"{results['ours']['restore']['of']} touched weights not bit-exact (max |W-W0| "
               f"{results['ours']['restore']['max_abs']:.1e})")
    if "theirs" in results:
        restore += (f"; diffusers+PEFT {results['theirs']['restore']['not_bit_exact']} "
                    f"(max {results['theirs']['restore']['max_abs']:.1e})")
    return "\n".join([head, "", table, "", restore, ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="qwen-image")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cycles", type=int, default=2)
    p.add_argument("--set-repeats", type=int, default=3)
    p.add_argument("--keep-fuse-buffers", action="store_true",
                   help="lorablend keeps the fused tensors across unfuse (keep_fuse_buffers=True): a later fuse writes "
                        "into them, against the floor's addmm into reused outputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(C.REPO / "bench-output" / "lora-cache"))
    p.add_argument("--outdir", default=str(C.REPO / "bench-output"))
    p.add_argument("--systems", default="ours,theirs,floor",
                   help="the systems to run, comma-separated, in order (ours,floor: compare code versions quickly)")
    p.add_argument("--system", choices=["ours", "theirs", "floor"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--files", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.system:
        print(json.dumps(run_system(args)))
        return
    _, _, _, targets = build(args, meta=True)
    files = Path(args.outdir) / f"{args.model}-files.json"
    files.parent.mkdir(parents=True, exist_ok=True)
    files.write_text(json.dumps(write_files(args, targets)))
    del targets
    results, loads = {}, []
    for system in args.systems.split(","):
        t0 = time.perf_counter()
        loads.append(os.getloadavg()[0])  # the machine may be shared: say how busy it was
        cmd = [sys.executable, __file__, *sys.argv[1:], "--system", system, "--files", str(files)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"{system} failed:\n{done.stderr[-3000:]}")
        results[system] = json.loads(done.stdout.strip().splitlines()[-1])
        C.log(f"{system}: {time.perf_counter() - t0:.0f} s")
    import lorablend

    loads.append(os.getloadavg()[0])
    print(report(args, results))
    print(f"load average (1 min) at each system's start and at the end: {' / '.join(f'{x:.1f}' for x in loads)}; "
          f"lorablend from {Path(lorablend.__file__).parent}")


if __name__ == "__main__":
    main()
