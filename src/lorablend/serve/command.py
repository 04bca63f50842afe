"""``lorablend serve``'s flags and its run (``cli.py`` keeps one call): one pipeline served over HTTP, locally or
on Ray Serve replicas. Importing this module needs no serve extra: fastapi / uvicorn are checked when serving.

>>> import argparse
>>> parser = argparse.ArgumentParser(); register(parser.add_subparsers())
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..errors import UsageError



def register(sub: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the CLI's subcommands (``cli.py`` calls this). >>> see the module"""
    p = sub.add_parser(
        "serve",
        help="serve a pipeline over HTTP: any LoRA mix per request (native, A1111 and OpenAI image APIs)",
        description=(
            "Load a diffusers pipeline once and serve it over HTTP (FastAPI + uvicorn). Each request names its own "
            "LoRA mix (files under --lora-dir, by stem): requests with the same settings are batched whatever their "
            "mixes (per-sample weights; a LoHa / LoKr mix batches by mix). Routes: /health, /metrics, /v1/loras, "
            "/v1/images, /sdapi/v1/txt2img and /sdapi/v1/img2img (A1111; the rest of A1111's start-up calls too), "
            "/v1/images/generations (OpenAI). Binds 127.0.0.1 "
            "unless --host says otherwise."
        ),
    )
    p.add_argument("--model", default=None, help="a diffusers pipeline folder or a hub repo id")
    p.add_argument("--lora-dir", default=None, help="the folder of LoRA files to serve (clients name them by stem)")
    p.add_argument("--demo", action="store_true", help="serve the shipped drawing model and its LoRAs (sks.diffusers, "
                   "stripes.kohya, outline.diffusers, ...) where --model / --lora-dir are not given")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--token", default=None,
                   help="require 'Authorization: Bearer TOKEN' on every route but /health (default: $LORABLEND_TOKEN)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda when present)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--cache-bytes", type=int, default=4 * 2**30, metavar="N",
                   help="bytes of parsed LoRAs kept in memory, least recently used out first (default 4 GiB)")
    p.add_argument("--max-batch", type=int, default=4, metavar="N",
                   help="images generated together for requests with the same settings, any mixes (default 4)")
    from .config import add_limit_flags  # (no fastapi: the serve extra is read only when serving)
    add_limit_flags(p)
    p.add_argument("--compile", action="store_true",
                   help="run the denoiser under torch.compile (DiffusionPipeline.compile_denoiser), when this build has it")
    p.add_argument("--quantize", default=None, help="quantize the denoiser's linears after loading: nf4, fp4, int8, "
                   "fp8, scaled-fp8, gguf-Q8_0, gguf-Q4_0 or torchao-int8 (LoRAs then run on the quantized base)")
    p.add_argument("--denoiser", default=None, metavar="FILE",
                   help="a single-file denoiser in place of --model's, read with --model's config: GGUF (city96's "
                   "flux1-dev-Q8_0.gguf …) or a plain fp8 .safetensors; LoRAs then run on it")
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local: one process, one pipeline (default); ray: Ray Serve replicas routed by LoRA mix")
    p.add_argument("--address", default=None,
                   help="with --engine ray: a running Ray cluster (e.g. auto); default: a local Ray instance")
    p.add_argument("--replicas", type=int, default=1, metavar="N", help="with --engine ray: pipeline replicas (default 1)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, metavar="G",
                   help="with --engine ray: GPUs per replica (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the flags, then serve until stopped (exit status). >>> run(args)                    # doctest: +SKIP"""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"lorablend serve needs the serve extra ({exc.name} is missing): "
                         "pip install 'lorablend[serve]'") from None
    from .config import ServeSettings, limits_given
    from .run import serve

    if args.demo:
        from ..fixtures.drawing_model import DRAWING_DIR, base_dir

        args.model, args.lora_dir = args.model or str(base_dir()), args.lora_dir or str(DRAWING_DIR / "loras")
    if not args.model or not args.lora_dir:
        raise UsageError("lorablend serve needs --model and --lora-dir (or --demo: the shipped drawing model)")
    if args.denoiser and (not os.path.isfile(args.denoiser)
                          or not args.denoiser.lower().endswith((".gguf", ".safetensors"))):
        raise UsageError(f"--denoiser {args.denoiser}: expected an existing .gguf or fp8 .safetensors file (a "
                         "single-file denoiser)")
    dtype = None
    if args.dtype:
        from ..io.write import parse_dtype
        dtype = parse_dtype(args.dtype)
    config = ServeSettings(lora_dir=args.lora_dir, token=args.token or os.environ.get("LORABLEND_TOKEN") or None,
                         cache_bytes=args.cache_bytes, max_batch=args.max_batch,
                         **limits_given(args)).check()
    if args.engine == "ray":
        return _serve_on_ray(args, config, dtype)
    if (args.address, args.replicas, args.gpus_per_replica) != (None, 1, 0.0):
        raise UsageError("--address, --replicas and --gpus-per-replica are for --engine ray")
    if args.compile:
        from .errors import CompileUnavailable
        from .run import check_compile

        try:
            check_compile()
        except CompileUnavailable as exc:
            raise UsageError(str(exc)) from None
    from ..io.hub import hf_progress_bars

    hf_progress_bars(False)  # a server's log: no loading bars
    serve(args.model, config, host=args.host, port=args.port, device=args.device, dtype=dtype, compile=args.compile,
          quantize=args.quantize, denoiser=args.denoiser)
    return 0


def _serve_on_ray(args: argparse.Namespace, config: Any, dtype: Any) -> int:
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        raise UsageError("--engine ray needs Ray Serve: pip install 'lorablend[ray]' (or use --engine local)") from None
    if args.quantize or args.denoiser:
        raise UsageError("--quantize and --denoiser are not available with --engine ray yet; use --engine local")
    from .ray_app import RayServeSettings, deploy

    options = RayServeSettings(replicas=args.replicas, gpus_per_replica=args.gpus_per_replica, address=args.address,
                              device=args.device, dtype=args.dtype, compile=args.compile).check()
    print(f"lorablend serve: {args.model} on Ray, {args.replicas} replica(s), http://{args.host}:{args.port} "
          f"(LoRAs from {config.lora_dir})", file=sys.stderr)
    deploy(args.model, config, options, host=args.host, port=args.port, blocking=True)
    return 0


__all__ = ["register", "run"]
