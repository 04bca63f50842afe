"""Cells and grids: one pipeline making (prompt, seed, mix) cells in mix order, and an X/Y grid of them.

``generate --grid`` and every ``lorablend sweep`` worker make their images through ``CellRenderer``, so a cell's
image is the same whichever of them makes it.

>>> renderer = CellRenderer(pipe, ["style"], GenerationSettings(steps=20))             # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .drawing import first_picture, render_grid

if TYPE_CHECKING:  # (generate imports this module: the settings are only a type here)
    from .generate import GenerationSettings

class CellRenderer:
    """One pipeline making cells (prompt, seed, LoRA mix) one after another: the mix is set (and its blended terms
    built) only when it differs from the last cell's, so cells taken in mix order switch once per mix; the noise
    of a cell comes from its own seed. ``generate --grid`` and every ``lorablend sweep`` worker make their images
    here, so a cell's image is the same whichever of them makes it.

    >>> renderer = CellRenderer(pipe, ["style"], GenerationSettings(steps=20))             # doctest: +SKIP
    >>> image, timings, switched = renderer.render("a cat", 0, [0.5])                      # doctest: +SKIP
    """

    def __init__(self, pipe: Any, names: Sequence[str], settings: GenerationSettings) -> None:
        self.pipe, self.names, self.settings = pipe, list(names), settings
        self.mix: tuple[float, ...] | None = None
        self.switches = 0

    def render(self, prompt: str, seed: int, mix: Sequence[float],
               schedule: str | None = None) -> tuple[Any, dict[str, float], bool]:
        """The PIL image of one cell, its timings (``switch``, ``generate`` seconds) and whether it switched;
        ``schedule`` (sd-webui-loractl keyframes, ``"1@0,0@0.6"``) multiplies every LoRA's weight over the steps.
        >>> renderer.render("a cat", 0, [1.0])[2]                                          # doctest: +SKIP
        True
        """
        started = time.perf_counter()
        mix = tuple(float(w) for w in mix)
        switched = mix != self.mix
        if switched and self.names:
            self.pipe.set_adapters(self.names, adapter_weights=list(mix))
            self.pipe.prepare()  # build the blended terms now, so 'switch' times them
            self.switches += 1
        self.mix = mix
        ready = time.perf_counter()
        generator = np.random.Generator(np.random.PCG64(int(seed)))
        kwargs = self.settings.call_kwargs()
        if schedule and self.names:
            kwargs["lora_schedule"] = {name: schedule for name in self.names}
        image = first_picture(self.pipe(prompt, generator=generator, **kwargs))  # (a video: a strip)
        timings = {"switch": round(ready - started, 6), "generate": round(time.perf_counter() - ready, 6)}
        return image, timings, switched


@dataclass
class Grid:
    """A rendered grid and what each axis meant (for reports)."""

    image: Any
    x_label: str
    y_label: str
    x_values: list[str]
    y_values: list[str]
    cells: list[dict[str, Any]] = field(default_factory=list)


def weight_grid(
    pipe: Any,
    names: Sequence[str],
    weights: Sequence[float],
    prompts: Sequence[str],
    settings: GenerationSettings,
    *,
    x_weights: Sequence[float],
    y_weights: Sequence[float] | None = None,
    progress: bool = False,
) -> Grid:
    """An X/Y grid: columns vary the weight of ``names[0]`` over ``x_weights``; rows are ``prompts``, or, with
    ``y_weights``, the weight of ``names[1]`` (one prompt). Other adapters keep ``weights``.

    >>> weight_grid(pipe, ["a", "b"], [1, 1], ["a cat"], s, x_weights=[0, 1], y_weights=[0, 1])   # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    if not names:
        raise ValueError("a weight grid needs at least one LoRA (--lora FILE)")
    if y_weights is not None and len(names) < 2:
        raise ValueError("a weights × weights grid needs two LoRAs: the first varies along X, the second along Y")
    if y_weights is not None and len(prompts) != 1:
        raise ValueError("a weights × weights grid takes one prompt")
    rows = list(y_weights) if y_weights is not None else list(prompts)
    cells = []
    for r, row in enumerate(rows):
        for c, xw in enumerate(x_weights):
            w = [float(v) for v in weights]
            w[0] = float(xw)
            if y_weights is not None:
                w[1] = float(row)
            prompt = prompts[0] if y_weights is not None else str(row)
            cells.append({"row": r, "col": c, "prompt": prompt, "weights": dict(zip(names, w))})
    images: list[list[Any]] = [[None] * len(x_weights) for _ in rows]
    renderer = CellRenderer(pipe, names, settings)
    # made in mix order (one switch per mix, as a sweep's worker does), placed in grid order
    order = sorted(range(len(cells)), key=lambda i: tuple(cells[i]["weights"].values()))
    with tqdm(total=len(cells), desc="grid", unit="image", disable=not progress, leave=False) as bar:
        for i in order:
            cell = cells[i]
            images[cell["row"]][cell["col"]] = renderer.render(cell["prompt"], settings.seed,
                                                               list(cell["weights"].values()))[0]
            bar.update(1)
    x_label = f"{names[0]} weight"
    y_label = f"{names[1]} weight" if y_weights is not None else "prompt"
    x_values = [f"{names[0]}={float(v):g}" for v in x_weights]
    y_values = [f"{names[1]}={float(v):g}" for v in y_weights] if y_weights is not None else list(prompts)
    title = f"X: {x_label}   Y: {y_label}   seed {settings.seed}, {settings.steps} steps"
    return Grid(render_grid(images, x_values, y_values, title), x_label, y_label, x_values, y_values, cells)


__all__ = ["CellRenderer", "Grid", "weight_grid"]
