"""Offline start-up: `lorablend inspect` / `convert` / `merge` on a small LoRA file vs the floor of any such tool,
`python -c "import torch, safetensors.torch"`, each a fresh process, measured in the same run.

A user feels the whole process: interpreter start, imports, reading the file, the work, exit. The floor is what
any tool that reads a safetensors LoRA with torch must pay; the target is ours ≤ 1.5× the floor. The input is
a kohya SD1.5 LoRA (rank 4, fp16, every Linear of the UNet's attention blocks and of the text encoder:
232 layers, 4.4 MB, like a small downloaded LoRA), written into bench-output/; `--file` times another one.

Rounds are interleaved (floor, then each command, then again) so that a burst of load on a shared machine
falls on all rows alike; one untimed round first fills the page cache and the bytecode caches. Each figure is
the median of `--repeats` fresh processes.

    .venv/bin/python benchmarks/bench_offline.py                 # what `make bench` runs (via run_cpu.py)
    .venv/bin/python benchmarks/bench_offline.py --repeats 7 --file my_lora.safetensors
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

TARGET_RATIO = 1.5
FLOOR = "import torch, safetensors.torch"


def write_small_lora(path: Path, rank: int = 4) -> Path:
    """A kohya SD1.5 LoRA over the UNet's attention layers and the text encoder's Linears (seeded, fp16)."""
    from safetensors.torch import save_file

    from lorablend.naming import standard_index

    idx = standard_index("sd1")
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for key, info in idx.modules.items():
        attention = info.component == "unet" and ".attentions." in key and info.kind == "linear"
        if not (attention or info.component == "text_encoder"):
            continue
        name = idx.kohya_name(key)
        out_f, in_f = info.weight_shape[:2]
        tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, in_f, generator=g) / in_f**0.5).half()
        tensors[f"{name}.lora_up.weight"] = (torch.randn(out_f, rank, generator=g) * 1e-3).half()
        tensors[f"{name}.alpha"] = torch.tensor(float(rank)).half()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(rank)})
    return path


def commands(lora: Path, work: Path) -> dict[str, list[str]]:
    """The timed command lines: the floor, then ours as a user types them (``python -m lorablend`` is what the
    ``lorablend`` script runs)."""
    py = sys.executable
    ours = [py, "-m", "lorablend"]
    return {
        "floor: import torch, safetensors.torch": [py, "-c", FLOOR],
        "import lorablend": [py, "-c", "import lorablend"],
        "load_adapter (no model)": [py, "-c", f"import lorablend; lorablend.load_adapter({str(lora)!r})"],
        "lorablend inspect": [*ours, "inspect", str(lora)],
        "lorablend convert --to diffusers": [*ours, "convert", str(lora), str(work / "converted.safetensors"),
                                             "--to", "diffusers", "--overwrite"],
        "lorablend merge --method cat (2 inputs)": [*ours, "merge", str(lora), f"{lora}:0.5", "-o",
                                                    str(work / "merged_cat.safetensors"), "--method", "cat",
                                                    "--overwrite"],
        # svd (the default) is the one row with real work: a QR of both factors and an SVD per layer
        "lorablend merge (svd, 2 inputs)": [*ours, "merge", str(lora), f"{lora}:0.5", "-o",
                                            str(work / "merged_svd.safetensors"), "--overwrite"],
    }


def wall(cmd: list[str]) -> float:
    """Wall time of one fresh process that must succeed."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return elapsed


def run(args: argparse.Namespace) -> dict:
    out = Path(args.outdir)
    work = out / "offline"
    lora = Path(args.file) if args.file else write_small_lora(work / "small_sd15_kohya_r4.safetensors")
    cmds = commands(lora, work)
    for cmd in cmds.values():  # untimed: page cache, __pycache__
        wall(cmd)
    samples: dict[str, list[float]] = {name: [] for name in cmds}
    for r in range(args.repeats):
        for name, cmd in cmds.items():
            samples[name].append(wall(cmd))
        C.log(f"offline round {r + 1}/{args.repeats}: " + ", ".join(f"{s[-1]:.2f}" for s in samples.values()))
    floor_name = next(iter(cmds))
    floor = statistics.median(samples[floor_name])
    rows = {
        name: {"median_s": statistics.median(s), "samples_s": s, "ratio_to_floor": statistics.median(s) / floor}
        for name, s in samples.items()
    }
    info = C.machine_info()
    return {
        "cpu": info["cpu"],
        "nproc": info["nproc"],
        "versions": {k: info[k] for k in ("python", "torch", "safetensors", "diffusers", "transformers")},
        "file": str(lora),
        "file_bytes": lora.stat().st_size,
        "repeats": args.repeats,
        "target_ratio": TARGET_RATIO,
        "rows": rows,
    }


def report(res: dict) -> str:
    rows = []
    for name, row in res["rows"].items():
        ratio = row["ratio_to_floor"]
        verdict = "" if name.startswith("floor") else ("ok" if ratio <= TARGET_RATIO else "over target")
        spread = f"{min(row['samples_s']):.2f}–{max(row['samples_s']):.2f}"
        rows.append([name, f"{row['median_s']:.2f} s", spread, f"{ratio:.2f}×", verdict])
    return "\n".join([
        f"## Offline start-up: fresh process per command, median of {res['repeats']} (target ≤ {TARGET_RATIO}× floor)",
        "",
        f"CPU: {res['cpu']} ({res['nproc']} cores). File: {Path(res['file']).name}, {res['file_bytes']:,} bytes.",
        "",
        C.table(["command", "median wall", "range", "ours / floor", ""], rows),
        "",
        "Wall times of whole processes on this machine: when it is shared, other jobs' load shows up in every "
        "row; the ratio, measured in interleaved rounds of the same run, is the figure to read. The svd merge "
        "row also holds the merge's arithmetic (a QR of both factors and an SVD per layer), not start-up only.",
    ])


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="fresh processes per command (median; at least 3)")
    p.add_argument("--file", default=None, help="time this LoRA file instead of the generated small SD1.5 one")
    p.add_argument("--outdir", default=str(C.REPO / "bench-output"))
    args = p.parse_args(argv)
    if args.repeats < 3:
        p.error("--repeats must be at least 3 (a median of fewer is one noisy sample)")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    Path(args.outdir).mkdir(parents=True, exist_ok=True)
    res = run(args)
    text = report(res)
    print(text, flush=True)
    (Path(args.outdir) / "offline-cpu.md").write_text(text + "\n")
    (Path(args.outdir) / "offline-cpu.json").write_text(json.dumps(res, indent=1))
    return {"result": res, "text": text}


if __name__ == "__main__":
    main()
