"""Sweeps: every prompt × seed × LoRA mix of a comparison, over one worker or a Ray cluster, resumable.

``plan`` (the cells, their keys, the order by mix), ``worker`` (one pipeline, one mix at a time), ``engines``
(``local``: this process; ``ray``: one actor per worker, Ray restarts and retries), ``manifest`` (one JSON line
per finished cell), ``run`` (the command: files, manifest, grid, progress). Ray is imported only by ``engines``
and only for ``engine="ray"``.

>>> from lorablend.sweep import SweepRun, SweepSpec, run_sweep
>>> spec = SweepSpec("sd15/", [("ink.safetensors", "ink")], [0, 1], ["a cat"], [0, 1], steps=20)
>>> run_sweep(spec, "out", SweepRun(engine="ray", workers=2))["made"]             # doctest: +SKIP
4
"""

from __future__ import annotations

from .plan import Cell, SweepSpec, group_cells, naive_order, plan_cells, switches
from .run import SweepRun, run_sweep, write_grid

__all__ = ["Cell", "SweepRun", "SweepSpec", "group_cells", "naive_order", "plan_cells", "run_sweep", "switches",
           "write_grid"]
