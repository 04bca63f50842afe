"""The ``lorablend`` command: argument parsing and printing only; the work is the library's.

Each subcommand is one ``_add_<name>(subparsers)`` function that builds its parser and sets ``func`` to one
``_cmd_<name>(args) -> int`` function; ``SUBCOMMANDS`` lists the adders in ``--help`` order. To add a command,
write those two functions and append the adder to ``SUBCOMMANDS``.

Conventions: every command takes ``--json`` (one JSON document on stdout); exit 0 only on success; an error
prints ONE line ``lorablend: error: …`` on stderr (with ``--json`` also ``{"error": …, "exit_code": …}`` on
stdout) and exits 2 (bad input or usage) or 1 (anything else);
progress bars go to stderr and only on a terminal.

>>> main(["inspect", "style.safetensors", "--json"])                 # doctest: +SKIP
0
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import UsageError
from .evaluate.command import add_subcommand as _add_eval  # (argparse only until it runs)

PROG = "lorablend"


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage block and exits; we want one line and a return code from main().
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _failed(text: str, code: int, as_json: bool) -> int:
    """Report a failed command (one line on stderr; with ``--json`` also JSON on stdout) and return its code."""
    print(f"{PROG}: error: {text}", file=sys.stderr)
    if as_json:
        _print_json({"error": text, "exit_code": code})
    return code


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    return " ".join(text.split())


# ---------------------------------------------------------------- inspect


def _add_family_flag(p: argparse.ArgumentParser) -> None:
    """``--family``: read a file whose layers fit several models alike as this one (``load_adapter(family=)``)."""
    from .adapter import FAMILIES

    p.add_argument("--family", default=None, choices=FAMILIES, metavar="FAMILY",
                   help="read the file(s) as this family's LoRA when the layers fit several models alike (one of "
                        + ", ".join(FAMILIES) + "; default: from the file)")


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="show what a LoRA file holds: format, family, layers, ranks, blocks, metadata, key report",
        description="Read a LoRA file (any supported format) and summarise it; nothing is written.",
    )
    p.add_argument("file", help="a LoRA file (.safetensors, .bin, .pt) or a folder holding one")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("--keys", type=int, default=10, metavar="N", help="list at most N unmapped keys (default 10)")
    p.add_argument("other", nargs="?", default=None, metavar="FILE2",
                   help="with --plot: a second LoRA file, to draw the per-layer cosine similarity of the two")
    p.add_argument("--plot", default=None, metavar="OUT.png",
                   help="also draw a heatmap PNG: ||dW|| per block and layer type (or, with FILE2, their cosine similarity)")
    p.add_argument("--overwrite", action="store_true", help="with --plot: replace OUT.png if it exists")
    _add_family_flag(p)
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .offline.inspection import inspect_file, render_text

    if args.other is not None or args.plot is not None:
        return _cmd_inspect_plot(args)
    info = inspect_file(args.file, max_keys=args.keys, family=args.family)
    if args.json:
        _print_json(info)
    else:
        print(render_text(info))
    return 0


def _cmd_inspect_plot(args: argparse.Namespace) -> int:
    from .offline.inspection import inspect_file, render_text
    from .images.plot import plot_files

    if args.plot is None:
        raise UsageError(f"a second file ({args.other}) is only for --plot OUT.png, which compares two LoRAs")
    heat, out = plot_files(args.file, args.plot, args.other, overwrite=args.overwrite)
    if args.json:
        data = {"plot": str(out), **heat.to_dict()}
        if args.other is None:
            data["inspect"] = inspect_file(args.file, max_keys=args.keys, family=args.family)
        _print_json(data)
    else:
        if args.other is None:
            print(render_text(inspect_file(args.file, max_keys=args.keys, family=args.family)))
        print(f"wrote {out}: {heat.title} ({len(heat.rows)} blocks x {len(heat.cols)} layer types)")
    return 0


# ---------------------------------------------------------------- convert


def _add_convert(sub: argparse._SubParsersAction) -> None:
    from .io.write import WRITE_FORMATS

    p = sub.add_parser(
        "convert",
        help="rewrite a LoRA file in diffusers, kohya or ai-toolkit format",
        description=(
            "Read a LoRA file in any supported format and write it in diffusers format (what "
            "pipe.load_lora_weights reads; low-rank layers only), kohya format (what A1111 and ComfyUI read; "
            "every layer kind, LyCORIS included; Flux / SD3 in sd-scripts' BFL / SAI names, fused qkv as one LoRA) "
            "or ai-toolkit format (Flux / SD3: ComfyUI's diffusion_model.<BFL name>.lora_A / lora_B). "
            "The family comes from the file. The input is never overwritten."
        ),
    )
    p.add_argument("input", help="the LoRA file to read")
    p.add_argument("output", help="the .safetensors file to write (or an existing folder)")
    p.add_argument("--to", required=True, choices=list(WRITE_FORMATS), help="the output format")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="cast the weights (default: keep)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    _add_family_flag(p)
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from .offline.jobs import convert_file

    result = convert_file(args.input, args.output, to=args.to, dtype=args.dtype, overwrite=args.overwrite,
                          progress=not args.json, family=args.family)
    if args.json:
        _print_json(result)
    else:
        c = result["report"]
        print(
            f"wrote {result['output']} ({args.to} format, {result['layers']} layers, {result['bytes']:,} bytes) "
            f"from {args.input} ({result['from_format']}, {result['family']}); "
            f"source keys: {c['mapped']} mapped, {c['unsupported']} unsupported, {c['unknown']} unknown"
        )
        u = result["unplaced"]
        if u["kept"] or u["dropped"]:
            print(f"keys no layer took: {u['kept']} kept, {u['dropped']} dropped ({u['why']}), e.g. {u['keys'][:3]}")
    return 0


# ---------------------------------------------------------------- merge


def _add_merge(sub: argparse._SubParsersAction) -> None:
    from .merge import METHODS
    from .io.write import WRITE_FORMATS

    p = sub.add_parser(
        "merge",
        help="merge LoRA files into one LoRA file (svd, cat, ties, dare, ...), with a per-layer error report",
        description=(
            "Merge LoRA files (any supported format and kind: LoRA, LoCon, LoHa, LoKr, full diff) into one LoRA. "
            "'cat' is exact (rank = sum of ranks); 'svd' is the best rank-k approximation of the exact weighted sum, "
            "computed from the factors; ties/dare/magnitude_prune follow PEFT. Inputs are never overwritten and "
            "nothing is written on error."
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="FILE[:WEIGHT]", help="LoRA files, each with an optional weight (default 1), e.g. style.safetensors:0.7")
    p.add_argument("-o", "--output", required=True, help="the .safetensors file to write (or an existing folder)")
    p.add_argument("--method", default="svd", choices=METHODS, help="combination method (default svd)")
    p.add_argument("--rank", type=int, default=None, help="output rank for svd methods (default: largest input rank per layer)")
    p.add_argument("--energy", type=float, default=None, help="svd: per-layer rank keeping this fraction of the squared singular values, e.g. 0.99")
    p.add_argument("--clamp", type=float, default=None, help="svd: clamp factor values at this quantile, as kohya (e.g. 0.99)")
    p.add_argument("--density", type=float, default=None, help="ties/dare/magnitude_prune: fraction of values kept, in (0, 1]")
    p.add_argument("--majority-sign", default="total", choices=["total", "frequency"], help="ties/dare_ties sign election")
    p.add_argument("--seed", type=int, default=None, help="dare: random seed (default 0; results are deterministic)")
    p.add_argument("--block-weights", default=None, metavar="JSON", help='per-block multipliers, e.g. \'{"IN04": 0.5, "M00": 0}\' or an LBW list')
    p.add_argument("--format", default="diffusers", choices=list(WRITE_FORMATS), help="output format (default diffusers)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="output dtype (default: the inputs' dtype, fp32 if they differ)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the math runs (default cpu)")
    p.add_argument("--name", default=None, help="name of the merged adapter (default: the input names joined by '+')")
    p.add_argument("--report", default=None, metavar="JSON_FILE", help="also write the per-layer merge report (rank, relative error) here")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT (and the report file) if they exist")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    _add_family_flag(p)
    p.set_defaults(func=_cmd_merge)


def _parse_weighted_input(spec: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:WEIGHT``. A colon followed by a path separator belongs to the path (``C:\\x``)."""
    if Path(spec).exists() or ":" not in spec:
        return spec, 1.0
    path, text = spec.rsplit(":", 1)
    if "/" in text or "\\" in text:
        return spec, 1.0
    try:
        weight = float(text)
    except ValueError:
        weight = float("nan")
    if not path or weight != weight or weight in (float("inf"), float("-inf")):
        raise UsageError(f"bad weight {text!r} in {spec!r}: write FILE:WEIGHT with a finite number, e.g. style.safetensors:0.7")
    return path, weight


