"""serve/compat.py: the A1111 and OpenAI routes on the same runtime as /v1/images."""

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


def test_a1111_lists_the_loras_and_makes_an_image_from_lora_tokens(served):
    client, _ = served
    assert [x["name"] for x in client.get("/sdapi/v1/loras").json()] == ["ink"]
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat <lora:ink:0.6>", "steps": 1, "width": 32,
                                                     "height": 32, "seed": 4})
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["images"]) == 1
    assert client.get("/sdapi/v1/samplers").status_code == 200 and client.get("/v1/models").status_code == 200
