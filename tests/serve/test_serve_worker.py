"""serve/worker.py: the one thread that owns the pipeline — queued requests answered, equal requests equal."""

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


def test_equal_requests_get_equal_images_and_every_future_is_answered(served):
    from lorablend.serve.batch import Generation

    _, app = served
    state = app.state.lorablend
    entries = state.adapters_for(["ink"])
    gen = state.worker.resolve(Generation("a cat", seed=3, steps=1, loras={"ink": 0.7}, width=32, height=32))
    jobs = [state.worker.submit(gen, entries) for _ in range(2)]
    results = [job.future.result(timeout=120) for job in jobs]
    assert all(r.images[0].shape == (32, 32, 3) for r in results)
    # each request's noise from its own seed; computed in one batch, rows may differ in their last bits
    import numpy as np

    np.testing.assert_allclose(results[0].images[0], results[1].images[0], atol=1e-5, rtol=0)
    assert state.worker.waiting() == 0
