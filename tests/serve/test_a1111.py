"""serve/a1111.py: the A1111 listings and controls front-ends call at start-up and while generating."""

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


def test_progress_options_and_listings_answer_as_a1111_does(served):
    client, _ = served
    progress = client.get("/sdapi/v1/progress").json()
    assert "progress" in progress and "eta_relative" in progress
    options = client.get("/sdapi/v1/options").json()
    assert isinstance(options, dict) and options
    for route in ("/sdapi/v1/cmd-flags", "/sdapi/v1/sd-vae", "/sdapi/v1/upscalers", "/sdapi/v1/memory"):
        assert client.get(route).status_code == 200, route
