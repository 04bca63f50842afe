"""``lorablend serve`` on a real uvicorn server (loopback, a thread): every image equals the library's for the
same seed and mix, in any order, batched or not, beside other clients; the A1111 and OpenAI endpoints (the
``openai`` package as the client) give the same image as ``/v1/images``; metrics. The command line: ``test_command.py``.
Bad input, security and resource limits: ``test_serve_inputs.py``.
"""

from __future__ import annotations

import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lorablend import DiffusionPipeline

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_support import (  # noqa: E402  (after the skips: no server without its extra)
    GEN, LORAS, TOKEN, RunningServer, assert_same_image, decode_b64, decode_png, free_port, library, server,
    wait_until, world,
)

__all__ = ["library", "server", "world"]  # fixtures, imported for pytest to find


def _random_mix(rng: random.Random) -> dict[str, float]:
    names = rng.sample(sorted(LORAS), rng.randint(0, 3))
    return {n: round(rng.uniform(-1.5, 1.5), 3) for n in names}


def test_health_is_open_and_everything_else_wants_the_token(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/v1/loras").status_code == 401
    assert httpx.get(f"{server.url}/v1/loras", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.post(f"{server.url}/v1/images", json={"prompt": "x"}).status_code == 401
    assert httpx.get(f"{server.url}/v1/loras", headers={"X-API-Key": TOKEN}).status_code == 200
    assert httpx.get(f"{server.url}/v1/loras", auth=("anyone", TOKEN)).status_code == 200  # A1111's --api-auth
    listed = server.client().get("/v1/loras").json()["loras"]
    assert sorted(row["name"] for row in listed) == sorted(LORAS)
    ink = next(row for row in listed if row["name"] == "ink")
    assert ink["format"] == "kohya" and ink["rank"] == 4 and ink["bytes"] > 0 and ink["loaded"] is False


def test_images_equal_the_library_for_random_mixes_in_any_order(server, library):
    rng = random.Random(12)
    cases = [(_random_mix(rng), rng.randrange(2**32)) for _ in range(6)] + [({}, 5), ({"ink": 0.8}, 5)]
    rng.shuffle(cases)
    with server.client() as client:
        for mix, seed in cases:
            r = client.post("/v1/images", json={"prompt": "a bowl of ramen", "loras": mix, "seed": seed, **GEN})
            assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
            assert int(r.headers["x-seed"]) == seed and set(json.loads(r.headers["x-timings"])) == {
                "queue", "switch", "generate"}
            assert_same_image(decode_png(r.content), library.image("a bowl of ramen", mix, seed)[0], f"{mix} {seed}")
        listed = {row["name"]: row["loaded"] for row in client.get("/v1/loras").json()["loras"]}
        assert any(listed.values())


def test_json_answer_several_images_negative_prompt_and_scale(server, library):
    body = {"prompt": "a fox <lora:moss:0.5>", "negative_prompt": "blurry", "loras": {"ink": 0.7}, "seed": 99,
            "scale": 0.6, "num_images": 2, "response_format": "json", **GEN}
    with server.client() as client:
        data = client.post("/v1/images", json=body).json()
    assert data["seed"] == 99 and data["loras"] == {"ink": 0.7, "moss": 0.5} and data["prompt"] == "a fox"
    assert set(data["timings"]) == {"queue", "switch", "generate"} and len(data["images"]) == 2
    expected = library.image("a fox", {"ink": 0.7, "moss": 0.5}, 99, num_images=2, scale=0.6,
                             negative_prompt="blurry")
    for got, want in zip(data["images"], expected):
        assert_same_image(decode_b64(got), want, "num_images=2")


def test_concurrent_clients_get_their_own_images(server, library):
    rng = random.Random(7)
    jobs = [(_random_mix(rng), rng.randrange(2**32), f"prompt {i}") for i in range(10)]
    jobs += [(jobs[0][0], 1234, "same mix as the first")]  # a batch partner for it, when they meet in the queue

    def ask(job):
        mix, seed, prompt = job
        with server.client() as client:
            r = client.post("/v1/images", json={"prompt": prompt, "loras": mix, "seed": seed, **GEN})
        return r.status_code, r.content

    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(ask, jobs))
    for (mix, seed, prompt), (status, content) in zip(jobs, answers):
        assert status == 200
        # two levels: whichever requests meet in the queue share a batch whatever their mixes (per-sample weights,
        # another summation order), and these strength-2 LoRAs at weights up to ±1.5 turn that into up to 1.1
        # levels (seen once in 3 runs); the per-sample exactness itself is tests/serve/test_batch_mixed.py's (1e-4)
        assert_same_image(decode_png(content), library.image(prompt, mix, seed)[0], f"{prompt}: {mix}", levels=2)


def test_requests_with_one_mix_run_as_one_batch_with_unbatched_images(server, library):
    mix = {"paper": 0.9, "clay": -0.4}
    seeds = [3, 4, 5]
    engine = server.state.worker
    before = server.state.metrics.value("lorablend_requests_dropped_total")
    results: dict[int, dict] = {}

    def ask(seed: int, prompt: str, loras: dict) -> None:
        with server.client() as client:
            results[seed] = client.post("/v1/images", json={"prompt": prompt, "loras": loras, "seed": seed,
                                                            "response_format": "json", **GEN}).json()

    # Hold the pipeline: the first request is taken and waits; the next three queue up behind it and, sharing
    # a mix and settings, leave the queue together as one batch of three.
    threads = []
    with engine.lock:
        threads.append(threading.Thread(target=ask, args=(1, "first", {"ink": 0.3})))
        threads[0].start()
        wait_until(lambda: engine.running, "the worker to take the first request")
        for seed in seeds:
            threads.append(threading.Thread(target=ask, args=(seed, f"cat {seed}", mix)))
            threads[-1].start()
        wait_until(lambda: len(engine._queue) == len(seeds), "three requests queued")
    for t in threads:
        t.join()
    assert server.state.metrics.value("lorablend_requests_dropped_total") == before
    for seed in seeds:
        assert results[seed]["batch_images"] == 3, results[seed]
        assert_same_image(decode_b64(results[seed]["images"][0]), library.image(f"cat {seed}", mix, seed)[0],
                          f"batched seed {seed}")
    assert results[1]["batch_images"] == 1


def test_a1111_and_openai_clients_get_the_same_image_as_v1_images(server):
    openai = pytest.importorskip("openai")
    seed, size = 4242, 32
    with server.client() as client:
        native = decode_png(client.post("/v1/images", json={"prompt": "a lighthouse", "loras": {"ink": 0.6,
                            "moss": 0.4}, "seed": seed, **GEN}).content)
        a1111 = client.post("/sdapi/v1/txt2img", json={
            "prompt": "a lighthouse <lora:ink:0.6> <lora:moss:0.4>", "negative_prompt": "", "seed": seed, "steps": 2,
            "cfg_scale": 7.5, "width": size, "height": size, "batch_size": 1, "sampler_name": "Euler a"}).json()
        names = [row["name"] for row in client.get("/sdapi/v1/loras").json()]
        for route in ("/sdapi/v1/sd-models", "/sdapi/v1/samplers", "/sdapi/v1/options"):  # read at start-up
            assert client.get(route).status_code == 200, route
    assert sorted(names) == sorted(LORAS)
    assert json.loads(a1111["info"])["seed"] == seed and len(a1111["images"]) == 1
    assert_same_image(decode_b64(a1111["images"][0]), native, "A1111 txt2img")
    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0)
    answer = api.images.generate(prompt="a lighthouse <lora:ink:0.6> <lora:moss:0.4>", n=1, size=f"{size}x{size}",
                                 response_format="b64_json", model="lorablend",
                                 extra_body={"seed": seed, "steps": 2, "guidance_scale": 7.5})
    assert_same_image(decode_b64(answer.data[0].b64_json), native, "OpenAI images.generate")
    assert len(api.models.list().data) == 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")


