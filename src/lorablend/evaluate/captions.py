"""``lorablend eval base``: does the drawing model draw what a caption says? For each (shape, colour, background)
prompt of the caption form and each seed, one image, read by the shipped judge; the share of images with the
right shape, the right colour, the right background, and all three at once.

The default prompts are the :data:`~lorablend.fixtures.shapes.HELD_OUT` triples, which the base model never saw
in training (so the figure measures composition, not recall); ``every=True`` takes all 90 triples.

>>> result = prompt_accuracy(seeds=range(6))                            # doctest: +SKIP
>>> result.share("all")                                                  # doctest: +SKIP
0.96
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..fixtures.shapes import BASE_SHAPES, COLOURS, HELD_OUT, Scene

CHECKS = ("shape", "colour", "background", "all")
SCHEDULERS = ("ddim", "dpm", "euler")


def caption_triples(*, every: bool = False) -> list[tuple[str, str, str]]:
    """The (shape, colour, background) triples to prompt: the held-out ones, or ``every`` one.

    >>> len(caption_triples()), len(caption_triples(every=True))
    (9, 90)
    """
    if not every:
        return list(HELD_OUT)
    return [(s, c, b) for s in BASE_SHAPES for c in COLOURS for b in COLOURS if c != b]


@dataclass
class PromptAccuracy:
    """Counts of right readings over ``n`` images, per check of :data:`CHECKS`, and what made them."""

    counts: dict[str, int]
    n: int
    settings: dict[str, Any]
    misses: list[tuple[str, dict[str, str]]]

    def share(self, check: str) -> float:
        """The share of images that pass ``check``.

        >>> PromptAccuracy({"all": 3}, 4, {}, []).share("all")
        0.75
        """
        return self.counts[check] / max(1, self.n)

    def line(self) -> str:
        """One line: the settings and each check's share.

        >>> PromptAccuracy(dict.fromkeys(CHECKS, 2), 2, {"steps": 20}, []).line()
        'steps=20 n=2: shape 100% colour 100% background 100% all 100%'
        """
        settings = " ".join(f"{k}={v}" for k, v in self.settings.items())
        return f"{settings} n={self.n}: " + " ".join(f"{c} {self.share(c):.0%}" for c in CHECKS)


def use_scheduler(pipe: Any, name: str) -> None:
    """Swap the pipeline's scheduler for ``name`` (``ddim``, ``dpm``: DPM-Solver++ 2M, ``euler``), same betas.

    >>> use_scheduler(drawing_pipeline(), "dpm")                          # doctest: +SKIP
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    classes = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}
    if name not in classes:
        raise ValueError(f"unknown scheduler {name!r}: choose from {', '.join(SCHEDULERS)}")
    pipe.scheduler = classes[name].from_config(pipe.scheduler.config)


def prompt_accuracy(*, seeds: Sequence[int] = range(6), every: bool = False, steps: int | None = None,
                    guidance: float | None = None, scheduler: str = "ddim", pipe: Any = None,
                    judge: Any = None) -> PromptAccuracy:
    """Draw each triple's caption once per seed (one batch per seed) and count what the judge reads right.

    >>> prompt_accuracy(seeds=[0]).n                                     # doctest: +SKIP
    9
    """
    from ..fixtures.drawing_model import GUIDANCE, STEPS, drawing_pipeline, load_judge

    steps, guidance = steps or STEPS, GUIDANCE if guidance is None else guidance
    pipe, judge = pipe or drawing_pipeline(), judge or load_judge()
    use_scheduler(pipe, scheduler)
    triples = caption_triples(every=every)
    prompts = [Scene(*t).caption() for t in triples]
    counts, misses = dict.fromkeys(CHECKS, 0), []
    for seed in seeds:
        gens = [np.random.Generator(np.random.PCG64(seed * 1000 + i)) for i in range(len(prompts))]
        images = pipe(prompts, generator=gens, num_inference_steps=steps, guidance_scale=guidance,
                      output_type="np").images
        seen = judge.read(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float() * 2 - 1)
        for prompt, (shape, colour, background), read in zip(prompts, triples, seen):
            right = {"shape": read["shape"] == shape, "colour": read["colour"] == colour,
                     "background": read["background"] == background}
            right["all"] = all(right.values())
            for check, ok in right.items():
                counts[check] += int(ok)
            if not right["all"]:
                misses.append((prompt, read))
    settings = {"scheduler": scheduler, "steps": steps, "guidance": guidance, "prompts": "all" if every else "held-out"}
    return PromptAccuracy(counts, len(prompts) * len(list(seeds)), settings, misses)
