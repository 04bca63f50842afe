"""serve/openapi.py: the schema at /openapi.json carries the routes, the token schemes and the limits."""

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


def test_the_schema_lists_the_routes_and_the_servers_own_limits(served):
    client, _ = served
    schema = client.get("/openapi.json").json()
    assert {"/v1/images", "/v1/loras", "/sdapi/v1/txt2img"} <= set(schema["paths"])
    assert "20" in str(schema["paths"]["/v1/images"]) or "20" in str(schema.get("components", {}))  # max_steps
