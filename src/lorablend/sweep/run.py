"""``lorablend sweep``: every prompt × seed × LoRA mix of a comparison, on one worker or many, resumable.

Output folder ``OUT``: ``images/*.png`` (one per cell), ``manifest.jsonl`` (one line per cell: prompt, seed,
LoRA weights, file, sha256 of the PNG, timings, worker), ``grid.png`` (a labelled contact sheet: a block of rows
per prompt, one row per seed, one column per mix) and ``sweep.json`` (the settings, so a rerun into the same
folder with other settings is refused instead of mixing two sweeps). A rerun skips every cell whose line is in
the manifest with its file present and intact, and makes the rest.

>>> spec = SweepSettings("sd15/", [("ink.safetensors", "ink")], [0, 0.5, 1], ["a cat"], [0, 1, 2], steps=20)
>>> summary = run_sweep(spec, "sweep-out", engine="ray", workers=2)                    # doctest: +SKIP
>>> summary["cells"], summary["made"]                                                # doctest: +SKIP
(9, 9)
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import LoraCompatibilityError
from ..outputs import atomic_write, refuse_input
from .manifest import append_line, done_cells, read_manifest, rewrite_manifest
from .plan import Cell, SweepSettings, group_cells, naive_order, plan_cells, switches
from ..runtime.schedule import parse_keyframes, takes_sample_weights

ENGINES = ("local", "ray")


@dataclass
class SweepRunSettings:
    """How to run a sweep (not what it makes): engine, workers, cluster address, devices, progress, and
    ``on_cell``, called in this process with each manifest line as it is written (tests stop or disturb a run
    there). ``max_restarts``: Ray restarts of one dead worker before its cells go to the others.

    >>> SweepRunSettings(engine="ray", workers=2).check().workers
    2
    """

    engine: str = "local"
    workers: int = 1
    address: str | None = None
    gpus_per_worker: float = 0.0
    device: str | None = None
    dtype: str | None = None
    progress: bool = False
    max_restarts: int = 2
    on_cell: Callable[[dict[str, Any]], None] | None = None

    def check(self) -> "SweepRunSettings":
        """Raise ``ValueError`` naming the bad setting and the fix. >>> SweepRunSettings(workers=0).check()
        Traceback (most recent call last):
        ...
        ValueError: --workers 0: must be at least 1
        """
        if self.engine not in ENGINES:
            raise ValueError(f"--engine {self.engine}: choose one of {', '.join(ENGINES)}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"--workers {self.workers}: must be at least 1")
        if self.engine == "local" and self.workers != 1:
            raise ValueError(f"--workers {self.workers}: the local engine runs one worker (one pipeline in this "
                             "process); pass --engine ray for several")
        if self.engine == "local" and self.address:
            raise ValueError(f"--address {self.address}: joining a cluster needs --engine ray")
        if self.gpus_per_worker < 0:
            raise ValueError(f"--gpus-per-worker {self.gpus_per_worker}: must be 0 or more")
        if self.device is not None:
            _check_device(self.device, local=self.engine == "local")
        return self


def _check_device(device: str, local: bool) -> None:
    """``--device`` names a torch device (and, run here, one this machine has: Ray workers may have others)."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device}: not a torch device; write cpu, cuda, cuda:1 or mps") from None
    if local and kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device; pass --device cpu")
    if local and kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: this machine has no MPS device; pass --device cpu")