def _cmd_merge(args: argparse.Namespace) -> int:
    from .offline.jobs import merge_files

    specs = [_parse_weighted_input(s) for s in args.inputs]
    block_weights = None
    if args.block_weights is not None:
        try:
            block_weights = json.loads(args.block_weights)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--block-weights is not JSON ({exc.msg}); write e.g. '{{\"IN04\": 0.5}}'") from None
    progress = sys.stderr.isatty() and not args.json
    merged = merge_files(
        specs, args.output, method=args.method, format=args.format, dtype=args.dtype, device=args.device,
        name=args.name, report_path=args.report, overwrite=args.overwrite, progress=progress, rank=args.rank,
        energy=args.energy, clamp=args.clamp, density=args.density, majority_sign=args.majority_sign, seed=args.seed,
        block_weights=block_weights, family=args.family,
    )
    result = merged.data
    if args.json:
        _print_json(result)
    else:
        print(f"wrote {result['output']} ({args.format}, {result['dtype']}, {result['layers']} layers, "
              f"{result['bytes']:,} bytes)")
        print(merged.summary)
    return 0


# ---------------------------------------------------------------- demo


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the Merge LoRAs guide end to end on the tiny drawing model (or a tiny pipeline of another "
             "family), offline, checking every step",
        description="Take the tiny drawing model and two of its LoRAs (or build a tiny pipeline of --family and two "
        "random LoRAs) offline, run load / set_adapters / generate / "
        "add_weighted_adapter / fuse / unload / save / reload / unfuse, check each step's invariant, and write "
        "the images (PNG) and a report to the output folder.",
    )
    p.add_argument("--output", default="demo-output", help="output folder (default: demo-output)")
    p.add_argument("--steps", type=int, default=None, help="inference steps per image (default 20 for the drawing "
                   "model, 2 for the random tiny families)")
    p.add_argument("--family", default="drawing", choices=["drawing", "sdxl", "flux", "sd3", "qwen", "qwen-edit", "wan", "wan22-a14b", "flux2", "zimage",
                   "chroma"], help="the pipeline's family (default drawing: the trained shapes model; the others are random; wan / wan22-a14b: videos, as frame strips)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .demo import run_demo
    from .io.hub import hf_progress_bars

    hf_progress_bars(False)  # our own bar over the steps, not diffusers' loading bars
    steps = run_demo(args.output, steps=args.steps, family=args.family, progress=not args.json)
    if args.json:
        _print_json({"output": str(args.output), "steps": [asdict(s) for s in steps]})
    else:
        for s in steps:
            print(f"{'ok ' if s.ok else 'FAIL'} {s.seconds:6.2f}s  {s.name}: {s.invariant}")
        print(f"images and report.md written to {args.output}/")
    return 0 if all(s.ok for s in steps) else 1


# ---------------------------------------------------------------- bake


def _bool_arg(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_bake(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bake",
        aliases=["fuse"],  # its first name; fuse_lora stays the in-memory pipeline operation
        help="bake LoRAs into a model: a diffusers pipeline folder or a single-file checkpoint (SD1.x, SD2.x, SDXL, "
             "Flux.1, SD3 / SD3.5, Qwen-Image, Wan, Flux.2, Z-Image, Chroma; GGUF and fp8 files too)",
        description=(
            "Write MODEL with the LoRAs fused in (W0 + lora_scale * sum of weight_i * dW_i, in fp32 from the original "
            "weights, cast once: the same weights as fuse_lora + save_pretrained). A single-file .safetensors "
            "checkpoint is streamed tensor by tensor (memory: about one tensor). Every layer is checked before "
            "anything is written; the output appears only when complete and never replaces an input."
        ),
    )
    p.add_argument("--model", required=True, help="a diffusers pipeline folder or a single-file .safetensors checkpoint")
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT]",
                   help="a LoRA file with an optional weight (default 1); repeat for several, e.g. --lora style.safetensors:0.7")
    p.add_argument("--lora-scale", type=float, default=1.0, help="global multiplier, as fuse_lora(lora_scale=...) (default 1)")
    p.add_argument("-o", "--output", required=True, help="the checkpoint file (or pipeline folder) to write")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="cast the output's float tensors (default: keep)")
    p.add_argument("--strict", type=_bool_arg, default=True, metavar="true|false",
                   help="false: bake the layers that fit and report the rest (default true: any misfit is an error)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.set_defaults(func=_cmd_bake)


def _cmd_bake(args: argparse.Namespace) -> int:
    from .offline.bake import bake

    specs = [_parse_weighted_input(s) for s in args.lora]
    progress = sys.stderr.isatty() and not args.json
    report = bake(args.model, specs, args.output, lora_scale=args.lora_scale, overwrite=args.overwrite, dtype=args.dtype,
                  strict=args.strict, progress=progress)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(report.summary())
    return 0


# ---------------------------------------------------------------- generate


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate an image (or an X/Y grid over LoRA weights and prompts) with LoRAs on a pipeline",
        description=(
            "Load a diffusers pipeline (folder or hub id) with LoRAs at their weights and write one PNG. With --grid, "
            "columns vary the weight of the first LoRA over --grid-weights; rows are the prompts (several --prompt), "
            "or, with one prompt and two LoRAs, the weight of the second LoRA over --grid-weights-y (default: the "
            "same values). Every cell starts from the same seed's noise."
        ),
    )
    p.add_argument("--model", required=True, help="a diffusers pipeline folder or a hub repo id")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="a LoRA file with an optional weight (default 1); repeat for several")
    p.add_argument("--prompt", action="append", required=True, help="the prompt; repeat for grid rows")
    p.add_argument("--negative-prompt", default=None, help="the negative prompt")
    p.add_argument("-o", "--output", required=True, help="the .png file to write")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--steps", type=int, default=30, help="inference steps (default 30)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default: the pipeline's)")
    p.add_argument("--grid", action="store_true", help="draw an X/Y grid instead of one image")
    p.add_argument("--grid-weights", default="0,0.5,1", metavar="W,W,...", help="X axis: weights of the first LoRA (default 0,0.5,1)")
    p.add_argument("--grid-weights-y", default=None, metavar="W,W,...", help="Y axis (one prompt, two LoRAs): weights of the second LoRA")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda when present)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.set_defaults(func=_cmd_generate)


