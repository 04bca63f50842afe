"""Images from a pipeline with LoRAs: one image, or an X/Y grid (LoRA weights × prompts, or weights × weights).

Generation is diffusers' own, through ``lorablend.DiffusionPipeline``. Every cell of a grid starts from the same
initial latents (drawn on the host from ``seed`` with numpy, so a seed means the same noise on every device) and
only the adapter weights or the prompt change between cells: switching weights re-blends the factors, it does not
reload anything. The grid is one PNG with labelled rows and columns (drawn with PIL, which diffusers needs anyway).

>>> pipe, names = load_pipeline("sd15/", [("style.safetensors", 0.7)])                    # doctest: +SKIP
>>> grid = weight_grid(pipe, names, [0.7], ["a cat", "a dog"], x_weights=[0, 0.5, 1])       # doctest: +SKIP
>>> grid.image.save("grid.png")                                                            # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)


@dataclass
class GenerationSettings:
    """What every image of a run shares."""

    seed: int = 0
    steps: int = 30
    width: int | None = None
    height: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None

    def call_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"num_inference_steps": self.steps, "output_type": "pil"}
        for name in ("width", "height", "guidance_scale", "negative_prompt"):
            value = getattr(self, name)
            if value is not None:
                kw[name] = value
        return kw


def load_pipeline(
    model: str | os.PathLike,
    loras: Sequence[tuple[str | os.PathLike, float]],
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    strict: bool = True,
) -> tuple[Any, list[str]]:
    """A ``lorablend.DiffusionPipeline`` from a folder or hub id, with ``loras`` loaded, active at their weights.

    ``device`` defaults to CUDA when present, else CPU; ``dtype`` to fp16 on CUDA and fp32 on CPU (fp16 matmuls
    are slow or missing on CPUs). Returns the pipeline and the adapter names, in the order of ``loras``.

    >>> pipe, names = load_pipeline("sd15/", [("style.safetensors", 0.7)], device="cpu")     # doctest: +SKIP
    """
    from .pipeline import DiffusionPipeline

    names = _adapter_names(loras)
    adapters = read_loras(model, loras, names)  # a broken LoRA fails here, before seconds of model loading
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    pipe = DiffusionPipeline.from_pretrained(str(model), torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    for (path, _), adapter, name in zip(loras, adapters, names):
        pipe.load_lora_weights(adapter if adapter is not None else str(path), adapter_name=name, strict=strict)
    if names:
        pipe.set_adapters(names, adapter_weights=[float(w) for _, w in loras])
    return pipe, names


def _adapter_names(loras: Sequence[tuple[str | os.PathLike, float]]) -> list[str]:
    """Each LoRA's adapter name: its file's stem, numbered when two files share one."""
    names: list[str] = []
    for path, _ in loras:
        base = name = Path(path).stem
        n = 1
        while name in names:
            n += 1
            name = f"{base}_{n}"
        names.append(name)
    return names


def read_loras(
    model: str | os.PathLike, loras: Sequence[tuple[str | os.PathLike, float]], names: Sequence[str]
) -> list[Any]:
    """Every LoRA file read and checked against the model's architecture (built from its config files on the
    meta device) before any weight of the model is read; the Adapters then go to the pipeline, so no file is read
    twice. ``[None, ...]`` for a model that is no local pipeline folder (a hub id): the pipeline reads the files.

    >>> read_loras("org/not-a-folder", [("style.safetensors", 1.0)], ["style"])
    [None]
    """
    from .io import load_adapter
    from .naming.meta import folder_meta_components

    components = folder_meta_components(model) if loras and Path(model).is_dir() else None
    if components is None:
        return [None] * len(loras)
    return [load_adapter(str(path), target=components, name=name) for (path, _), name in zip(loras, names)]


def hf_progress_bars(enabled: bool) -> None:
    """diffusers and transformers draw loading bars on stderr: keep them only for a person at a terminal.

    >>> hf_progress_bars(True)  # (leaves the libraries' settings alone)
    """
    if enabled:
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def check_request(
    model: str, loras: Sequence[tuple[str | os.PathLike, float]], output: str | os.PathLike, settings: GenerationSettings,
    *, overwrite: bool = False,
) -> None:
    """Everything about a generation request that can be checked before any file is read: the LoRA files and
    the model exist, the output is a new (or ``overwrite``) ``.png`` that is none of the inputs, and the steps and
    sizes are valid. Raises ``ValueError`` / ``OSError`` subclasses naming the bad argument.

    >>> check_request("org/model", [], "out.txt", GenerationSettings())
    Traceback (most recent call last):
    ...
    ValueError: -o out.txt: name a .png file
    """
    from .outputs import refuse_existing, refuse_input, same_file

    for path, _ in loras:
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: no such file; pass existing LoRA files as --lora FILE[:WEIGHT]")
        if same_file(path, output):
            raise ValueError(f"{output}: OUTPUT is an input file; lorablend never overwrites an input")
    if not Path(model).exists() and (str(model).count("/") != 1 or str(model).startswith((".", "/"))):
        raise FileNotFoundError(f"{model}: no such pipeline folder (and not a hub id like 'org/name')")
    if Path(model).exists():
        refuse_input(output, [Path(model)], what="the model")  # the model file, or inside the model folder
    if not str(output).lower().endswith(".png"):
        raise ValueError(f"-o {output}: name a .png file")
    refuse_existing(output, overwrite)
    if settings.steps <= 0:
        raise ValueError(f"--steps {settings.steps}: must be a positive integer")
    for flag, v in (("--width", settings.width), ("--height", settings.height)):
        if v is not None and (v <= 0 or v % 8):
            raise ValueError(f"{flag} {v}: must be a positive multiple of 8")


def generate_file(
    model: str, loras: Sequence[tuple[str | os.PathLike, float]], prompts: Sequence[str], output: str | os.PathLike,
    settings: GenerationSettings, *, x_weights: Sequence[float] | None = None, y_weights: Sequence[float] | None = None,
    device: str | None = None, dtype: torch.dtype | None = None, overwrite: bool = False, progress: bool = False,
) -> dict[str, Any]:
    """Check the request, load the pipeline with ``loras``, write one PNG (a grid when ``x_weights`` is given,
    see :func:`weight_grid`) and return what was done (plain data: model, LoRAs, output, images, seconds).

    >>> generate_file("sd15/", [("style.safetensors", 0.7)], ["a cat"], "cat.png", GenerationSettings())  # doctest: +SKIP
    """
    started = time.perf_counter()
    check_request(model, loras, output, settings, overwrite=overwrite)
    hf_progress_bars(progress)
    pipe, names = load_pipeline(model, loras, device=device, dtype=dtype)
    weights, inputs = [w for _, w in loras], [p for p, _ in loras]
    result: dict[str, Any] = {"model": model, "seed": settings.seed, "steps": settings.steps,
                              "loras": [{"path": p, "name": n, "weight": w} for (p, w), n in zip(loras, names)]}
    if x_weights is not None:
        grid = weight_grid(pipe, names, weights, prompts, settings, x_weights=x_weights, y_weights=y_weights,
                           progress=progress)
        out = save_png(grid.image, output, overwrite=overwrite, inputs=inputs)
        result.update(grid={"x": grid.x_label, "y": grid.y_label, "columns": grid.x_values, "rows": grid.y_values,
                            "cells": grid.cells}, images=len(grid.cells))
    else:
        out = save_png(generate_image(pipe, names, weights, prompts[0], settings), output, overwrite=overwrite,
                       inputs=inputs)
        result.update(prompt=prompts[0], images=1)
    result.update(output=str(out), seconds=round(time.perf_counter() - started, 3))
    return result


def generate_image(pipe: Any, names: Sequence[str], weights: Sequence[float], prompt: str, settings: GenerationSettings):
    """One PIL image of ``prompt`` with the adapters ``names`` at ``weights`` (same seed, same latents every call).

    >>> image = generate_image(pipe, ["style"], [0.5], "a cat", GenerationSettings(seed=1, steps=20))   # doctest: +SKIP
    """
    if names:
        pipe.set_adapters(list(names), adapter_weights=[float(w) for w in weights])
    generator = np.random.Generator(np.random.PCG64(settings.seed))
    return pipe(prompt, generator=generator, **settings.call_kwargs()).images[0]


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

    def render(self, prompt: str, seed: int, mix: Sequence[float]) -> tuple[Any, dict[str, float], bool]:
        """The PIL image of one cell, its timings (``switch``, ``generate`` seconds) and whether it switched.
        >>> renderer.render("a cat", 0, [1.0])[2]                                          # doctest: +SKIP
        True
        """
        started = time.perf_counter()
        mix = tuple(float(w) for w in mix)
        switched = mix != self.mix
        if switched and self.names:
            self.pipe.set_adapters(self.names, adapter_weights=list(mix))
            self.pipe._runtime.prepare()  # build the blended terms now, so 'switch' times them
            self.switches += 1
        self.mix = mix
        ready = time.perf_counter()
        generator = np.random.Generator(np.random.PCG64(int(seed)))
        image = self.pipe(prompt, generator=generator, **self.settings.call_kwargs()).images[0]
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


def render_grid(images: Sequence[Sequence[Any]], col_labels: Sequence[str], row_labels: Sequence[str], title: str = ""):
    """Paste equally sized PIL images into one labelled sheet (column labels on top, row labels at the left).

    >>> from PIL import Image
    >>> render_grid([[Image.new("RGB", (8, 8))]], ["w=0"], ["a cat"]).size[0] > 8
    True
    """
    from PIL import Image, ImageDraw

    from .plot import font, text_size, wrap

    f = font()
    w, h = images[0][0].size
    line_h = text_size("Ag", f)[1] + 4
    # a column is as wide as its image, or its label when the images are small: labels are never cut mid-number
    col_w = max(w, max(text_size(str(t), f)[0] for t in col_labels) + 8)
    left = min(max(text_size(str(t), f)[0] for t in row_labels) + 12, max(160, w))
    row_text = [wrap(str(t), left - 12, f) for t in row_labels]
    top = line_h * (2 if title else 1) + 8
    width = max(left + col_w * len(col_labels), text_size(title, f)[0] + 8)
    sheet = Image.new("RGB", (width, top + h * len(row_labels)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 4), title, fill="black", font=f)
    for c, label in enumerate(col_labels):
        tw = text_size(str(label), f)[0]
        draw.text((left + c * col_w + (col_w - tw) // 2, top - line_h - 2), str(label), fill="black", font=f)
    pad = (col_w - w) // 2
    for r, (line_imgs, lines) in enumerate(zip(images, row_text)):
        for i, line in enumerate(lines[: max(1, h // line_h)]):
            draw.text((4, top + r * h + 4 + i * line_h), line, fill="black", font=f)
        for c, img in enumerate(line_imgs):
            sheet.paste(img.convert("RGB"), (left + c * col_w + pad, top + r * h))
    return sheet


def save_png(
    image: Any, output: str | os.PathLike, *, overwrite: bool = False, inputs: Sequence[str | os.PathLike] = ()
) -> Path:
    """Write a PIL image as PNG, atomically (``lorablend.outputs``): never a partial file, never over ``inputs``.

    >>> save_png(image, "out.png")                                              # doctest: +SKIP
    PosixPath('out.png')
    """
    from .outputs import atomic_file

    with atomic_file(output, overwrite=overwrite, inputs=inputs) as tmp:
        image.save(tmp, format="PNG")
    return Path(output)


__all__ = ["CellRenderer", "GenerationSettings", "Grid", "check_request", "generate_file", "generate_image", "load_pipeline", "read_loras", "render_grid", "save_png", "weight_grid"]
