"""serve/state.py: one server's state — names -> parsed adapters (404 / 422 before anything queues)."""

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


def test_a_mix_of_names_becomes_its_parsed_adapters(served):
    _, app = served
    state = app.state.lorablend
    assert [e.name for e in state.adapters_for(["ink"])] == ["ink"]
    assert state.describe(state.catalog.lookup("ink"))["format"] == "kohya"
    from lorablend.serve.errors import UnknownLora

    with pytest.raises(UnknownLora):
        state.adapters_for(["nope"])
