"""What a sweep makes, decided before any model is loaded: every cell (prompt × seed × LoRA mix × schedule), its key
and file name, and the order in which workers take them (grouped by mix, so a worker switches adapters once per group).

A cell's key is a hash of everything that decides its image (model, settings, prompt, seed, mix), so a rerun
recognises the cells it already made whatever the order or the number of workers.

>>> spec = SweepSettings("sd15/", [("ink.safetensors", "ink")], [0.0, 1.0], ["a cat"], [0, 1], steps=2)
>>> [c.label for c in plan_cells(spec)]
['ink=0', 'ink=0', 'ink=1', 'ink=1']
>>> switches(plan_cells(spec)), switches(naive_order(spec))
(2, 4)
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence


@dataclass
class SweepSettings:
    """Everything a sweep's images depend on: the model, the LoRAs (path, adapter name), the weights each LoRA
    takes (every combination is a mix), the prompts, the seeds and the generation settings.

    >>> SweepSettings("sd15/", [], [1.0], ["a cat"], [0]).mixes()
    [()]
    """

    model: str
    loras: list[tuple[str, str]]
    weights: list[float]
    prompts: list[str]
    seeds: list[int]
    steps: int = 30
    width: int | None = None
    height: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    # how the weights move over the steps: sd-webui-loractl keyframes "W@P,W@P" that multiply every LoRA's weight
    # of the cell (runtime/schedule.py), "" for constant weights; each schedule is one more column per mix
    schedules: list[str] = field(default_factory=lambda: [""])

    def columns(self) -> list[tuple[tuple[float, ...], str]]:
        """Every (mix, schedule) pair, mix-major: the grid's columns.

        >>> SweepSettings("m", [("a", "a")], [1], ["p"], [0], schedules=["", "1@0,0@1"]).columns()
        [((1.0,), ''), ((1.0,), '1@0,0@1')]
        """
        return [(mix, schedule) for mix in self.mixes() for schedule in self.schedules]

    def mixes(self) -> list[tuple[float, ...]]:
        """Every combination of the weights, one per LoRA (one empty mix without LoRAs). >>> see the class"""
        return list(itertools.product([float(w) for w in self.weights], repeat=len(self.loras)))

    def names(self) -> list[str]:
        """The adapter names, in ``loras`` order. >>> SweepSettings("m", [("a.safetensors", "a")], [1], ["p"], [0]).names()
        ['a']
        """
        return [name for _, name in self.loras]

    def settings(self) -> dict[str, Any]:
        """What every cell shares, as plain data (recorded in ``OUT/sweep.json``; a rerun must match it).

        >>> SweepSettings("m", [], [1], ["p"], [0], steps=2).settings()["steps"]
        2
        """
        settings = {"model": str(self.model), "loras": [[os.path.abspath(p), n] for p, n in self.loras],
                    "steps": self.steps, "width": self.width, "height": self.height,
                    "guidance_scale": self.guidance_scale, "negative_prompt": self.negative_prompt}
        if list(self.schedules) != [""]:  # (absent when constant: a sweep made before schedules resumes as it was)
            settings["schedules"] = list(self.schedules)
        return settings

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a worker in another process. >>> SweepSettings("m", [], [1], ["p"], [0]).to_dict()["seeds"]
        [0]
        """
        return asdict(self)


@dataclass(frozen=True)
class Cell:
    """One image of a sweep: which prompt (index and text), seed and mix (one weight per LoRA, in spec order).

    >>> Cell(0, "a cat", 3, (0.5,), ("ink",)).label
    'ink=0.5'
    """

    prompt_index: int
    prompt: str
    seed: int
    mix: tuple[float, ...]
    names: tuple[str, ...] = field(default=())
    key: str = ""
    schedule: str = ""  # keyframes multiplying the mix's weights over the steps ("": constant)

    @property
    def label(self) -> str:
        mix = " ".join(f"{n}={w:g}" for n, w in zip(self.names, self.mix)) or "no LoRA"
        return f"{mix} @ {self.schedule}" if self.schedule else mix

    @property
    def file(self) -> str:
        """The image's path under ``OUT``: readable, and unique through the key.

        >>> Cell(1, "x", 7, (0.5, 1.0), ("a", "b"), key="0123456789abcdef").file
        'images/p001-s7-a0.5-b1-0123456789.png'
        """
        mix = "-".join(f"{_safe(n)}{w:g}" for n, w in zip(self.names, self.mix)) or "base"
        if self.schedule:
            mix += "-sched"
        return f"images/p{self.prompt_index:03d}-s{self.seed}-{mix}-{self.key[:10]}.png"

    def record(self) -> dict[str, Any]:
        """The cell as a manifest line's identity (timings and hashes are added by the run).

        >>> Cell(0, "a cat", 3, (0.5,), ("ink",), key="k").record()["loras"]
        {'ink': 0.5}
        """
        record = {"key": self.key, "prompt": self.prompt, "prompt_index": self.prompt_index, "seed": self.seed,
                  "loras": dict(zip(self.names, self.mix)), "file": self.file}
        if self.schedule:
            record["schedule"] = self.schedule
        return record


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_." else "_" for ch in name)[:32]