def check_spec(spec: SweepSettings, out: str | os.PathLike) -> None:
    """What can be checked before any model is loaded: files exist, lists are not empty, sizes are valid, and
    ``out`` is neither an input nor inside one. Raises ``ValueError`` / ``FileNotFoundError`` naming the input.

    >>> check_spec(SweepSettings("org/model", [], [1.0], [], [0]), "out")
    Traceback (most recent call last):
    ...
    ValueError: --prompt: give at least one prompt
    """
    for flag, values in (("--prompt", spec.prompts), ("--seeds", spec.seeds), ("--weights", spec.weights)):
        if not values:
            raise ValueError(f"{flag}: give at least one {flag.strip('-').rstrip('s')}")
    for path, _ in spec.loras:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--lora {path}: no such file; pass existing LoRA files")
    model = str(spec.model)
    if not Path(model).exists() and (model.count("/") != 1 or model.startswith((".", "/"))):
        raise FileNotFoundError(f"--model {model}: no such pipeline folder (and not a hub id like 'org/name')")
    inputs = [p for p, _ in spec.loras] + ([model] if Path(model).exists() else [])
    refuse_input(out, inputs, what="an input of the sweep")
    if spec.steps <= 0:
        raise ValueError(f"--steps {spec.steps}: must be a positive integer")
    if any(int(seed) < 0 for seed in spec.seeds):
        raise ValueError(f"--seeds {','.join(map(str, spec.seeds))}: seeds are integers from 0 (numpy's PCG64 "
                         "takes no negative seed)")
    if not all(math.isfinite(w) for w in spec.weights):
        raise ValueError(f"--weights {spec.weights}: finite numbers, e.g. --weights 0,0.5,1")
    if spec.guidance_scale is not None and not (math.isfinite(spec.guidance_scale) and spec.guidance_scale >= 0):
        raise ValueError(f"--guidance-scale {spec.guidance_scale}: a finite number from 0, e.g. 7.5")
    if not spec.schedules:
        raise ValueError("--schedule: give at least one (\"\" or 1 for constant weights, e.g. 1@0,0@0.6)")
    for schedule in spec.schedules:
        if schedule:
            parse_keyframes(schedule, "--schedule")
    for flag, v in (("--width", spec.width), ("--height", spec.height)):
        if v is not None and (v <= 0 or v % 8):
            raise ValueError(f"{flag} {v}: must be a positive multiple of 8")
    if Path(out).exists() and not Path(out).is_dir():
        raise NotADirectoryError(f"-o {out}: a file is there; the sweep writes a folder, name a new one")


def check_inputs(spec: SweepSettings) -> None:
    """Read every LoRA file and check it against the model's architecture (its config files, on the meta device)
    before the output folder gets a byte: a damaged or foreign file fails here, and the corrected command then
    starts clean. (A hub id is checked by the workers, which download it.)

    >>> check_inputs(SweepSettings("sd15/", [("broken.safetensors", "broken")], [1.0], ["x"], [0]))  # doctest: +SKIP
    Traceback (most recent call last):
    lorablend.errors.LoraFormatError: broken.safetensors: ...
    """
    from ..images.generate import read_loras

    model = model_configs(str(spec.model))
    adapters = read_loras(str(model), [(path, 1.0) for path, _ in spec.loras], [name for _, name in spec.loras])
    for (path, _), adapter in zip(spec.loras, adapters):  # the workers load strictly: a key that does not fit fails
        misfits = [] if adapter is None else [r for r in adapter.report.records if r.status != "mapped"]
        if misfits:
            first = misfits[0]
            raise LoraCompatibilityError(
                f"--lora {path}: {len(misfits)} key(s) do not fit the model {spec.model} (first: {first.key}: "
                f"{first.status}{', ' + first.reason if first.reason else ''}); pass a LoRA made for this model")
    dense = [path for (path, _), adapter in zip(spec.loras, adapters)
             if adapter is not None and not takes_sample_weights(adapter)]
    scheduled = [s for s in spec.schedules if s]
    if scheduled and dense:
        verb = "holds" if len(dense) == 1 else "hold"
        raise ValueError(f"--schedule {scheduled[0]}: {', '.join(map(str, dense))} {verb} layers that are not LoRA "
                         "pairs (LoHa, LoKr, full matrices or bias deltas); a weight that changes per step needs "
                         "low-rank pairs: drop --schedule, or sweep those files with constant weights")


