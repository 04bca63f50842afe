"""One server's state and the way of a generation request through it: names -> parsed adapters -> the queue ->
the answer, or nothing when the client left. Shared by the native routes (``app``) and the A1111 / OpenAI routes
(``compat``).

>>> state = ServerState(pipeline, ServeSettings(lora_dir="loras/"))            # doctest: +SKIP
>>> gen, result = await generate(state, Generation("a cat", seed=1, steps=20), request)   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from .cache import AdapterCache, CachedAdapter
from .catalog import Catalog, LoraSource
from .config import ServeSettings
from .worker import Worker, Generation, Result
from .metrics import Metrics
from .errors import ClientGone


class ServerState:
    """Everything one server owns (no module-level state): settings, catalog, cache, worker, metrics, and the
    private folder where uploads live until deleted or the server stops.

    >>> app.state.lorablend.cache.names_loaded()                            # doctest: +SKIP
    ['ink']
    """

    def __init__(self, pipe: Any, config: ServeSettings, compiled: Any = None) -> None:
        self.pipe = pipe
        self.config = config.check()
        self.metrics = Metrics()
        self.catalog = Catalog(config.lora_dir)
        self.cache = AdapterCache(pipe, budget_bytes=config.cache_bytes, metrics=self.metrics)
        self.worker = Worker(pipe, self.cache, self.metrics, max_batch=config.max_batch, compiled=compiled)
        self.upload_dir = Path(tempfile.mkdtemp(prefix="lorablend-uploads-"))
        inner = getattr(pipe, "pipe", pipe)
        self.model_name = str(getattr(inner, "name_or_path", "") or type(inner).__name__)

    def adapters_for(self, names: list[str]) -> list[CachedAdapter]:
        """The parsed adapters of a mix: 404 for an unknown name, 422 for a file the reader refuses.

        >>> [e.name for e in state.adapters_for(["ink", "paper"])]              # doctest: +SKIP
        ['ink', 'paper']
        """
        sources = [self.catalog.lookup(n) for n in names]  # every name checked before any file is read
        return [self.cache.get(s) for s in sources]

    def describe(self, source: LoraSource) -> dict[str, Any]:
        """One row of ``GET /v1/loras``.

        >>> state.describe(state.catalog.lookup("ink"))["format"]              # doctest: +SKIP
        'kohya'
        """
        entry = self.cache.cached(source.name)
        row: dict[str, Any] = {"name": source.name, "origin": source.origin,
                               "loaded": source.name in self.cache.names_loaded(), "cached": entry is not None}
        try:
            row["bytes"] = source.path.stat().st_size
            if entry is not None:
                ranks = [d.rank for d in entry.adapter.deltas.values() if d.rank is not None]
                row.update(format=entry.adapter.format, family=entry.adapter.family, rank=max(ranks, default=None))
            else:
                row.update(self.catalog.info(source))
        except (OSError, ValueError) as exc:  # a damaged file is listed with its problem, not hidden
            row.update(format=None, family=None, rank=None, error=str(exc))
        return row

    def close(self) -> None:
        """Stop the worker and remove the uploads (the app's shutdown). >>> state.close()  # doctest: +SKIP"""
        self.worker.stop()
        shutil.rmtree(self.upload_dir, ignore_errors=True)


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body is read by then: the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


async def generate(state: ServerState, gen: Generation, request: Request) -> tuple[Generation, Result]:
    """Resolve the mix, queue the request, wait for its batch; a client that leaves frees its place.

    >>> gen, result = await generate(state, body.generation(config), request)   # doctest: +SKIP
    """
    entries = await run_in_threadpool(state.adapters_for, sorted(gen.loras))
    state.worker.start()  # idempotent: started here too, because a mounted sub-app gets no startup event
    job = state.worker.submit(gen, entries)
    result = asyncio.wrap_future(job.future)
    watcher = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({result, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not result.done():
        state.worker.abandon(job)
        raise ClientGone("the client disconnected before its images were made")
    return job.generation, result.result()


__all__ = ["ServerState", "generate"]
