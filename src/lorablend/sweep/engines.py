"""Where a sweep's workers run: ``local`` (one worker in this process) or ``ray`` (one Ray actor per worker,
each holding one pipeline). Ray is imported only here and only for ``--engine ray``.

Both take groups of cells (plain dicts) and hand every finished group's results to ``deliver`` in this process,
which writes the files and the manifest. On Ray, each actor has one group at a time; when it hands one back it
gets the next at once (a group of the mix it holds, if any is left, so it does not switch), before the driver
writes the last one's files. Faults are Ray's to handle: an actor whose process dies is restarted by Ray
(``max_restarts``) and the call it was running is retried on the new process (``max_task_retries``); only when
Ray gives an actor up do its groups go back to the others.

>>> run_local(spec, groups, deliver, device="cpu")                                    # doctest: +SKIP
>>> run_ray(spec, groups, deliver, RaySweepSettings(workers=2))                             # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .plan import SweepSettings
from .worker import SweepWorker

logger = logging.getLogger(__name__)
Deliver = Callable[[list[dict[str, Any]]], None]


def run_local(spec: SweepSettings, groups: Sequence[list[dict[str, Any]]], deliver: Deliver, *,
              device: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    """One worker in this process takes the groups in order; each cell is delivered as soon as it is made.

    >>> run_local(spec, [[vars(c) for c in cells]], print, device="cpu")                 # doctest: +SKIP
    """
    worker = SweepWorker(spec.to_dict(), device=device, dtype=dtype)
    for group in groups:
        for cell in group:
            deliver(worker.run([cell]))
    return {"engine": "local", "workers": [worker.info()], "restarts": 0}


@dataclass
class RaySweepSettings:
    """How a sweep runs on Ray: ``workers`` actors of ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs each;
    ``address`` joins a running cluster (``None``: this process's Ray instance, started here with
    ``workers × cpus_per_worker`` CPUs when there is none); ``max_restarts``: how often Ray may restart a dead
    actor (its running call is retried each time).

    >>> RaySweepSettings(workers=2).max_restarts
    2
    """

    workers: int = 1
    address: str | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_restarts: int = 2
    device: str | None = None
    dtype: str | None = None


def connect(address: str | None, num_cpus: int) -> bool:
    """``ray.init`` unless this process is connected already: a cluster at ``address``, or a local instance of
    ``num_cpus`` CPUs without a dashboard. Returns True when it started the connection (the caller shuts it down).

    >>> connect(None, num_cpus=2)                                                        # doctest: +SKIP
    True
    """
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return True


def _pick(pending: list[list[dict[str, Any]]], mix: Any) -> list[dict[str, Any]]:
    """The next group for a worker that holds ``mix``: one of that mix when any is left, else the oldest."""
    for i, group in enumerate(pending):
        if group[0]["mix"] == mix:
            return pending.pop(i)
    return pending.pop(0)


def run_ray(spec: SweepSettings, groups: Sequence[list[dict[str, Any]]], deliver: Deliver,
            options: RaySweepSettings) -> dict[str, Any]:
    """The groups over ``options.workers`` Ray actors; results delivered as each group comes back.

    >>> run_ray(spec, groups, deliver, RaySweepSettings(workers=2, address="auto"))               # doctest: +SKIP
    """
    import ray

    started = connect(options.address, num_cpus=max(1, int(options.workers * options.cpus_per_worker + 0.999)))
    Remote = ray.remote(SweepWorker).options(
        num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker, max_restarts=options.max_restarts,
        max_task_retries=options.max_restarts)
    actors = [Remote.remote(spec.to_dict(), options.device, options.dtype) for _ in range(options.workers)]
    try:
        return _drive(actors, list(groups), deliver)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if started:
            ray.shutdown()


def _drive(actors: list[Any], pending: list[list[dict[str, Any]]], deliver: Deliver) -> dict[str, Any]:
    """Keep every live actor busy with one group until none is left; an actor Ray gave up on hands its group
    back to the others. Returns which worker processes made cells and how many of them were restarts."""
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    holding: dict[int, Any] = {}
    running: dict[Any, tuple[int, list[dict[str, Any]]]] = {}
    live = set(range(len(actors)))
    pids: dict[int, str] = {}

    def feed(i: int) -> None:
        if pending and i in live:
            group = _pick(pending, holding.get(i))
            holding[i] = group[0]["mix"]
            running[actors[i].run.remote(group)] = (i, group)

    for i in range(len(actors)):
        feed(i)
    while running:
        ready, _ = ray.wait(list(running), num_returns=1)
        i, group = running.pop(ready[0])
        try:
            results = ray.get(ready[0])
        except (ActorDiedError, ActorUnavailableError) as exc:
            logger.warning("worker %d is gone after its restarts (%s); its %d cells go to the others", i, exc,
                           len(group))
            live.discard(i)
            pending.insert(0, group)
            if not live:
                raise RuntimeError("every sweep worker died; see the Ray logs (ray status / the worker's "
                                   "stderr), then rerun the same command to finish the sweep") from exc
            for j in live - {k for k, _ in running.values()}:
                feed(j)
            continue
        feed(i)  # the worker's next group starts before this one's files are written
        for r in results:
            pids[r["pid"]] = r.get("host", "")
        deliver(results)
    return {"engine": "ray", "workers": [{"pid": p} for p in sorted(pids)],
            "restarts": max(0, len(pids) - len(actors)), "lost_workers": len(actors) - len(live)}


__all__ = ["RaySweepSettings", "connect", "run_local", "run_ray"]

# Old names (settings classes all end in ...Settings since 0.2), importable until 0.3 with a warning.
from ..errors import renamed_names  # noqa: E402  (only for the old names below)

__getattr__ = renamed_names(__name__, {'RayOptions': 'RaySweepSettings'}, globals())