def test_the_app_mounts_inside_another_app(server, library):
    import uvicorn
    from fastapi import FastAPI

    parent = FastAPI()
    parent.mount("/lora", server.app)  # a mounted app gets no startup event: the worker starts on demand
    port = free_port()
    host = uvicorn.Server(uvicorn.Config(parent, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=host.run, daemon=True)
    thread.start()
    wait_until(lambda: host.started, "the parent app to start")
    try:
        url = f"http://127.0.0.1:{port}/lora"
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        assert httpx.get(f"{url}/v1/loras").status_code == 401
        r = httpx.post(f"{url}/v1/images", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120,
                       json={"prompt": "mounted", "loras": {"paper": 0.4}, "seed": 6, **GEN})
        assert_same_image(decode_png(r.content), library.image("mounted", {"paper": 0.4}, 6)[0], "mounted")
    finally:
        host.should_exit = True
        thread.join()


def test_metrics_count_requests_cache_switches_and_queue(server):
    with server.client() as client:
        client.post("/v1/images", json={"prompt": "m", "loras": {"clay": 0.5}, "seed": 1, **GEN})
        text = client.get("/metrics").text
    for line in ("# TYPE lorablend_requests_total counter", 'route="/v1/images"', "lorablend_queue_depth 0",
                 "lorablend_switch_seconds_count", "lorablend_request_seconds_bucket",
                 "lorablend_adapter_cache_hits_total", "lorablend_adapter_cache_misses_total",
                 "lorablend_adapter_cache_evictions_total"):
        assert line in text, line
    assert server.state.metrics.value("lorablend_adapter_cache_hits_total") > 0


def test_a_compiled_denoiser_switches_mixes_with_one_graph_and_the_same_images(world, library):
    if getattr(DiffusionPipeline, "compile_denoiser", None) is None:
        pytest.skip("this build has no DiffusionPipeline.compile_denoiser (lorablend serve --compile says so)")
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # dynamo's own tracer with the eager backend: the graph-break and recompile checks hold for any backend,
    # and inductor's code generation would cost minutes of CPU here
    compiled = RunningServer(world, compile_backend="eager")
    try:
        with compiled.client() as client:
            for mix, seed in [({"ink": 0.5}, 1), ({"ink": 0.5, "moss": -0.7}, 2), ({"clay": 1.0}, 3), ({}, 4),
                              ({"paper": 0.3, "clay": 0.2, "moss": 0.9}, 5)]:
                r = client.post("/v1/images", json={"prompt": "c", "loras": mix, "seed": seed, **GEN})
                assert r.status_code == 200, r.text
                assert_same_image(decode_png(r.content), library.image("c", mix, seed)[0], f"compiled: {mix}")
        stats = torch._dynamo.utils.counters
        assert stats["stats"]["unique_graphs"] == 1 and not stats["graph_break"], (dict(stats["stats"]),
                                                                                   dict(stats["graph_break"]))
    finally:
        compiled.stop()
        torch._dynamo.reset()


def _engine_batches(build, asks: list[tuple[str, int, str | None, int]], mix: dict[str, float]):
    """The engine alone on ``build()``'s pipeline with two random LoRAs: ``asks`` (prompt, seed, negative, images)
    all queue before the worker runs the first; returns (results, the library pipeline with the same LoRAs)."""
    from pathlib import Path

    from lorablend.fixtures.tiny_unets import random_adapter
    from lorablend.serve.cache import AdapterCache, CachedAdapter
    from lorablend.serve.worker import Worker, Generation
    from lorablend.serve.metrics import Metrics

    pipe, ref = DiffusionPipeline(build()), DiffusionPipeline(build())
    ref.set_progress_bar_config(disable=True)
    entries = []
    for i, name in enumerate(mix):
        adapter = random_adapter(pipe.pipe, name, seed=i + 1, strength=2.0)
        ref.load_lora_weights(adapter, adapter_name=name)
        entries.append(CachedAdapter(name, i, adapter, 0, (0, 0), Path(name)))
    metrics = Metrics()
    engine = Worker(pipe, AdapterCache(pipe, budget_bytes=2**30, metrics=metrics), metrics, max_batch=4)
    with engine.lock:  # every request queues before the worker may run the first
        engine.start()
        jobs = [engine.submit(Generation(p, seed=s, steps=2, loras=mix, width=32, height=32, negative_prompt=neg,
                                         num_images=k), entries) for p, s, neg, k in asks]
    results = [job.future.result() for job in jobs]
    engine.stop()
    ref.set_adapters(list(mix), list(mix.values()))
    return results, ref


def _assert_library_images(ref, asks, results, guidance_scale: float, what: str) -> None:
    import numpy as np

    for (prompt, seed, negative, k), result in zip(asks, results):
        expected = ref(prompt=prompt, negative_prompt=negative, num_inference_steps=2, width=32, height=32,
                       num_images_per_prompt=k, guidance_scale=guidance_scale, output_type="np",
                       generator=np.random.Generator(np.random.PCG64(seed))).images
        assert len(result.images) == k
        for got, want in zip(result.images, expected):
            assert_same_image(got, want, f"{what} {prompt}")


def test_sdxl_batches_equal_the_library_and_keep_negative_prompts_apart():
    """The engine alone, on the tiny SDXL pipeline: a batch mixes prompts, seeds and image counts; a request
    with a negative prompt never joins one without (SDXL encodes a missing negative prompt as zeros)."""
    from lorablend.fixtures.tiny_unets import tiny_pipeline

    asks = [("x", 1, None, 1), ("a dog", 2, None, 2), ("a cat", 3, None, 1), ("neg", 4, "ugly", 1)]
    results, ref = _engine_batches(lambda: tiny_pipeline("sdxl"), asks, {"a": 0.6, "b": -0.4})
    assert results[-1].batch_images == 1 and all(r.batch_images > 1 for r in results[1:3])
    _assert_library_images(ref, asks, results, 5.0, "SDXL")


def test_flux_batches_equal_the_library():
    """The engine on a tiny Flux.1 pipeline: packed latents drawn per request from its own seed, batched."""
    import inspect

    from lorablend.fixtures.tiny_transformers import tiny_flux_pipeline

    asks = [("a cat", 1, None, 1), ("a dog", 2, None, 2)]
    results, ref = _engine_batches(tiny_flux_pipeline, asks, {"a": 0.6, "b": -0.4})
    assert all(r.batch_images == 3 for r in results)
    guidance = inspect.signature(ref.pipe.__call__).parameters["guidance_scale"].default
    _assert_library_images(ref, asks, results, guidance, "Flux")
