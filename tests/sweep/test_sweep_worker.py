"""sweep/worker.py: one pipeline for the whole run; cells made through the shared CellRenderer, each with its key,
PNG bytes and their sha256, switching the mix only when it changes."""

from __future__ import annotations

import hashlib

import pytest

from lorablend.sweep.plan import SweepSettings, plan_cells
from lorablend.sweep.worker import SweepWorker

pytest.importorskip("httpx")  # serve_support's import; the saved tiny pipeline and LoRAs come from it
from serve_support import make_world  # noqa: E402


@pytest.fixture(scope="module")
def worker_and_cells(tmp_path_factory):
    world = make_world(tmp_path_factory.mktemp("worker"))
    name = next(iter(world.files))
    spec = SweepSettings(str(world.model), [(str(world.files[name]), name)], [0.0, 1.0], ["a cat"], [0], steps=1,
                         width=32, height=32)
    return SweepWorker(spec.to_dict(), device="cpu"), plan_cells(spec)


def test_each_cell_comes_back_with_its_key_png_and_hash(worker_and_cells):
    worker, cells = worker_and_cells
    results = worker.run([vars(c) for c in cells])
    assert [r["key"] for r in results] == [c.key for c in cells]
    assert all(r["png"].startswith(b"\x89PNG") and r["sha256"] == hashlib.sha256(r["png"]).hexdigest()
               for r in results)
    assert results[0]["sha256"] != results[1]["sha256"]  # weight 0 and weight 1: other images
    assert worker.info()["pid"] == results[0]["pid"]


def test_a_repeated_mix_does_not_switch_and_gives_the_same_image(worker_and_cells):
    worker, cells = worker_and_cells
    first = worker.run([vars(cells[0])])[0]
    again = worker.run([vars(cells[0])])[0]
    assert not again["switched"] and again["sha256"] == first["sha256"]