def model_configs(model: str) -> Path:
    """The folder with ``--model``'s config files: the pipeline folder itself, or a hub id's ``model_index.json``
    and component ``config.json`` files (downloaded, or from the cache offline: no weight is fetched). A model
    that is not there fails here, naming the flag, before the output folder gets a byte.

    >>> model_configs("/no/such/folder")                                   # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: --model /no/such/folder: no such pipeline folder, and the hub has no pipeline of that name ...
    """
    path = Path(model)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"--model {model}: the folder has no model_index.json, so it holds no diffusers "
                                    "pipeline; pass a pipeline folder (save_pretrained) or a hub id like 'org/name'")
        return path
    if path.exists():
        raise NotADirectoryError(f"--model {model}: a file; pass a diffusers pipeline folder (save_pretrained) or "
                                 "a hub id like 'org/name'")
    from huggingface_hub import snapshot_download

    try:  # (OSError: offline and not cached, no such repo, gated; ValueError: not a repo id at all)
        return Path(snapshot_download(model, allow_patterns=["model_index.json", "*/config.json"]))
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"--model {model}: no such pipeline folder, and the hub has no pipeline of that name "
                                f"({type(exc).__name__}); pass a diffusers pipeline folder (save_pretrained) or a "
                                "hub id like 'org/name'") from None


def _claim_folder(spec: SweepSettings, out: Path) -> None:
    """Write ``sweep.json``, or check that the one there has these settings (a resume, not a different sweep)."""
    settings = spec.settings()
    marker = out / "sweep.json"
    if marker.exists():
        try:
            before = json.loads(marker.read_text()).get("settings")
        except (OSError, ValueError):
            before = None
        if before != json.loads(json.dumps(settings)):
            raise ValueError(f"-o {out}: this folder holds a sweep with other settings (model, LoRA files, steps "
                             "or size, see its sweep.json); pass a new -o folder, or the same settings to resume")
        return
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"-o {out}: the folder is not empty and holds no sweep; pass a new -o folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(marker, [json.dumps({"settings": settings}, indent=2).encode()], overwrite=True)


def _record_plan(out: Path, spec: SweepSettings, cells: Sequence[Cell]) -> None:
    """``sweep.json`` gains this run's planned cells, so a viewer of a running sweep knows what is still to come
    (a resume may plan other prompts or seeds: the plan is the last run's; the settings stay the check)."""
    plan = {"prompts": list(spec.prompts), "seeds": list(spec.seeds), "weights": list(spec.weights),
            "cells": [c.record() for c in cells]}
    marker = {"settings": spec.settings(), "plan": plan}
    atomic_write(out / "sweep.json", [json.dumps(marker, indent=2).encode()], overwrite=True)


class _Writer:
    """The driver's side of a run: each result becomes a PNG file, then a manifest line (in that order: a line
    is only ever written for a file on disk), then a step of the progress bar."""

    def __init__(self, out: Path, cells: Sequence[Cell], done: dict[str, dict], inputs: list[str],
                 run: SweepRunSettings) -> None:
        from tqdm.auto import tqdm

        self.out, self.inputs, self.run, self.done = out, inputs, run, done
        self.by_key = {c.key: c for c in cells}
        self.made = self.switched = 0
        self.bar = tqdm(total=len(cells), initial=len(done), unit="cell", desc="sweep", disable=not run.progress,
                        dynamic_ncols=True)

    def __call__(self, results: list[dict[str, Any]]) -> None:
        for r in results:
            cell = self.by_key[r["key"]]
            atomic_write(self.out / cell.file, [r["png"]], overwrite=True, inputs=self.inputs)
            line = {**cell.record(), "sha256": r["sha256"], "timings": r["timings"], "worker": r["pid"]}
            append_line(self.out / "manifest.jsonl", line)
            self.done[cell.key] = line
            self.made += 1
            self.switched += bool(r.get("switched"))
            self.bar.update(1)
            if self.run.on_cell is not None:
                self.run.on_cell(line)


