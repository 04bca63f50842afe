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

from ..io.hub import hf_progress_bars
from .drawing import first_picture, save_png
from .grid import weight_grid

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
    from ..pipeline import DiffusionPipeline

    names = adapter_names(loras)
    adapters = read_loras(model, loras, names)  # a broken LoRA fails here, before seconds of model loading
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    pipe = DiffusionPipeline.from_pretrained(str(model), dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    for (path, _), adapter, name in zip(loras, adapters, names):
        pipe.load_lora_weights(adapter if adapter is not None else str(path), adapter_name=name, strict=strict)
    if names:
        pipe.set_adapters(names, adapter_weights=[float(w) for _, w in loras])
    return pipe, names


def adapter_names(loras: Sequence[tuple[str | os.PathLike, float]]) -> list[str]:
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
    from ..io import load_adapter
    from ..naming.meta import folder_meta_components

    components = folder_meta_components(model) if loras and Path(model).is_dir() else None
    if components is None:
        return [None] * len(loras)
    return [load_adapter(str(path), target=components, name=name) for (path, _), name in zip(loras, names)]


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
    from ..outputs import refuse_existing, refuse_input, same_file

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
    hf_progress_bars(False)  # our own bar, not diffusers' loading bars
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
    return first_picture(pipe(prompt, generator=generator, **settings.call_kwargs()))  # (a video: its frame strip)


__all__ = ["GenerationSettings", "adapter_names", "check_request", "generate_file", "generate_image", "load_pipeline", "read_loras"]
