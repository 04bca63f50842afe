"""``lorablend eval merges``'s flags and run (``cli.py`` only registers it): draw, judge, write ``table.md``,
``results.json`` and ``chart.png`` into the output folder, print the table. ``lorablend eval base`` prints how
often the base drawing model draws a caption's shape, colour and background (:mod:`.captions`).

>>> seeds_arg("0-3")
[0, 1, 2, 3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DESCRIPTION = (
    "Measure which way of combining a subject LoRA with a style LoRA keeps both concepts: on the shipped drawing "
    "model, for each pair (subject sks x style stripes / outline) and each method, draw one image per seed and "
    "count the images where the shipped judge sees both concepts, the subject alone, the style alone, or neither. "
    "Writes OUT/table.md, OUT/results.json and OUT/chart.png. 'eval base' instead prints the share of images "
    "where the judge reads the caption's shape, colour and background (held-out captions; --every: all 90).")


def seeds_arg(text: str) -> list[int]:
    """``"0-15"`` or ``"0,3,7"`` as a list of seeds."""
    try:
        if "-" in text:
            lo, hi = (int(v) for v in text.split("-", 1))
            return list(range(lo, hi + 1))
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: give a range such as 0-15 or a list such as 0,3,7") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``eval merges``. >>> add_arguments(argparse.ArgumentParser())"""
    from .merges import METHODS, STYLES

    from .captions import SCHEDULERS

    p.add_argument("what", choices=["merges", "base"],
                   help="what to evaluate (merges: LoRA merge methods; base: the base model against its captions)")
    p.add_argument("--seeds", type=seeds_arg, default=list(range(16)), help="seeds, e.g. 0-15 (default) or 0,1")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated (default all: {','.join(METHODS)})")
    p.add_argument("--styles", default=",".join(STYLES), help="style LoRAs paired with the subject (default all)")
    p.add_argument("--steps", type=int, default=None, help="inference steps (default: the model's 20)")
    p.add_argument("-o", "--output", default="eval-merges", help="output folder (default eval-merges)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    p.add_argument("--guidance", type=float, default=None, help="eval base: guidance scale (default: the model's)")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="ddim", help="eval base: sampler (default ddim)")
    p.add_argument("--every", action="store_true", help="eval base: all 90 captions, not only the held-out 9")


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    """Register ``lorablend eval`` on the CLI's subparsers. >>> add_subcommand(argparse.ArgumentParser().add_subparsers())"""
    p = sub.add_parser("eval", description=DESCRIPTION, help="eval merges: which LoRA merge keeps a subject and a "
                       "style (the drawing model and its judge)")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate, write the files, print the table (or JSON); ``eval base`` prints one line (or JSON)."""
    if args.what == "base":
        return run_base(args)
    from ..images.drawing import save_png
    from ..outputs import atomic_file
    from .chart import merge_chart
    from .merges import evaluate_merges

    methods = [m for m in args.methods.split(",") if m]
    styles = [s for s in args.styles.split(",") if s]
    result = evaluate_merges(seeds=args.seeds, methods=methods, styles=styles, steps=args.steps)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    table = result.table()
    for name, text in (("table.md", table + "\n"), ("results.json", json.dumps(result.as_json(), indent=2) + "\n")):
        with atomic_file(out / name, overwrite=True) as tmp:
            Path(tmp).write_text(text)
    save_png(merge_chart(result), out / "chart.png", overwrite=True)
    print(json.dumps(result.as_json()) if args.json else f"{table}\n\n{out / 'chart.png'}")
    return 0


def run_base(args: argparse.Namespace) -> int:
    """``eval base``: the base model's caption accuracy at the given sampling settings, as one line (or JSON)."""
    from .captions import prompt_accuracy

    result = prompt_accuracy(seeds=args.seeds, every=args.every, steps=args.steps, guidance=args.guidance,
                             scheduler=args.scheduler)
    summary = {**result.settings, "images": result.n, **{k: result.share(k) for k in result.counts}}
    print(json.dumps(summary) if args.json else result.line())
    return 0
