"""`svd` merge of two SDXL-shaped LoRAs: lorablend (from the factors) vs dense SVD per layer.

Inputs: two seeded rank-32 kohya LoRAs over the 722 SDXL attention layers (the files bench_runtime writes),
merged with weights 0.7 / 0.8 into rank 32 (the blend has rank 64, so this is the 64 → 32 truncation).
Compared, each against the exact weighted sum M = 0.7·ΔW_a + 0.8·ΔW_b (computed here from the raw file
tensors, independently of lorablend):

* lorablend.merge.merge([a, b], [0.7, 0.8], method="svd", rank=32)        — QR of the factors + a 64×64 SVD;
* kohya sd-scripts' svd_merge_lora algorithm: dense M, torch.linalg.svd(M) (full matrices), keep 32,
  clamp U·S and Vh at the 0.99 quantile                                    — what users run today;
* the best dense variant: torch.linalg.svd(M, full_matrices=False), keep 32, no clamp (the optimal rank-32
  approximation, so its error is the floor every method can reach);
* PEFT's add_weighted_adapter(..., combination_type="svd", svd_rank=32) on the same factors.

The dense methods cost seconds per large layer on a CPU; by default they run on one layer of each distinct
shape and the total is extrapolated by the shape counts (`--dense all` runs every layer). Errors are relative
Frobenius errors per layer, computed exactly from factors (‖U·D‖² = tr(UᵀU · DDᵀ)), never from a sample.

    python benchmarks/bench_merge.py --threads 2                 # CPU, sampled dense layers
    python benchmarks/bench_merge.py --device cuda --dense all
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

CLAMP_QUANTILE = 0.99  # kohya sd-scripts networks/svd_merge_lora.py


def sdxl_targets() -> list[tuple[str, tuple[int, ...]]]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        meta = UNet2DConditionModel.from_config(C.unet_config("sdxl"))
    return [(p, tuple(m.weight.shape)) for p, m in C.target_modules(meta)]


def raw_factors(path: Path, targets, device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (up·alpha/rank, down)} in fp32 read straight from a kohya file (no lorablend involved)."""
    from safetensors.torch import load_file

    from lorablend.naming import module_index

    sd = load_file(str(path))
    idx = module_index(family="sdxl")
    out = {}
    for p, _ in targets:
        k = idx.kohya_name("unet." + p)
        down = sd[f"{k}.lora_down.weight"].float().to(device)
        up = sd[f"{k}.lora_up.weight"].float().to(device)
        alpha = float(sd[f"{k}.alpha"]) if f"{k}.alpha" in sd else down.shape[0]
        out[p] = (up.reshape(up.shape[0], -1) * (alpha / down.shape[0]), down.reshape(down.shape[0], -1))
    return out


def sq_norm_lowrank(u: torch.Tensor, d: torch.Tensor) -> float:
    u, d = u.double(), d.double()
    return float(((u.T @ u) * (d @ d.T)).sum())


def rel_err(u: torch.Tensor, d: torch.Tensor, u_ref: torch.Tensor, d_ref: torch.Tensor) -> float:
    """‖U·D − U_ref·D_ref‖_F / ‖U_ref·D_ref‖_F without forming either product."""
    num = sq_norm_lowrank(torch.cat([u, -u_ref], 1), torch.cat([d, d_ref], 0))
    return max(num, 0.0) ** 0.5 / sq_norm_lowrank(u_ref, d_ref) ** 0.5


