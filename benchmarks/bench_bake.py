"""Peak memory of ``lorablend fuse`` into a single-file checkpoint, against the checkpoint's size.

Writes a random fp16 checkpoint with the full SD1.5 layout (UNet + CLIP-L + VAE under their LDM names, ~2 GB),
a random rank-32 LoRA on every UNet attention and text-encoder layer, then runs the bake in a child process and
reads the child's ``ru_maxrss``. A second child does everything but the bake (imports, header, layout, LoRA
load) to show what the streaming itself adds. ``--naive`` also measures the load-everything way
(``load_file`` → fuse every tensor → ``save_file``) for the ratio.

    .venv/bin/python benchmarks/bench_bake.py [--workdir /tmp/bench_bake] [--naive] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def _sd15_shapes() -> dict[str, tuple[int, ...]]:
    """LDM name -> shape for SD1.5 (UNet, CLIP-L text encoder, VAE), from the real module trees on the meta device."""
    from diffusers import AutoencoderKL

    from lorablend.naming import standard_index  # noqa: F401  (builds the same meta models we read below)
    from lorablend.naming.configs import CLIP_L, SD1_UNET
    from lorablend.naming.ldm import ldm_unet_path
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    shapes: dict[str, tuple[int, ...]] = {}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SD1_UNET)
        te = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4)
    for name, p in unet.state_dict().items():
        module, _, leaf = name.rpartition(".")
        ldm = ldm_unet_path(module, dict(unet.config))
        shapes[f"model.diffusion_model.{ldm or module}.{leaf}"] = tuple(p.shape)
    for name, p in te.state_dict().items():
        name = name if name.startswith("text_model.") else "text_model." + name
        shapes["cond_stage_model.transformer." + name] = tuple(p.shape)
    for name, p in vae.state_dict().items():  # names do not matter for the bake (untouched): keep diffusers'
        shapes["first_stage_model." + name] = tuple(p.shape)
    return shapes


def write_checkpoint(path: Path, seed: int = 0) -> int:
    """A random fp16 checkpoint written tensor by tensor (this process never holds the whole model)."""
    from lorablend.io.write import atomic_write

    shapes = _sd15_shapes()
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    gen = torch.Generator().manual_seed(seed)

    def chunks():
        yield len(blob).to_bytes(8, "little") + blob
        for shape in shapes.values():
            yield (torch.randn(shape, generator=gen) * 0.02).half().reshape(-1).view(torch.uint8).numpy()

    atomic_write(path, chunks(), overwrite=True)
    return offset


def write_lora(path: Path, rank: int = 32, seed: int = 1) -> int:
    from lorablend.adapter import Adapter, LowRankDelta
    from lorablend.io import save_adapter
    from lorablend.naming import standard_index

    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for key, info in standard_index("sd1").modules.items():
        if ".attn1." in key or ".attn2." in key or "self_attn." in key or ".mlp." in key:
            out_f, in_f = info.weight_shape[0], math.prod(info.weight_shape[1:])
            deltas[key] = LowRankDelta(torch.randn(rank, in_f, generator=gen) * 0.01,
                                       torch.randn(out_f, rank, generator=gen) * 0.01, alpha=rank / 2)
    adapter = Adapter("bench", "sd1", deltas)
    save_adapter(adapter, path, format="kohya", overwrite=True, dtype="fp16")
    return len(deltas)


_CHILD = """
import resource, sys, time, json
from pathlib import Path
mode, ckpt, lora, out = sys.argv[1:5]
t = time.perf_counter()
if mode == "bake":
    from lorablend.offline.bake import bake
    r = bake(ckpt, [(lora, 0.8)], out, overwrite=True)
    info = {"touched": r.touched, "tensors": r.tensors}
elif mode == "prepare":  # everything a bake does before streaming
    from lorablend.offline.checkpoint import checkpoint_layout
    from lorablend.io import load_adapter
    from lorablend.runtime.binding import bind_adapter
    layout = checkpoint_layout(ckpt)
    bind_adapter(load_adapter(lora, target=layout.view.components), layout.view)
    info = {}
else:  # naive: the whole checkpoint in memory
    import torch
    from safetensors.torch import load_file, save_file
    from lorablend.offline.checkpoint import checkpoint_layout
    from lorablend.io import load_adapter
    from lorablend.runtime.fusion import fused_weight
    layout = checkpoint_layout(ckpt)
    adapter = load_adapter(lora, target=layout.view.components)
    sd = load_file(ckpt)
    for key, d in adapter.deltas.items():
        p = layout.placement(key)
        sd[p.weight_key] = fused_weight(sd[p.weight_key], [(0.8, d)])
    save_file(sd, out)
    info = {}
info["seconds"] = time.perf_counter() - t
info["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(info))
"""


def run_child(mode: str, ckpt: Path, lora: Path, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    done = subprocess.run([sys.executable, "-c", _CHILD, mode, str(ckpt), str(lora), str(out)],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/bench_bake")
    parser.add_argument("--naive", action="store_true", help="also measure load-everything -> fuse -> save")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt, lora, out = work / "sd15-random.safetensors", work / "lora.safetensors", work / "baked.safetensors"
    t = time.perf_counter()
    size = write_checkpoint(ckpt) if not ckpt.exists() else ckpt.stat().st_size
    layers = write_lora(lora)
    print(f"checkpoint {ckpt.stat().st_size / 2**20:,.0f} MiB, LoRA {lora.stat().st_size / 2**20:,.1f} MiB "
          f"({layers} layers, rank 32), written in {time.perf_counter() - t:.0f} s")
    from lorablend.offline.checkpoint import read_header

    largest = max(e.nbytes for e in read_header(ckpt).entries)
    prep = run_child("prepare", ckpt, lora, out)
    baked = run_child("bake", ckpt, lora, out)
    ck = ckpt.stat().st_size / 2**20
    print(f"largest tensor {largest / 2**20:.1f} MiB (fp16)")
    print(f"prepare only (imports, header, layout, LoRA): peak RSS {prep['maxrss_mib']:,.0f} MiB")
    print(f"bake (streaming):  peak RSS {baked['maxrss_mib']:,.0f} MiB = {baked['maxrss_mib'] / ck:.2f} x checkpoint; "
          f"streaming adds {baked['maxrss_mib'] - prep['maxrss_mib']:,.0f} MiB; {baked['seconds']:.1f} s, "
          f"{baked['touched']} layers fused in {baked['tensors']} tensors")
    if args.naive:
        naive = run_child("naive", ckpt, lora, work / "naive.safetensors")
        print(f"naive (load all, fuse, save_file): peak RSS {naive['maxrss_mib']:,.0f} MiB = "
              f"{naive['maxrss_mib'] / ck:.2f} x checkpoint; {naive['seconds']:.1f} s")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