def cell_key(settings: dict[str, Any], prompt: str, seed: int, mix: Sequence[float], schedule: str = "") -> str:
    """A hash of what decides a cell's image (LoRA paths count through ``settings``; a constant cell's key is the
    one it had before schedules existed).

    >>> len(cell_key({"steps": 2}, "a cat", 0, [1.0]))
    32
    """
    what = [settings, prompt, int(seed), [float(w) for w in mix]] + ([schedule] if schedule else [])
    text = json.dumps(what, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _cell(spec: SweepSettings, settings: dict[str, Any], p: int, seed: int, column: tuple) -> Cell:
    prompt, (mix, schedule) = spec.prompts[p], column
    return Cell(p, prompt, int(seed), mix, tuple(spec.names()), cell_key(settings, prompt, seed, mix, schedule),
                schedule)


def _key_settings(spec: SweepSettings) -> dict[str, Any]:
    """What every cell's key hashes: the settings less the schedule axis (each cell's own schedule is its part)."""
    return {k: v for k, v in spec.settings().items() if k != "schedules"}


def plan_cells(spec: SweepSettings) -> list[Cell]:
    """Every cell, mix-major (then prompt, then seed): consecutive cells share a mix, so a worker that takes
    them in this order switches once per mix. >>> see the module"""
    settings = _key_settings(spec)
    return [_cell(spec, settings, p, s, column) for column in spec.columns() for p in range(len(spec.prompts))
            for s in spec.seeds]


def naive_order(spec: SweepSettings) -> list[Cell]:
    """The same cells in the order of the obvious nested loop (prompt, seed, then mix innermost): the baseline
    that switches at nearly every cell. >>> see the module"""
    settings = _key_settings(spec)
    return [_cell(spec, settings, p, s, column) for p in range(len(spec.prompts)) for s in spec.seeds
            for column in spec.columns()]


def switches(cells: Sequence[Cell]) -> int:
    """Mix changes a single worker makes running ``cells`` in order (the first mix counts as one).

    >>> switches([])
    0
    """
    return sum(1 for i, c in enumerate(cells) if i == 0 or c.mix != cells[i - 1].mix)


def group_cells(cells: Sequence[Cell], workers: int, max_cells: int = 8) -> list[list[Cell]]:
    """Cells in groups of one mix each, split further when there are fewer mixes than ``2 × workers`` (so every
    worker gets work) or a mix has more than ``max_cells`` (so progress and retries come in small steps); a
    group is what a worker takes at once. Consecutive groups of one mix go to the worker that holds it.

    >>> spec = SweepSettings("m", [("a", "a")], [0, 1], ["p"], [0, 1, 2, 3])
    >>> [len(g) for g in group_cells(plan_cells(spec), 2)]
    [2, 2, 2, 2]
    """
    by_mix: dict[tuple[float, ...], list[Cell]] = {}
    for cell in cells:
        by_mix.setdefault(cell.mix, []).append(cell)
    if not by_mix:
        return []
    parts = max(1, math.ceil(2 * max(1, workers) / len(by_mix)))
    groups = []
    for mix_cells in by_mix.values():
        size = max(1, min(max_cells, math.ceil(len(mix_cells) / parts)))
        groups += [mix_cells[i:i + size] for i in range(0, len(mix_cells), size)]
    return groups


__all__ = ["Cell", "SweepSettings", "cell_key", "group_cells", "naive_order", "plan_cells", "switches"]

# Old names (settings classes all end in ...Settings since 0.2), importable until 0.3 with a warning.
from ..errors import renamed_names  # noqa: E402  (only for the old names below)

__getattr__ = renamed_names(__name__, {'SweepSpec': 'SweepSettings'}, globals())
