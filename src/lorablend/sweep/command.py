"""``lorablend sweep``'s flags and how they become a :class:`SweepSettings` and a :class:`SweepRunSettings` (``cli.py`` keeps
only the printing). Bad values raise ``ValueError`` naming the flag (the command exits 2).

>>> numbers("0,0.5,1", "--weights")
[0.0, 0.5, 1.0]
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from .plan import SweepSettings
from .run import SweepRunSettings

DESCRIPTION = (
    "Make one image per cell (each prompt x each seed x each combination of --weights for the LoRAs) into "
    "OUT/images, one line per cell in OUT/manifest.jsonl (prompt, seed, weights, file, sha256, timings) and a "
    "labelled contact sheet OUT/grid.png. Cells are grouped by mix so a worker switches LoRAs once per group; "
    "rerun the same command to finish an interrupted sweep (done cells are kept). A cell's image does not depend "
    "on the engine or the number of workers. --engine ray spreads the cells over Ray actors (one pipeline each): "
    "a local Ray instance, or the cluster at --address.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The sweep's flags on its subparser. >>> add_arguments(argparse.ArgumentParser())"""
    p.add_argument("--model", required=True, help="a diffusers pipeline folder or a hub repo id")
    p.add_argument("--lora", action="append", default=[], metavar="FILE", help="a LoRA file; repeat for several")
    p.add_argument("--weights", default="0,0.5,1", metavar="W,W,...",
                   help="the weights each LoRA takes; every combination is a mix (default 0,0.5,1)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    p.add_argument("--negative-prompt", default=None, help="the negative prompt")
    p.add_argument("--seeds", default="0", metavar="S,S,...", help="noise seeds (default 0)")
    p.add_argument("--steps", type=int, default=30, help="inference steps (default 30)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default: the pipeline's)")
    p.add_argument("-o", "--output", required=True, help="the output folder (new, or a sweep's to resume it)")
    p.add_argument("--engine", default="local", choices=["local", "ray"], help="local: one worker here (default); ray: Ray actors")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="Ray workers, one pipeline each (default 1)")
    p.add_argument("--address", default=None, help="with --engine ray: a running Ray cluster (e.g. auto)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G", help="with --engine ray: GPUs per worker (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: cuda when the worker sees one)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--schedule", action="append", default=None, metavar="W@P,W@P",
                   help="a schedule axis: keyframes (sd-webui-loractl) multiplying every LoRA's weight over the steps, "
                        "e.g. 1@0,0@0.6 (--schedule=-1@0,... when it starts with a minus); 1 for constant weights; repeat for "
                        "several (default: constant only)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")


def numbers(text: str, flag: str, kind: Any = float) -> list:
    """Comma-separated finite numbers (``kind`` int for seeds), or ``ValueError`` naming ``flag``.

    >>> numbers("1,x", "--seeds", int)
    Traceback (most recent call last):
    ...
    ValueError: --seeds '1,x': write comma-separated numbers, e.g. --seeds 0,1,2
    """
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(not math.isfinite(v) for v in values):
        raise ValueError(f"{flag} {text!r}: write comma-separated numbers, e.g. {flag} 0,1,2")
    return values


def _schedule(text: str) -> str:
    """A ``--schedule`` value as the plan records it: "" for constant weights ("1", "const", "")."""
    text = text.strip()
    return "" if text in ("", "1", "1.0", "const", "constant") else text


def from_arguments(args: argparse.Namespace, progress: bool) -> tuple[SweepSettings, SweepRunSettings]:
    """The sweep the flags describe, and how to run it. >>> spec, run = from_arguments(args, False)  # doctest: +SKIP"""
    from ..images.generate import adapter_names

    names = adapter_names([(path, 1.0) for path in args.lora])
    spec = SweepSettings(args.model, list(zip(args.lora, names)), numbers(args.weights, "--weights"), args.prompt,
                     numbers(args.seeds, "--seeds", int), steps=args.steps, width=args.width, height=args.height,
                     guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
                     schedules=[_schedule(s) for s in (args.schedule or [""])])
    run = SweepRunSettings(engine=args.engine, workers=args.workers, address=args.address,
                   gpus_per_worker=args.gpus_per_worker, device=args.device, dtype=args.dtype, progress=progress)
    return spec, run


__all__ = ["DESCRIPTION", "add_arguments", "from_arguments", "numbers"]
