"""Front-ends against a real server (tiny SD1.5, loopback): ``webuiapi`` (AUTOMATIC1111's API client) and the
``openai`` client make the calls a front-end makes at start-up and while it waits, and ``schemathesis`` checks every
route against ``/openapi.json`` with the token (bounded examples): no server error, no schema violation.

Calls a front-end makes at start (each below is one of them):
* webuiapi ``WebUIApi()``: GET /sdapi/v1/scripts; ``util_get_current_model``: GET /sdapi/v1/options;
  ``get_sd_models``, ``get_samplers``, ``get_schedulers``, ``get_upscalers``, ``get_sd_vae``, ``get_embeddings``,
  ``get_prompt_styles``, ``get_cmd_flags``, ``get_memory``, ``get_loras``; ``set_options``: POST /sdapi/v1/options;
  A1111's ``POST /sdapi/v1/refresh-loras``; while waiting: ``get_progress`` (GET /sdapi/v1/progress) and
  ``interrupt`` (POST /sdapi/v1/interrupt).
* openai ``OpenAI().models.list()``: GET /v1/models; then ``images.generate``.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_support import (  # noqa: E402
    GEN, TOKEN, RunningServer, assert_same_image, decode_b64, library, wait_until, world,
)

__all__ = ["library", "world"]  # fixtures, imported for pytest to find


@pytest.fixture(scope="module")
def small(world):
    """A server with small limits: schemathesis' valid requests stay cheap (2 steps, 32x32 at most)."""
    running = RunningServer(world, max_batch=4, max_steps=2, max_images=2, max_pixels=32 * 32, max_queue=16)
    yield running
    running.stop()


def test_webuiapi_start_up_calls_and_txt2img_seeds(small, library):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=small.port)  # no auth given: it reads /sdapi/v1/scripts
    api.set_auth("user", TOKEN)  # A1111's --api-auth: basic auth, the token as password
    assert api.util_get_current_model() == small.state.model_name
    assert [m["title"] for m in api.get_sd_models()] == [small.state.model_name]
    assert api.get_samplers() and api.get_schedulers()[0]["name"]
    assert api.get_upscalers()[0]["name"] == "None" and api.get_sd_vae() == [] and api.get_prompt_styles() == []
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert api.get_cmd_flags()["max_steps"] == 2 and api.get_memory()["ram"]["total"] > 0
    assert {row["name"] for row in api.get_loras()} >= {"ink", "paper"}
    api.set_options({"sd_model_checkpoint": small.state.model_name, "samples_format": "png"})
    assert api.get_options()["samples_format"] == "png"
    assert api.session.post(f"{api.baseurl}/refresh-loras").status_code == 200
    assert api.get_progress()["state"]["job_count"] == 0 and api.interrupt() == {"interrupted": False}
    result = api.txt2img(prompt="a fox <lora:ink:0.7>", seed=40, steps=2, width=32, height=32, batch_size=2,
                         cfg_scale=7.5)
    assert result.info["all_seeds"] == [40, 41]  # each image from seed + i: reproducible alone
    for image, seed in zip(result.images, (40, 41)):
        want = library.image("a fox", {"ink": 0.7}, seed)[0]
        assert_same_image(np.asarray(image.convert("RGB"), np.float32) / 255, want, f"seed {seed}")


def test_progress_reports_steps_and_interrupt_ends_the_run(world):
    server = RunningServer(world, max_batch=1)
    try:
        with server.client() as client:
            done = {}
            thread = threading.Thread(target=lambda: done.update(r=client.post(
                "/v1/images", json={"prompt": "x", "seed": 1, "steps": 150, "width": 64, "height": 64})))
            thread.start()
            wait_until(lambda: client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] >= 1, "a step")
            now = client.get("/sdapi/v1/progress").json()
            assert now["state"]["sampling_steps"] == 150 and 0 < now["progress"] < 1 and now["eta_relative"] > 0
            assert now["current_image"]  # a preview PNG (base64) of the latents so far
            assert client.post("/sdapi/v1/interrupt").json() == {"interrupted": True}
            thread.join()
            assert done["r"].status_code == 200  # A1111's interrupt: the image decoded from where it stopped
    finally:
        server.stop()


def test_openai_client_start_up_and_generate(small, library):
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url=f"{small.url}/v1", api_key=TOKEN, max_retries=0)
    assert [m.id for m in api.models.list().data] == [small.state.model_name]
    out = api.images.generate(prompt="a fox <lora:paper:0.5>", size="32x32", n=1,
                              extra_body={"seed": 9, "steps": 2, "guidance_scale": 7.5})
    assert_same_image(decode_b64(out.data[0].b64_json), library.image("a fox", {"paper": 0.5}, 9)[0], "openai")


def _conforms(operation, settings, given, headers):
    """Run ``operation``'s bounded examples against the server; the first failure raises. Every check but
    "schema-valid data accepted": a schema cannot say what makes a file a LoRA or that width x height stays under
    --max-pixels, and the server answers those with its documented 422."""
    from schemathesis.checks import positive_data_acceptance

    @settings
    @given(operation.as_strategy())
    def check(case):
        case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance])
    check()


def test_schemathesis_every_route_conforms(small):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{small.url}/openapi.json")
    bounded = settings(max_examples=3, deadline=None, database=None, derandomize=True,
                       suppress_health_check=list(HealthCheck))
    failures, operations = [], [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        try:
            _conforms(operation, bounded, given, {"Authorization": f"Bearer {TOKEN}"})
        except Exception as exc:  # collect every operation's failure, then report them all
            failures.append(f"{operation.method.upper()} {operation.path}: {str(exc)[:1500]}")
    assert len(operations) >= 25 and not failures, "\n\n".join(failures)
    assert small.state.worker.waiting() == 0


def test_lbw_block_weights_in_lora_tokens(small, library):
    from lorablend.naming.blocks import expand_block_weights

    labels = library.pipe.model_view.index.block_labels()  # the blocks named, every other block of the model 0
    spec = {k: 0.5 * v for k, v in expand_block_weights({"IN04": 1.0, "M00": 0.4}, "sd1", labels, default=0.0).items()}
    library.pipe.set_adapters(["ink"], [spec])
    want = library.pipe("a fox", num_inference_steps=2, width=32, height=32, guidance_scale=7.5, output_type="np",
                        generator=np.random.Generator(np.random.PCG64(5))).images[0]
    with small.client() as client:
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a fox <lora:ink:0.5:lbw=IN04;M00:0.4>", "seed": 5,
                                                    "steps": 2, "width": 32, "height": 32, "cfg_scale": 7.5})
        assert r.status_code == 200, r.text
        assert_same_image(decode_b64(r.json()["images"][0]), want, "lbw")
        assert client.post("/sdapi/v1/txt2img", json={"prompt": "<lora:ink:0.5:lbw=IN02>", "steps": 2, "width": 32,
                                                      "height": 32}).status_code == 200
        for bad, says in (("lbw=ZZ9", "unknown block label"), ("lbw=1,0", "must have one of"),
                          ("0.3", "text-encoder")):
            r = client.post("/sdapi/v1/txt2img", json={"prompt": f"<lora:ink:0.5:{bad}>", "steps": 2, "width": 32,
                                                          "height": 32})
            assert r.status_code == 422 and says in r.text, r.text
