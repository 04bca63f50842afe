"""The adapter cache: parsed LoRAs held in host memory, loaded into the one pipeline on demand, least recently
used first out when their bytes pass ``--cache-bytes``.

Two sides, two threads. Request handlers call :meth:`AdapterCache.get` (parse on a miss, from a thread pool):
a damaged file fails there, before the request queues, with the reader's message. The generation worker calls
:meth:`AdapterCache.activate` while it holds the pipeline: it loads what the batch needs
(``load_lora_weights``) and evicts with ``delete_adapters``. Only the worker (or a caller holding the pipeline
lock) changes what the pipeline holds, so eviction can never pull a LoRA out from under a running batch. A file
changed on disk (size or mtime) is parsed again and reloaded: an entry is reused only while its stamp holds.
Clients see eviction only as latency: an evicted LoRA is read again on its next use.

>>> cache = AdapterCache(pipe, budget_bytes=4 * 2**30, metrics=Metrics())          # doctest: +SKIP
>>> entry = cache.get(catalog.lookup("ink"))                                        # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .catalog import LoraSource
from .metrics import Metrics
from ..runtime.schedule import takes_sample_weights  # (what per-sample weights need; re-exported)


@dataclass(eq=False)
class CachedAdapter:
    """One parsed LoRA: its name, a version unique in this server (a reparse is a new version), the Adapter,
    its tensor bytes and the file stamp it was read at.

    >>> entry = cache.get(catalog.lookup("ink")); entry.name, entry.nbytes      # doctest: +SKIP
    ('ink', 584000)
    """

    name: str
    version: int
    adapter: Any
    nbytes: int
    stamp: tuple[int, int]
    path: Path
    low_rank: bool = False  # every layer one low-rank pair, no bias delta: it can share a batch with other mixes
    bound: Any = None  # the binding checked at parse: what the worker adds to the pipeline (no second check)


def adapter_bytes(adapter: Any) -> int:
    """Bytes of an Adapter's tensors. >>> adapter_bytes(adapter)  # doctest: +SKIP"""
    return sum(t.numel() * t.element_size() for d in adapter.deltas.values() for t in d.tensors())