def _weights_list(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v != v or abs(v) == float("inf") for v in values):
        raise UsageError(f"{flag} {text!r}: write comma-separated finite numbers, e.g. {flag} 0,0.5,1")
    return values


def _cmd_generate(args: argparse.Namespace) -> int:
    from .images.generate import GenerationSettings, generate_file

    specs = [_parse_weighted_input(s) for s in args.lora]
    x_weights = _weights_list(args.grid_weights, "--grid-weights") if args.grid else None
    y_weights = None
    if args.grid:
        if not specs:
            raise UsageError("--grid varies LoRA weights: pass at least one --lora FILE")
        if len(args.prompt) == 1 and len(specs) >= 2:
            y_weights = _weights_list(args.grid_weights_y or args.grid_weights, "--grid-weights-y")
        elif args.grid_weights_y is not None:
            raise UsageError("--grid-weights-y needs one --prompt and two --lora files (rows are the prompts otherwise)")
    elif len(args.prompt) > 1:
        raise UsageError(f"{len(args.prompt)} prompts but no --grid: pass one --prompt, or --grid for one row per prompt")
    dtype = None
    if args.dtype:
        from .io.write import parse_dtype

        dtype = parse_dtype(args.dtype)
    settings = GenerationSettings(seed=args.seed, steps=args.steps, width=args.width, height=args.height,
                                  guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt)
    result = generate_file(args.model, specs, args.prompt, args.output, settings, x_weights=x_weights,
                           y_weights=y_weights, device=args.device, dtype=dtype, overwrite=args.overwrite,
                           progress=sys.stderr.isatty() and not args.json)
    if args.json:
        _print_json(result)
    else:
        n = result["images"]
        print(f"wrote {result['output']} ({n} image{'s' if n != 1 else ''}, {result['seconds']:.1f} s)")
    return 0


