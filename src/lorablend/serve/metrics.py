"""The server's counters, written as Prometheus text by hand (no client library: a few dozen lines do).

One :class:`Metrics` object lives on the app; request handlers and the generation worker update it from their
threads, so every update takes its lock. Names follow Prometheus' conventions (``_total`` counters, ``_seconds``
histograms with cumulative ``le`` buckets).

>>> m = Metrics(); m.count("lorablend_adapter_cache_hits_total"); "lorablend_adapter_cache_hits_total 1" in m.render()
True
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
SWITCH_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

HELP = {
    "lorablend_requests_total": ("counter", "HTTP requests answered, by route, method and status code"),
    "lorablend_request_seconds": ("histogram", "time from a request's arrival to its answer, by route"),
    "lorablend_switch_seconds": ("histogram", "time to make a batch's LoRA mix current (load, set_adapters, rebuild)"),
    "lorablend_generate_seconds": ("histogram", "time the pipeline spent generating one batch"),
    "lorablend_batch_images": ("histogram", "images generated together in one batch"),
    "lorablend_adapter_cache_hits_total": ("counter", "LoRAs a request needed that were already parsed in memory"),
    "lorablend_adapter_cache_misses_total": ("counter", "LoRAs a request needed that had to be read from disk"),
    "lorablend_adapter_cache_evictions_total": ("counter", "LoRAs dropped from the cache to stay under --cache-bytes"),
    "lorablend_adapter_cache_bytes": ("gauge", "bytes of parsed LoRAs held by the cache"),
    "lorablend_adapters_loaded": ("gauge", "LoRAs loaded into the pipeline"),
    "lorablend_queue_depth": ("gauge", "generation requests waiting for the pipeline"),
    "lorablend_requests_dropped_total": ("counter", "queued requests dropped because their client went away"),
    "lorablend_batches_cancelled_total": ("counter", "running batches stopped between steps: all their clients left"),
    "lorablend_batch_mixes": ("histogram", "different LoRA mixes generated together in one batch"),
}
_BUCKETS = {"lorablend_switch_seconds": SWITCH_BUCKETS, "lorablend_batch_images": (1, 2, 4, 8, 16, 32),
            "lorablend_batch_mixes": (1, 2, 4, 8, 16, 32)}


def _labels(labels: tuple[tuple[str, str], ...], extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in labels] + ([extra] if extra else [])
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += 1
        self.sum += value


class Metrics:
    """Counters, gauges and histograms by name and labels; ``gauges`` may also be read live at render time.

    >>> m = Metrics(); m.observe("lorablend_switch_seconds", 0.003)
    >>> 'lorablend_switch_seconds_bucket{le="0.005"} 1' in m.render()
    True
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple], float] = {}
        self._histograms: dict[tuple[str, tuple], _Histogram] = {}
        self._live: dict[str, Callable[[], float]] = {}

    def count(self, name: str, amount: float = 1, **labels: str) -> None:
        """Add ``amount`` to a counter.

        >>> Metrics().count("lorablend_requests_total", route="/health")
        """
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + amount

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Record one value in a histogram.

        >>> Metrics().observe("lorablend_request_seconds", 0.2, route="/x")
        """
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            hist = self._histograms.get(key)
            if hist is None:
                hist = self._histograms[key] = _Histogram(_BUCKETS.get(name, LATENCY_BUCKETS))
            hist.observe(value)

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        """A gauge read when the metrics are rendered.

        >>> Metrics().gauge("lorablend_queue_depth", lambda: 0)
        """
        with self._lock:
            self._live[name] = read

    def value(self, name: str, **labels: str) -> float:
        """A counter's value (0 when never counted).

        >>> Metrics().value("lorablend_requests_dropped_total")
        0
        """
        with self._lock:
            return self._counters.get((name, tuple(sorted(labels.items()))), 0)

    def render(self) -> str:
        """Everything as Prometheus' text exposition format (version 0.0.4).

        >>> Metrics().render().startswith("# HELP")
        True
        """
        with self._lock:
            counters = dict(self._counters)
            hists = {k: (h.buckets, list(h.counts), h.total, h.sum) for k, h in self._histograms.items()}
            live = dict(self._live)
        lines: list[str] = []
        for name, (kind, text) in HELP.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            if name in live:
                lines.append(f"{name} {float(live[name]()):g}")
            for (n, labels), v in sorted(counters.items()):
                if n == name:
                    lines.append(f"{name}{_labels(labels)} {v:g}")
            if kind == "counter" and not any(n == name for n, _ in counters):
                lines.append(f"{name} 0")
            for (n, labels), (buckets, counts, total, s) in sorted(hists.items()):
                if n != name:
                    continue
                for bound, c in zip(buckets, counts):
                    le = 'le="%g"' % bound
                    lines.append(f"{name}_bucket{_labels(labels, le)} {c}")
                lines.append(f"{name}_bucket{_labels(labels, 'le=' + chr(34) + '+Inf' + chr(34))} {total}")
                lines += [f"{name}_sum{_labels(labels)} {s:.6f}", f"{name}_count{_labels(labels)} {total}"]
        return "\n".join(lines) + "\n"



def merge_texts(texts: Sequence[str]) -> str:
    r"""Several servers' Prometheus texts as one: each series (name and labels) summed over them — counters and
    histograms add up, and so do the gauges (queue depth, cache bytes, LoRAs loaded: totals of the fleet). Each
    family's ``# HELP`` / ``# TYPE`` once, its series together, in the order first seen. What ``--engine ray``'s
    ``/metrics`` answers.

    >>> print(merge_texts(["# TYPE x counter\nx{a=\"1\"} 2\n", "# TYPE x counter\nx{a=\"1\"} 3\nx 1\n"]), end="")
    # TYPE x counter
    x{a="1"} 5
    x 1
    """
    families: dict[str, tuple[list[str], dict[str, float]]] = {}
    for text in texts:
        family = ""
        for line in text.splitlines():
            if line.startswith("#"):
                parts = line.split()
                family = parts[2] if len(parts) > 2 else family
                comments, _ = families.setdefault(family, ([], {}))
                if line not in comments:
                    comments.append(line)
            elif line.strip():
                series, _, value = line.rpartition(" ")
                _, samples = families.setdefault(family, ([], {}))
                samples[series] = samples.get(series, 0.0) + float(value)
    lines: list[str] = []
    for comments, samples in families.values():
        lines += comments + [f"{k} {int(v) if float(v).is_integer() else repr(v)}" for k, v in samples.items()]
    return "\n".join(lines) + "\n"


class MetricsMiddleware:
    """ASGI wrapper: count every answer by route template (never the raw path: names in URLs would make a
    metric per LoRA), method and status, and time it.

    >>> app = MetricsMiddleware(inner_app, metrics=Metrics())              # doctest: +SKIP
    """

    def __init__(self, app: Any, metrics: Metrics, routes: Callable[[], list] | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes  # the app's routes: names a request answered before routing (a 401, a 413)

    def _route(self, scope: dict) -> str:
        """The route template a request was (or would have been) answered by; "other" when none matches."""
        route = getattr(scope.get("route"), "path", None)
        if route is None and self.routes is not None:
            from starlette.routing import Match

            route = next((r.path for r in self.routes() if r.matches(scope)[0] != Match.NONE), None)
        return route or "other"

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500}

        async def tracked_send(message: dict) -> None:
            if message.get("type") == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        finally:
            route = self._route(scope)
            self.metrics.count("lorablend_requests_total", route=route, method=scope.get("method", ""),
                               status=str(status["code"]))
            self.metrics.observe("lorablend_request_seconds", time.perf_counter() - started, route=route)


__all__ = ["HELP", "Metrics", "MetricsMiddleware", "merge_texts"]
