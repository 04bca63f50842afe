"""A sweep worker: one pipeline for the whole run, every LoRA of the sweep loaded once; it takes a group of cells
(one mix) and makes them with ``generate.CellRenderer`` (the mix switched only when it differs from the one it
holds; ``generate --grid`` makes its cells the same way), returning each cell's PNG bytes.

The same class runs in the sweep's own process (``--engine local``) and as a Ray actor (``--engine ray``,
wrapped by ``ray.remote`` there): the image of a cell is ``pipe(prompt, generator=np.random.Generator(
np.random.PCG64(seed)))`` with its mix set, whichever worker makes it. Workers write nothing: the driver writes
the files and the manifest, so a cluster needs no shared file system.

>>> worker = SweepWorker(spec.to_dict(), device="cpu")                     # doctest: +SKIP
>>> [r["key"] for r in worker.run([cell.__dict__ for cell in group])]      # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from typing import Any, Sequence

from .plan import SweepSettings


def _dtype(name: str | None) -> Any:
    if name is None:
        return None
    from ..io.write import parse_dtype

    return parse_dtype(name)


class SweepWorker:
    """One pipeline (loaded in ``__init__``, kept for the run) and the mix it currently holds.

    ``spec``: :meth:`SweepSettings.to_dict`; ``device``: ``None`` picks CUDA when this process sees a GPU (a Ray
    actor sees the GPUs Ray gave it); ``dtype``: "fp32" / "fp16" / "bf16" or ``None`` for the default.

    >>> SweepWorker(spec.to_dict(), device="cpu").pid == os.getpid()          # doctest: +SKIP
    True
    """

    def __init__(self, spec: dict[str, Any], device: str | None = None, dtype: str | None = None) -> None:
        from ..images.grid import CellRenderer
        from ..images.generate import GenerationSettings, load_pipeline

        self.spec = SweepSettings(**{**spec, "loras": [tuple(x) for x in spec["loras"]]})
        loras = [(path, 0.0) for path, _ in self.spec.loras]
        started = time.perf_counter()
        pipe, names = load_pipeline(self.spec.model, loras, device=device, dtype=_dtype(dtype))
        self.load_seconds = time.perf_counter() - started
        settings = GenerationSettings(steps=self.spec.steps, width=self.spec.width, height=self.spec.height,
                                      guidance_scale=self.spec.guidance_scale, negative_prompt=self.spec.negative_prompt)
        self.renderer = CellRenderer(pipe, names, settings)  # the cell maker generate --grid uses too
        self.pid = os.getpid()

    def info(self) -> dict[str, Any]:
        """Who this worker is: its process id, its host, its load time. >>> worker.info()["pid"]  # doctest: +SKIP"""
        import socket

        return {"pid": self.pid, "host": socket.gethostname(), "load_seconds": round(self.load_seconds, 3)}

    def run(self, cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Make these cells (``Cell`` fields as dicts), in order; for each: key, png bytes, sha256, timings,
        and the worker's pid. >>> worker.run([vars(cell)])[0]["sha256"]  # doctest: +SKIP"""
        return [self._one(cell) for cell in cells]

    def _one(self, cell: dict[str, Any]) -> dict[str, Any]:
        image, timings, switched = self.renderer.render(cell["prompt"], cell["seed"], cell["mix"],
                                                        schedule=cell.get("schedule") or None)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        png = buffer.getvalue()
        return {"key": cell["key"], "png": png, "sha256": hashlib.sha256(png).hexdigest(), "pid": self.pid,
                "switched": switched, "timings": timings}


__all__ = ["SweepWorker"]
