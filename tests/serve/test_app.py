"""serve/app.py: the native routes of the server (health, LoRA listing, images, metrics) on one pipeline;
the full HTTP behaviour (files, uploads, isolation) runs in tests/serve/test_serve.py."""

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


def test_health_listing_and_one_image_with_its_seed_and_mix(served):
    client, _ = served
    assert client.get("/health").status_code == 200
    assert [x["name"] for x in client.get("/v1/loras").json()["loras"]] == ["ink"]
    answer = client.post("/v1/images", json={"prompt": "a cat", "loras": {"ink": 0.8}, "response_format": "json",
                                             **GEN})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["seed"] == 0 and body["loras"] == {"ink": 0.8} and len(body["images"]) == 1
    assert 'lorablend_requests_total{' in client.get("/metrics").text


def test_an_unknown_lora_is_404_and_a_bad_body_422_naming_the_field(served):
    client, _ = served
    missing = client.post("/v1/images", json={"prompt": "a cat", "loras": {"inc": 1.0}, **GEN})
    assert missing.status_code == 404 and "ink" in missing.text  # the close name is suggested
    bad = client.post("/v1/images", json={"prompt": "a cat", "steps": 21})
    assert bad.status_code == 422 and "steps" in bad.text
