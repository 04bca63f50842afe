"""``lorablend eval merges``: which way of combining a subject LoRA with a style LoRA keeps both, on the drawing
model, as its judge sees it.

For each pair (the subject ``sks``: a star; each style: ``stripes``, ``outline``) and each method, N images over
fixed seeds (prompt ``"a <colour> sks on a <colour> background"``, colours drawn from the seed), and the share of
images where the judge sees both concepts (shape ``star`` and the style), the subject alone, the style alone, or
neither. Methods: ``blend`` (both LoRAs live, unfused), the offline merges of :func:`lorablend.merge` (``cat``,
``svd`` at several ranks, ``ties``, ``dare_*``, ``magnitude_prune``, ``della``, ``breadcrumbs``), K-LoRA (per
step at runtime, and frozen at mid-generation), LoRA Switch (alternate every step), and the references
``base`` / ``subject`` / ``style`` (one LoRA alone).

>>> result = evaluate_merges(seeds=range(2), methods=["blend", "cat"])    # doctest: +SKIP
>>> print(result.table())                                                 # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..fixtures.shapes import COLOURS, SUBJECT_TOKEN

SUBJECT = SUBJECT_TOKEN
STYLES = ("stripes", "outline")
DENSITY = 0.5
# name -> lorablend.merge options; each merges [subject, style] with weights [1, 1]
MERGES: dict[str, dict[str, Any]] = {
    "cat": {"method": "cat"},
    "svd_r1": {"method": "svd", "rank": 1},
    "svd_r2": {"method": "svd", "rank": 2},
    "svd_r4": {"method": "svd", "rank": 4},
    "ties": {"method": "ties", "density": DENSITY},
    "dare_linear": {"method": "dare_linear", "density": DENSITY, "seed": 0},
    "dare_ties": {"method": "dare_ties", "density": DENSITY, "seed": 0},
    "magnitude_prune": {"method": "magnitude_prune", "density": DENSITY},
    "della": {"method": "della", "density": DENSITY, "seed": 0},
    "breadcrumbs": {"method": "breadcrumbs", "density": DENSITY},
}
REFERENCES = ("base", "subject", "style")
LIVE = ("blend", "klora", "klora_static", "switch")
METHODS = (*REFERENCES, "blend", *MERGES, "klora", "klora_static", "switch")
OUTCOMES = ("both", "subject_only", "style_only", "neither")


def prompt_for(seed: int) -> str:
    """The seed's prompt: two different colours drawn from the seed.

    >>> prompt_for(0)
    'a white sks on a yellow background'
    """
    colour, background = np.random.default_rng(seed).choice(list(COLOURS), size=2, replace=False)
    return f"a {colour} {SUBJECT} on a {background} background"


@dataclass
class Row:
    """One (style, method) cell: counts of each outcome over the seeds, and the images."""

    style: str
    method: str
    counts: dict[str, int]
    images: Any = field(repr=False, default=None)

    @property
    def n(self) -> int:
        return sum(self.counts.values())

    def share(self, outcome: str) -> float:
        return self.counts[outcome] / max(1, self.n)


@dataclass
class MergeEval:
    """All rows, in (style, method) order, and what made them."""

    rows: list[Row]
    seeds: list[int]
    steps: int

    def table(self) -> str:
        """A markdown table: one line per method, the share of each outcome per style.

        >>> MergeEval([Row("stripes", "cat", {"both": 1, "subject_only": 1, "style_only": 0, "neither": 0})],
        ...           [0, 1], 20).table().splitlines()[2]
        '| cat | 50% / 50% / 0% / 0% |'
        """
        styles = list(dict.fromkeys(r.style for r in self.rows))
        head = "| method | " + " | ".join(f"{s}: both / subject / style / neither" for s in styles) + " |"
        lines = [head, "|---|" + "---|" * len(styles)]
        for method in dict.fromkeys(r.method for r in self.rows):
            cells = []
            for s in styles:
                row = next(r for r in self.rows if r.style == s and r.method == method)
                cells.append(" / ".join(f"{row.share(o):.0%}" for o in OUTCOMES))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def as_json(self) -> dict:
        return {"seeds": self.seeds, "steps": self.steps,
                "rows": [{"style": r.style, "method": r.method, **r.counts} for r in self.rows]}


def _outcome(seen: dict[str, str], style: str) -> str:
    subject, styled = seen["shape"] == "star", seen["style"] == style
    return "both" if subject and styled else "subject_only" if subject else "style_only" if styled else "neither"


class _Runner:
    """One pipeline with the three shipped LoRAs, the judge, the seeds; prepares each method and draws."""

    def __init__(self, pipe: Any, judge: Any, seeds: Sequence[int], steps: int, guidance: float) -> None:
        from ..fixtures.drawing_model import lora_file
        from ..io import load_adapter

        self.pipe, self.judge, self.seeds, self.steps, self.guidance = pipe, judge, list(seeds), steps, guidance
        self.adapters = {n: load_adapter(str(lora_file(n)), target=pipe, name=n) for n in (SUBJECT, *STYLES)}
        loaded = set(pipe.get_list_adapters().get(pipe.denoiser_name, []))
        for name in (SUBJECT, *STYLES):
            if name not in loaded:
                pipe.load_lora_weights(str(lora_file(name)), adapter_name=name)

    def draw(self, callback: Any = None) -> np.ndarray:
        prompts = [prompt_for(s) for s in self.seeds]
        gens = [np.random.Generator(np.random.PCG64(s)) for s in self.seeds]
        extra = {"callback_on_step_end": callback} if callback is not None else {}
        return self.pipe(prompts, generator=gens, num_inference_steps=self.steps, guidance_scale=self.guidance,
                         output_type="np", **extra).images

    def run(self, style: str, method: str) -> Row:
        from ..merge import merge
        from ..merge.klora import klora_merge, klora_plan
        from .steps import StepAdapters, klora_schedule, lora_switch_schedule

        pipe, pair = self.pipe, [SUBJECT, style]
        temporary: list[str] = []
        callback = None
        if method == "base":
            pipe.set_adapters([SUBJECT], adapter_weights=[0.0])
        elif method in ("subject", "style"):
            pipe.set_adapters([SUBJECT if method == "subject" else style])
        elif method == "blend":
            pipe.set_adapters(pair, adapter_weights=[1.0, 1.0])
        elif method == "switch":
            callback = StepAdapters(pipe, lora_switch_schedule(pair, self.steps)).start()
        elif method == "klora":
            plan = klora_plan(self.adapters[SUBJECT], self.adapters[style])
            schedule = klora_schedule(pipe, plan, self.steps, prefix=f"klora-{style}")
            temporary = sorted({names[0] for names, _ in schedule})
            callback = StepAdapters(pipe, schedule).start()
        else:
            adapters = [self.adapters[SUBJECT], self.adapters[style]]
            merged = (klora_merge(*adapters) if method == "klora_static"
                      else merge(adapters, [1.0, 1.0], **MERGES[method]))
            temporary = [f"{method}-{style}"]
            pipe.load_lora_weights(merged, adapter_name=temporary[0])
            pipe.set_adapters(temporary[0])
        try:
            images = self.draw(callback)
        finally:
            if temporary:
                pipe.delete_adapters(temporary)
        batch = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float() * 2 - 1
        counts = dict.fromkeys(OUTCOMES, 0)
        for seen in self.judge.read(batch):
            counts[_outcome(seen, style)] += 1
        return Row(style, method, counts, images)


def evaluate_merges(*, seeds: Sequence[int] = range(16), methods: Sequence[str] = METHODS,
                    styles: Sequence[str] = STYLES, steps: int | None = None, pipe: Any = None,
                    judge: Any = None) -> MergeEval:
    """Draw and judge every (style, method); the shipped drawing model and judge unless given.

    >>> evaluate_merges(seeds=range(2), methods=["blend"]).rows[0].n    # doctest: +SKIP
    2
    """
    from ..fixtures.drawing_model import GUIDANCE, STEPS, drawing_pipeline, load_judge

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown merge method(s) {unknown}: choose from {', '.join(METHODS)}")
    bad = [s for s in styles if s not in STYLES]
    if bad:
        raise ValueError(f"unknown style LoRA(s) {bad}: the drawing model ships {', '.join(STYLES)}")
    steps = steps or STEPS
    runner = _Runner(pipe or drawing_pipeline(), judge or load_judge(), seeds, steps, GUIDANCE)
    rows = [runner.run(style, method) for style in styles for method in methods]
    return MergeEval(rows, list(seeds), steps)