def kohya_svd(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(m)
    u = u[:, :rank] @ torch.diag(s[:rank])
    vh = vh[:rank, :]
    dist = torch.cat([u.flatten(), vh.flatten()])
    hi = torch.quantile(dist, CLAMP_QUANTILE)
    return u.clamp(-hi, hi), vh.clamp(-hi, hi)


def best_dense_svd(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


def peft_svd(shapes: list[tuple[str, tuple[int, ...]]], fa, fb, weights, rank, in_rank, alpha, device, repeats=1):
    """PEFT add_weighted_adapter(svd) on a model holding one Linear per listed layer; per-layer time and error."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    names = [f"l{i}" for i in range(len(shapes))]

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            for n, (_, s) in zip(names, shapes):
                setattr(self, n, nn.Linear(s[1], s[0], bias=False, device="meta"))

    model = Holder().to_empty(device=device)
    cfg = LoraConfig(r=in_rank, lora_alpha=alpha, target_modules=names, init_lora_weights=False)
    pm = get_peft_model(model, cfg, adapter_name="a")
    pm.add_adapter("b", cfg)
    with torch.no_grad():
        for n, (p, _) in zip(names, shapes):
            layer = getattr(pm.base_model.model, n)
            for tag, f in (("a", fa), ("b", fb)):
                up, down = f[p]
                layer.lora_A[tag].weight.copy_(down)
                layer.lora_B[tag].weight.copy_(up / (alpha / in_rank))  # the file's up; PEFT applies alpha/r
    total = float("inf")
    for i in range(repeats):  # best of n, as for the dense baselines
        C.sync(device)
        t0 = time.perf_counter()
        pm.add_weighted_adapter(["a", "b"], list(weights), f"m{i}", combination_type="svd", svd_rank=rank)
        C.sync(device)
        total = min(total, time.perf_counter() - t0)
    errs = {}
    with torch.no_grad():
        for n, (p, _) in zip(names, shapes):
            layer = getattr(pm.base_model.model, n)
            got = layer.get_delta_weight("m0").float()
            ref = weights[0] * (fa[p][0] @ fa[p][1]) + weights[1] * (fb[p][0] @ fb[p][1])
            errs[p] = float((got - ref).norm() / ref.norm())
    return total, errs


def run(args) -> dict:
    C.setup_threads(args.threads)
    C.quiet_libraries()
    device = torch.device(args.device)
    out: dict = {"errors": {}}
    targets = sdxl_targets()
    specs = [(n, "kohya", args.rank, args.rank / 2) for n in ("A", "B")]
    files = C.lora_files(Path(args.cache), "sdxl", targets, specs)
    fa, fb = raw_factors(files["A"], targets, device), raw_factors(files["B"], targets, device)
    w = tuple(args.weights)
    exact = {p: (torch.cat([w[0] * fa[p][0], w[1] * fb[p][0]], 1), torch.cat([fa[p][1], fb[p][1]], 0))
             for p, _ in targets}
    out["layers"] = len(targets)
    out["file_mib"] = files["A"].stat().st_size / 2**20

    # ---- ours
    try:
        from lorablend.io import load_adapter
        from lorablend.merge import merge

        a = load_adapter(str(files["A"]), name="a")
        b = load_adapter(str(files["B"]), name="b")
        def ours():
            return merge([a, b], list(w), method="svd", rank=args.out_rank,
                         device=args.device if device.type != "cpu" else None)

        merged = ours()  # warm-up
        r = C.timed(ours, device, repeats=args.repeats, warmup=0)
        out["ours_s"] = r["median"]
        out["ours_samples"] = r["samples"]
        errs = {}
        for p, _ in targets:
            delta = merged.deltas["unet." + p]
            up, down = delta.factors()
            errs[p] = rel_err(up.to(device), down.to(device), *exact[p])
        out["ours_err"] = errs
        out["ours_ranks"] = sorted({merged.deltas["unet." + p].rank for p, _ in targets})
    except Exception as e:  # noqa: BLE001
        out["ours_unavailable"] = f"{type(e).__name__}: {e}"
        C.log(traceback.format_exc())

    # ---- dense baselines, on one layer per distinct shape (or all)
    by_shape: dict[tuple, list[str]] = {}
    for p, s in targets:
        by_shape.setdefault(s, []).append(p)
    sample = [(ps[0], s) for s, ps in by_shape.items()] if args.dense == "sample" else list(targets)
    weight_of = {p: (len(by_shape[s]) if args.dense == "sample" else 1) for p, s in sample}
    out["dense_layers"] = len(sample)
    for label, fn in (("kohya", kohya_svd), ("best_dense", best_dense_svd)):
        total, errs = 0.0, {}
        for p, s in sample:
            u_e, d_e = exact[p]
            best = float("inf")
            for _ in range(args.dense_repeats):  # best of n: noise must not inflate the baseline
                C.sync(device)
                t0 = time.perf_counter()
                m = u_e @ d_e
                u, d = fn(m, args.out_rank)
                C.sync(device)
                best = min(best, time.perf_counter() - t0)
                del m
            total += best * weight_of[p]
            errs[p] = rel_err(u, d, u_e, d_e)
        out[f"{label}_s"] = total
        out[f"{label}_err"] = errs
        C.log(f"{label}: {total:.1f} s (extrapolated to {len(targets)} layers)")
    if args.peft:
        try:
            t_all, errs = 0.0, {}
            for p, s in sample:  # one layer per model so that the per-shape time can be extrapolated
                t, e = peft_svd([(p, s)], fa, fb, w, args.out_rank, args.rank, args.rank / 2, device,
                                args.dense_repeats)
                t_all += t * weight_of[p]
                errs.update(e)
            out["peft_s"] = t_all
            out["peft_err"] = errs
        except Exception as e:  # noqa: BLE001
            out["peft_unavailable"] = f"{type(e).__name__}: {e}"
            C.log(traceback.format_exc())
    out["maxrss_gib"] = C.Memory(device).mark("end")["maxrss_gib"]
    if device.type == "cuda":
        out["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def report(args, res: dict) -> str:
    sample = res.get("dense_layers")
    n = res.get("layers")
    scope = ("all layers" if args.dense == "all" else
             f"{sample} layers (one per distinct shape), extrapolated to {n} by shape counts") + \
        f"; baselines best of {args.dense_repeats} per layer, ours median of {args.repeats} whole merges"
    lines = [f"## svd merge: two SDXL LoRAs (rank {args.rank}, alpha {args.rank / 2:g}, {n} layers, "
             f"{res.get('file_mib', 0):.0f} MiB fp16 files), weights {list(args.weights)} → rank {args.out_rank}, "
             f"{args.device}", ""]
    if "ours_unavailable" in res:
        lines.append(f"**lorablend: not available ({res['ours_unavailable']})**")
    if "peft_unavailable" in res:
        lines.append(f"**PEFT add_weighted_adapter: not available ({res['peft_unavailable']})**")
    dense_keys = list(res.get("kohya_err", {}))

    def stats(errs: dict | None, keys=None) -> str:
        if not errs:
            return "—"
        vals = [errs[k] for k in (keys or errs) if k in errs]
        return f"median {statistics.median(vals):.4f}, max {max(vals):.4f}"

    ours = res.get("ours_s")
    rows = [["lorablend merge(method='svd') — all layers", C.fmt_s(ours), "1×",
             stats(res.get("ours_err")), stats(res.get("ours_err"), dense_keys)]]
    for key, label in (("kohya", "kohya svd_merge_lora algorithm (dense, full SVD, clamp 0.99)"),
                       ("best_dense", "dense SVD, full_matrices=False, no clamp (optimal)"),
                       ("peft", "PEFT add_weighted_adapter(combination_type='svd')")):
        t = res.get(f"{key}_s")
        if t is None:
            continue
        errs = res.get(f"{key}_err")
        rows.append([label + ("" if args.dense == "all" else " — extrapolated"), C.fmt_s(t),
                     f"{t / ours:.0f}×" if ours else "—", "—", stats(errs)])
    lines.append(C.table(["method", "time", "vs ours", "rel. error, all layers", "rel. error, timed dense layers"], rows))
    lines.append("")
    oe, be = res.get("ours_err", {}), res.get("best_dense_err", {})
    common = [k for k in be if k in oe]
    if common:
        gap = max(abs(oe[k] - be[k]) for k in common)
        lines.append(f"Per-layer error, ours − optimal dense truncation: max |difference| = {gap:.2e} over {len(common)} layers "
                     f"(target: same error). Dense layers timed: {scope}. Merged ranks: {res.get('ours_ranks')}.")
    lines.append(f"Target: ≥ 50× faster than the dense-SVD merge with the same per-layer error. "
                 f"Process peak RSS {res.get('maxrss_gib', float('nan')):.2f} GiB"
                 + (f", CUDA peak {res['cuda_peak_gib']:.2f} GiB" if "cuda_peak_gib" in res else "") + ".")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--out-rank", type=int, default=32)
    p.add_argument("--weights", type=float, nargs=2, default=[0.7, 0.8])
    p.add_argument("--dense", choices=["sample", "all"], default="sample")
    p.add_argument("--dense-repeats", type=int, default=2, help="dense baselines: best of n per layer")
    p.add_argument("--no-peft", dest="peft", action="store_false")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--outdir", default=str(C.REPO / "bench-output"))
    p.add_argument("--cache", default=str(C.REPO / "bench-output" / "lora-cache"))
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    Path(args.outdir).mkdir(parents=True, exist_ok=True)
    res = run(args)
    text = report(args, res)
    print(text, flush=True)
    dev = torch.device(args.device).type
    (Path(args.outdir) / f"merge-sdxl-{dev}.md").write_text(text + "\n")
    (Path(args.outdir) / f"merge-sdxl-{dev}.json").write_text(json.dumps(res, indent=1))
    return {"result": res, "text": text}


if __name__ == "__main__":
    main()
