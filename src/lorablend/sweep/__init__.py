"""Sweeps: every prompt × seed × LoRA mix of a comparison, over one worker or a Ray cluster, resumable.

``plan`` (the cells, their keys, the order by mix), ``worker`` (one pipeline, one mix at a time), ``engines``
(``local``: this process; ``ray``: one actor per worker, Ray restarts and retries), ``manifest`` (one JSON line
per finished cell), ``run`` (the command: files, manifest, grid, progress). Ray is imported only by ``engines``
and only for ``engine="ray"``.

>>> from lorablend.sweep import SweepRunSettings, SweepSettings, run_sweep
>>> spec = SweepSettings("sd15/", [("ink.safetensors", "ink")], [0, 1], ["a cat"], [0, 1], steps=20)
>>> run_sweep(spec, "out", SweepRunSettings(engine="ray", workers=2))["made"]             # doctest: +SKIP
4
"""

from __future__ import annotations

from .plan import Cell, SweepSettings, group_cells, naive_order, plan_cells, switches
from .run import SweepRunSettings, run_sweep, write_grid

__all__ = ["Cell", "SweepRunSettings", "SweepSettings", "group_cells", "naive_order", "plan_cells", "run_sweep", "switches",
           "write_grid"]

# Old names (settings classes all end in ...Settings since 0.2), importable until 0.3 with a warning.
from ..errors import renamed_names  # noqa: E402  (only for the old names below)

__getattr__ = renamed_names(__name__, {'SweepSpec': 'SweepSettings', 'SweepRun': 'SweepRunSettings'}, globals())
