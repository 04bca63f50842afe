"""sweep/engines.py: where a sweep's workers run. ``local``: one worker here, each cell delivered as soon as it is
made (a recording stand-in for the worker: the delivery logic is under test; tests/sweep/test_sweep.py runs the
real pipelines on both engines)."""

from __future__ import annotations

import lorablend.sweep.engines as engines
from lorablend.sweep.engines import RaySweepSettings, run_local
from lorablend.sweep.plan import SweepSettings


class FakeWorker:
    made: list = []

    def __init__(self, spec, device=None, dtype=None):
        self.spec, self.device = spec, device

    def run(self, cells):
        FakeWorker.made.extend(c["key"] for c in cells)
        return [{"key": c["key"]} for c in cells]

    def info(self):
        return {"pid": 1}


def test_local_delivers_every_cell_one_by_one_in_group_order(monkeypatch):
    monkeypatch.setattr(engines, "SweepWorker", FakeWorker)
    FakeWorker.made = []
    delivered = []
    spec = SweepSettings("m", [], [1.0], ["p"], [0])
    result = run_local(spec, [[{"key": "a"}, {"key": "b"}], [{"key": "c"}]], delivered.append, device="cpu")
    assert delivered == [[{"key": "a"}], [{"key": "b"}], [{"key": "c"}]] and FakeWorker.made == ["a", "b", "c"]
    assert result == {"engine": "local", "workers": [{"pid": 1}], "restarts": 0}


def test_ray_settings_default_to_one_cpu_worker_that_may_restart():
    s = RaySweepSettings(workers=3)
    assert (s.workers, s.cpus_per_worker, s.gpus_per_worker, s.max_restarts, s.address) == (3, 1.0, 0.0, 2, None)