# ---------------------------------------------------------------- sweep


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    from .sweep.command import DESCRIPTION, add_arguments

    p = sub.add_parser("sweep", description=DESCRIPTION, help="every prompt x seed x LoRA-weight mix of a "
                       "comparison, on one worker or a Ray cluster, resumable")
    add_arguments(p)
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .io.hub import hf_progress_bars
    from .sweep import run_sweep
    from .sweep.command import from_arguments

    progress = sys.stderr.isatty() and not args.json
    hf_progress_bars(False)  # our own bar, not diffusers' loading bars
    spec, run = from_arguments(args, progress)
    summary = run_sweep(spec, args.output, run)
    if args.json:
        _print_json(summary)
    else:
        print(f"{summary['output']}: {summary['made']} cells made, {summary['skipped']} kept from before, "
              f"{summary['cells']} in all ({summary['seconds']:.1f} s; {summary['switches']} LoRA switches, "
              f"{summary['switches_naive']} in the naive order); grid: {summary['grid']}")
    return 0


# ---------------------------------------------------------------- view


def _add_view(sub: argparse._SubParsersAction) -> None:
    from .ui.command import register

    register(sub)


# ---------------------------------------------------------------- serve


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from .serve.command import register

    register(sub)


# ---------------------------------------------------------------- main

SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_inspect,
    _add_convert,
    _add_merge,
    _add_demo,
    _add_bake,
    _add_generate,
    _add_sweep,
    _add_view,
    _add_serve,
    _add_eval,
)


def build_parser() -> argparse.ArgumentParser:
    """The full parser: ``lorablend --help`` lists every subcommand."""
    parser = _Parser(
        prog=PROG,
        description="Load, blend, merge, fuse and unfuse LoRA adapters on diffusers pipelines: SD1.x, SD2.x, SDXL, "
                    "Flux.1, SD3 / SD3.5, Qwen-Image, Wan 2.1 / 2.2, Flux.2, Z-Image, Chroma.",
    )
    try:
        from importlib.metadata import version

        parser.add_argument("--version", action="version", version=f"{PROG} {version('lorablend')}")
    except Exception:  # not installed (running from a source tree): no --version
        pass
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lorablend`` command line; returns the exit status (0 only on success).

    >>> main(["--help"])                                               # doctest: +SKIP
    """
    if argv is None:
        # Run as the `lorablend` program, the command line owns the process: keep the libraries' import-time
        # chatter (transformers' notes on missing optional backends) out of stderr, where an error must be one
        # line. Users may still override; called as a function (argv given), the caller's settings stand.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        # diffusers imports the quantization libraries when installed: their start-up notes are not ours to print
        for name in ("bitsandbytes", "torchao", "torch.utils._pytree"):
            logging.getLogger(name).setLevel(logging.ERROR)
    parser = build_parser()
    as_json = "--json" in (sys.argv[1:] if argv is None else argv)  # (known even when parsing fails)
    try:
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            parser.print_help(sys.stderr)
            return 2
        return int(args.func(args) or 0)
    except SystemExit as exc:  # --help / --version exit through argparse
        return int(exc.code or 0) if isinstance(exc.code, int) else 0
    except UsageError as exc:
        return _failed(_one_line(exc), 2, as_json)
    except KeyboardInterrupt as exc:  # (a sweep says how to resume)
        return _failed(f"interrupted: {exc}" if str(exc) else "interrupted", 130, as_json)
    except (ValueError, OSError) as exc:  # LoraFormatError / LoraCompatibilityError are ValueErrors
        return _failed(_one_line(exc), 2, as_json)
    except Exception as exc:  # a bug: still one line, but say what kind so it can be reported
        return _failed(f"internal error ({type(exc).__name__}): {_one_line(exc)}", 1, as_json)


if __name__ == "__main__":
    raise SystemExit(main())