class AdapterCache:
    """LRU of parsed adapters bounded by ``budget_bytes``; the loaded ones are a subset, in the pipeline.

    A batch may need more than the budget (its own LoRAs are never evicted while it runs): the cache then holds
    more until the next batch, and says so in ``lorablend_adapter_cache_bytes``.

    >>> AdapterCache(pipe, budget_bytes=2**30, metrics=Metrics()).names_loaded()   # doctest: +SKIP
    []
    """

    def __init__(self, pipe: Any, *, budget_bytes: int, metrics: Metrics) -> None:
        self.pipe = pipe
        self.budget = int(budget_bytes)
        self.metrics = metrics
        self._lock = threading.RLock()  # nbytes() takes it too, from inside _trim
        self._entries: OrderedDict[str, CachedAdapter] = OrderedDict()  # least recently used first
        self._loaded: dict[str, CachedAdapter] = {}  # what the pipeline holds now, under these names
        self._versions = itertools.count(1)
        self._parsing: dict[str, threading.Lock] = {}  # one lock per name being parsed (kept: a few bytes each)
        metrics.gauge("lorablend_adapter_cache_bytes", self.nbytes)
        metrics.gauge("lorablend_adapters_loaded", lambda: len(self._loaded))

    # ------------------------------------------------------------------ request side
    def get(self, source: LoraSource) -> CachedAdapter:
        """The parsed adapter of ``source`` (a hit) or parse it now (a miss). Raises the reader's
        ``LoraFormatError`` for a damaged file and ``LoraCompatibilityError`` for one that does not fit the
        pipeline: both before anything changes.

        >>> cache.get(catalog.lookup("ink")).version                            # doctest: +SKIP
        1
        """
        stamp = source.stamp()
        entry = self._current(source, stamp)
        if entry is not None:
            self.metrics.count("lorablend_adapter_cache_hits_total")
            return entry
        with self._lock:
            parsing = self._parsing.setdefault(source.name, threading.Lock())
        with parsing:  # clients asking for one new LoRA at once: one parse, one version (else: reloads)
            entry = self._current(source, stamp)
            if entry is not None:
                self.metrics.count("lorablend_adapter_cache_hits_total")
                return entry
            self.metrics.count("lorablend_adapter_cache_misses_total")
            adapter, bound = self._parse(source)
            entry = CachedAdapter(source.name, next(self._versions), adapter, adapter_bytes(adapter), stamp,
                                  source.path, low_rank=takes_sample_weights(adapter), bound=bound)
            with self._lock:
                self._entries[source.name] = entry
                self._entries.move_to_end(source.name)
                self._trim(keep={source.name}, may_unload=False)
        return entry

    def _current(self, source: LoraSource, stamp: tuple[int, int]) -> CachedAdapter | None:
        """The cached entry of ``source`` if it was read from this very file as it is now (LRU bumped)."""
        with self._lock:
            entry = self._entries.get(source.name)
            if entry is not None and entry.stamp == stamp and entry.path == source.path:
                self._entries.move_to_end(source.name)
                return entry
        return None

    def _parse(self, source: LoraSource) -> tuple[Any, Any]:
        """The Adapter and its binding to the pipeline, checked once here, off the worker: a LoRA for another model
        fails now. A plain LoRA's binding is what the worker adds (``runtime.add``); one that needs the full load
        (a control LoRA widening an input, norm replacements) gets None and goes through ``load_lora_weights``."""
        from ..io import load_adapter
        from ..runtime.binding import bind_adapter

        view = self.pipe.model_view

        def read(path: Path) -> Any:
            return load_adapter(str(path), target=view.index, name=source.name)
        if source.low is None:
            adapter = read(source.path)
        else:  # a Wan 2.2 A14B pair: each file on its expert, one adapter (a one-denoiser pipeline refuses it)
            from ..runtime.experts import pair_of

            adapter = pair_of(self.pipe, None, source.path, source.low, source.name, read)
        # checked: read for this very index, so keys, shapes and finite values were checked by the reader (a
        # pair's low side was moved onto transformer_2 after: checked again here)
        bound = bind_adapter(adapter, view, strict=True, checked=source.low is None)
        plain = not getattr(adapter, "needs_control", False) and not getattr(adapter, "replacements", None)
        return adapter, (bound if plain else None)

    # ------------------------------------------------------------------ worker side (pipeline held)
    def activate(self, entries: Sequence[CachedAdapter]) -> None:
        """Make the pipeline hold exactly these versions of these names (loading what it lacks), then evict
        least recently used adapters other than these until the cache fits its budget. Worker only.

        >>> with worker.lock: cache.activate([cache.get(catalog.lookup("ink"))])   # doctest: +SKIP
        """
        for entry in entries:
            loaded = self._loaded.get(entry.name)
            if loaded is not entry:
                if loaded is not None:  # an older version of the file, or a name registered again
                    self.pipe.delete_adapters(entry.name)
                    del self._loaded[entry.name]
                if entry.bound is not None:  # bound and checked at parse: added as it is, no second check
                    self.pipe.runtime.add(entry.bound, activate=False)
                else:
                    self.pipe.load_lora_weights(entry.adapter, adapter_name=entry.name)
                self._loaded[entry.name] = entry
            with self._lock:
                if self._entries.get(entry.name) is None:  # evicted from the host side while queued: it is back
                    self._entries[entry.name] = entry
                if self._entries[entry.name] is entry:
                    self._entries.move_to_end(entry.name)
        with self._lock:
            self._trim(keep={e.name for e in entries}, may_unload=True)

    def drop(self, name: str) -> None:
        """Forget ``name`` entirely (``DELETE /v1/loras``): unload it from the pipeline. Pipeline lock held.

        >>> with worker.lock: cache.drop("ink")                                  # doctest: +SKIP
        """
        with self._lock:
            self._entries.pop(name, None)
        if self._loaded.pop(name, None) is not None:
            self.pipe.delete_adapters(name)

    # ------------------------------------------------------------------ bookkeeping
    def nbytes(self) -> int:
        """Bytes held: every parsed entry, plus loaded versions no longer current (unloaded at the next batch).

        >>> cache.nbytes() <= cache.budget                                        # doctest: +SKIP
        True
        """
        with self._lock:  # also read by /metrics, from another thread
            current = {id(e) for e in self._entries.values()}
            return sum(e.nbytes for e in self._entries.values()) + sum(
                e.nbytes for e in list(self._loaded.values()) if id(e) not in current)

    def names_loaded(self) -> list[str]:
        """Names the pipeline holds now. >>> cache.names_loaded()  # doctest: +SKIP"""
        return sorted(self._loaded)

    def cached(self, name: str) -> CachedAdapter | None:
        """The current parsed entry of ``name``, if any (no LRU bump). >>> cache.cached("ink")  # doctest: +SKIP"""
        with self._lock:
            return self._entries.get(name)

    def _trim(self, keep: set[str], may_unload: bool) -> None:
        """Evict least recently used entries (not in ``keep``) until within budget. Loaded entries go only when
        ``may_unload`` (the worker, holding the pipeline); stale loaded versions go first. Lock held."""
        if may_unload:
            for name, loaded in list(self._loaded.items()):
                if name not in keep and self._entries.get(name) is not loaded:
                    self.pipe.delete_adapters(name)
                    del self._loaded[name]
        for name in list(self._entries):
            if self.nbytes() <= self.budget:
                return
            if name in keep or (name in self._loaded and not may_unload):
                continue
            del self._entries[name]
            if self._loaded.pop(name, None) is not None:
                self.pipe.delete_adapters(name)
            self.metrics.count("lorablend_adapter_cache_evictions_total")


__all__ = ["AdapterCache", "CachedAdapter", "adapter_bytes", "takes_sample_weights"]
