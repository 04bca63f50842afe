"""serve/cache.py: parsed LoRAs held in host memory — one parse per file version, hits counted, checked
against the pipeline before any request queues."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from lorablend import DiffusionPipeline  # noqa: E402
from lorablend.io import save_adapter  # noqa: E402
from lorablend.serve import ServeSettings, create_app  # noqa: E402

GEN = {"steps": 1, "width": 32, "height": 32, "seed": 0}


@pytest.fixture
def served(make_pipe, make_adapter, tmp_path):
    """(client, app) of a server over a tiny SD1.5 pipeline and one LoRA file, ink.safetensors."""
    loras = tmp_path / "loras"
    loras.mkdir()
    base = make_pipe("sd1")
    save_adapter(make_adapter("sd1", "ink", seed=1, strength=2.0), loras / "ink.safetensors", format="kohya",
                 target=base)
    app = create_app(DiffusionPipeline(base), ServeSettings(lora_dir=loras, max_steps=20))
    with TestClient(app) as client:
        yield client, app


def test_a_second_get_is_a_hit_on_the_same_parsed_adapter(served):
    _, app = served
    state = app.state.lorablend
    source = state.catalog.lookup("ink")
    first = state.cache.get(source)
    assert state.cache.get(source) is first
    assert state.metrics.value("lorablend_adapter_cache_hits_total") >= 1
    assert state.cache.nbytes() > 0


def test_a_changed_file_is_parsed_again_as_a_new_version(served, make_adapter, make_pipe):
    _, app = served
    state = app.state.lorablend
    source = state.catalog.lookup("ink")
    first = state.cache.get(source)
    import os
    import time

    save_adapter(make_adapter("sd1", "ink", seed=2), source.path, format="kohya", target=make_pipe("sd1"),
                 overwrite=True)
    os.utime(source.path, ns=(time.time_ns() + 10**9,) * 2)
    again = state.cache.get(state.catalog.lookup("ink"))
    assert again is not first and again.version != first.version