def run_sweep(spec: SweepSettings, out: str | os.PathLike, run: SweepRunSettings | None = None) -> dict[str, Any]:
    """Make every cell of ``spec`` not already in ``out`` (see the module), then the manifest in plan order and
    ``grid.png``; returns a summary (cells, made, skipped, switches vs the naive order, seconds, workers).

    >>> run_sweep(spec, "sweep-out", SweepRunSettings(engine="ray", workers=2, progress=True))      # doctest: +SKIP
    """
    run = (run or SweepRunSettings()).check()
    check_spec(spec, out)
    check_inputs(spec)  # every input checked before OUT/ gets a byte
    out = Path(out)
    _claim_folder(spec, out)
    started = time.perf_counter()
    cells = plan_cells(spec)
    _record_plan(out, spec, cells)
    keys = {c.key for c in cells}
    done = {k: r for k, r in done_cells(out, read_manifest(out / "manifest.jsonl")).items() if k in keys}
    skipped, skipped_keys = len(done), set(done)
    todo = [c for c in cells if c.key not in done]
    groups = [[_plain(c) for c in g] for g in group_cells(todo, run.workers)]
    writer = _Writer(out, cells, done, [p for p, _ in spec.loras] + [str(spec.model)], run)
    try:
        with writer.bar:
            info = _engine(spec, groups, writer, run) if groups else {"engine": run.engine, "workers": []}
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"the sweep into {out} stopped after {writer.made} new cell(s); run the same command "
                                "again to finish it (the cells made are kept)") from None
    seconds = time.perf_counter() - started
    rewrite_manifest(out / "manifest.jsonl", [done[c.key] for c in cells])
    grid = write_grid(spec, cells, out)
    return {"output": str(out), "cells": len(cells), "made": writer.made, "skipped": skipped,
            "switches": writer.switched, "switches_planned": switches(todo),
            "switches_naive": switches([c for c in naive_order(spec) if c.key not in skipped_keys]),
            "seconds": round(seconds, 3), "cells_per_second": round(writer.made / seconds, 4) if seconds else None,
            "grid": str(grid), **info}


def _plain(cell: Cell) -> dict[str, Any]:
    return {"key": cell.key, "prompt": cell.prompt, "seed": cell.seed, "mix": list(cell.mix), "schedule": cell.schedule}


def _engine(spec: SweepSettings, groups: list, writer: _Writer, run: SweepRunSettings) -> dict[str, Any]:
    from .engines import RaySweepSettings, run_local, run_ray

    if run.engine == "local":
        return run_local(spec, groups, writer, device=run.device, dtype=run.dtype)
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ValueError("--engine ray needs Ray: pip install 'lorablend[ray]' (or use --engine local)") from None
    options = RaySweepSettings(workers=run.workers, address=run.address, gpus_per_worker=run.gpus_per_worker,
                         max_restarts=run.max_restarts, device=run.device, dtype=run.dtype)
    return run_ray(spec, groups, writer, options)


def write_grid(spec: SweepSettings, cells: Sequence[Cell], out: Path) -> Path:
    """``OUT/grid.png``: one column per mix (and schedule), a block of rows per prompt (one row per seed), every cell's image
    read back from its file (``generate.render_grid`` draws the sheet).

    >>> write_grid(spec, plan_cells(spec), Path("sweep-out"))                           # doctest: +SKIP
    PosixPath('sweep-out/grid.png')
    """
    from PIL import Image

    from ..images.drawing import render_grid, save_png

    mixes = spec.columns()
    by = {(c.prompt_index, c.seed, c.mix, c.schedule): c for c in cells}
    rows, labels = [], []
    for p, prompt in enumerate(spec.prompts):
        for seed in spec.seeds:
            row = []
            for mix in mixes:
                with Image.open(out / by[(p, int(seed), *mix)].file) as image:
                    row.append(image.convert("RGB"))
            rows.append(row)
            labels.append(f"{prompt} · seed {seed}")
    columns = [by[(0, int(spec.seeds[0]), *mix)].label for mix in mixes]
    title = f"{Path(str(spec.model)).name}: {spec.steps} steps; columns: LoRA weights, rows: prompt and seed"
    return save_png(render_grid(rows, columns, labels, title), out / "grid.png", overwrite=True)


__all__ = ["ENGINES", "SweepRunSettings", "check_inputs", "check_spec", "model_configs", "run_sweep", "write_grid"]

# Old names (settings classes all end in ...Settings since 0.2), importable until 0.3 with a warning.
from ..errors import renamed_names  # noqa: E402  (only for the old names below)

__getattr__ = renamed_names(__name__, {'SweepRun': 'SweepRunSettings'}, globals())
