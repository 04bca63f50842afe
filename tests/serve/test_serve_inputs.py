"""Bad input gets a clear answer and nothing leaks: wrong types, NaN / inf / absurd weights, missing prompt, too
many images, sizes off the grid (422); unknown LoRAs (404, naming close matches); paths out of ``--lora-dir``
(403); bodies over the limit (413); hostile files (422 with the reader's message); and after each, the server
still answers. Also: uploads and registrations, a client that leaves frees its place, and eviction from a cache
too small for two LoRAs is invisible except in latency.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_support import (  # noqa: E402
    GEN, TOKEN, RunningServer, assert_same_image, decode_png, library, server, wait_until, world,
)

__all__ = ["library", "server", "world"]  # fixtures, imported for pytest to find

BAD_IMAGES = [  # (raw JSON body, what is wrong) -> 422
    ('{"prompt": 5}', "prompt of the wrong type"),
    ('{"prompt": "x", "seed": "7"}', "a seed as text"),
    ('{"prompt": "x", "steps": 2.5}', "fractional steps"),
    ('{"prompt": "x", "loras": {"ink": "high"}}', "a weight as text"),
    ('{"prompt": "x", "loras": ["ink"]}', "loras as a list"),
    ('{"prompt": "x", "loras": {"ink": NaN}}', "a NaN weight"),
    ('{"prompt": "x", "loras": {"ink": Infinity}}', "an infinite weight"),
    ('{"prompt": "x", "loras": {"ink": 1e30}}', "an absurd weight"),
    ('{"prompt": "x", "scale": -1e9}', "an absurd scale"),
    ('{"prompt": "x <lora:ink:1e30>"}', "an absurd weight in a prompt token"),
    ('{"prompt": "x <lora:ink:abc>"}', "a prompt token without a number"),
    ('{"prompt": "x", "guidance_scale": NaN}', "a NaN guidance scale"),
    ('{}', "no prompt"),
    ('{"prompt": "x", "num_images": 99}', "too many images"),
    ('{"prompt": "x", "width": 30}', "a width off the grid of 8"),
    ('{"prompt": "x", "height": 0}', "a zero height"),
    ('{"prompt": "x", "width": 4096}', "a width over the limit"),
    ('{"prompt": "x", "steps": 0}', "zero steps"),
    ('{"prompt": "x", "steps": 100000}', "too many steps"),
    ('{"prompt": "x", "seed": -1}', "a negative seed"),
    ('{"prompt": "x", "colour": "red"}', "an unknown field"),
    ('{"prompt": "x", "num_images": 2, "response_format": "png"}', "two images as one PNG"),
    ('{{{', "not JSON"),
]
BAD_COMPAT = [  # (route, body) -> 422
    ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 99}),
    ("/sdapi/v1/txt2img", {"prompt": "x", "width": 33}),
    ("/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": "high"}),
    ("/sdapi/v1/txt2img", {"negative_prompt": "x"}),
    ("/v1/images/generations", {"prompt": "x", "size": "100x100"}),
    ("/v1/images/generations", {"prompt": "x", "size": "big"}),
    ("/v1/images/generations", {"prompt": "x", "response_format": "url"}),
    ("/v1/images/generations", {"prompt": "x", "n": 99}),
    ("/v1/images/generations", {"n": 1}),
]


def _still_serving(server) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    with server.client() as client:
        r = client.post("/v1/images", json={"prompt": "still here", "loras": {"ink": 0.5}, "seed": 1, **GEN})
    assert r.status_code == 200


@pytest.mark.parametrize("body, what", BAD_IMAGES, ids=[w for _, w in BAD_IMAGES])
def test_bad_image_requests_are_422(server, body, what):
    with server.client() as client:
        r = client.post("/v1/images", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, (what, r.status_code, r.text)
        assert isinstance(r.json()["detail"], list) and r.json()["detail"][0]["msg"], r.text
        assert client.get("/health").status_code == 200


@pytest.mark.parametrize("route, body", BAD_COMPAT, ids=[f"{r.split('/')[-1]}-{json.dumps(b)}" for r, b in BAD_COMPAT])
def test_bad_a1111_and_openai_requests_are_422(server, route, body):
    with server.client() as client:
        r = client.post(route, json=body)
    assert r.status_code == 422, r.text


def test_unknown_loras_are_404_naming_close_matches(server):
    with server.client() as client:
        r = client.post("/v1/images", json={"prompt": "x", "loras": {"inkk": 1.0}, "seed": 1, **GEN})
        assert r.status_code == 404 and "did you mean 'ink'" in r.json()["detail"], r.text
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "x <lora:papr:1>", "steps": 2, "width": 32, "height": 32})
        assert r.status_code == 404 and "'paper'" in r.json()["detail"], r.text
        assert client.delete("/v1/loras/nothing-here").status_code == 404
    _still_serving(server)


def test_bodies_over_the_limit_are_413(server, world):
    with server.client() as client:
        r = client.post("/v1/images", json={"prompt": "x" * (2 * 2**20)})
        assert r.status_code == 413, r.text
        big = os.urandom(2_000_000)  # over the test server's 1.5 MB upload limit
        r = client.post("/v1/loras", files={"file": ("big.safetensors", big)}, data={"name": "big"})
        assert r.status_code == 413, r.text

        def chunks():  # no Content-Length: the limit must cut the stream itself
            yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c.safetensors\"\r\n\r\n"
            for _ in range(40):
                yield os.urandom(64_000)
        r = client.post("/v1/loras", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
        assert r.status_code == 413, r.text
        assert "big" not in [row["name"] for row in client.get("/v1/loras").json()["loras"]]
    _still_serving(server)


def test_paths_outside_the_lora_folder_are_403(server, world):
    escape = world.outside / "evil.safetensors"
    escape.write_bytes(world.files["ink"].read_bytes())
    (world.loras / "sub").mkdir(exist_ok=True)
    link = world.loras / "sub" / "evil.safetensors"
    link.symlink_to(escape)
    try:
        with server.client() as client:
            for path in ("../outside/evil.safetensors", str(escape), "sub/evil.safetensors", "sub/../../outside/x"):
                r = client.post("/v1/loras", json={"path": path, "name": "evil"})
                assert r.status_code == 403, (path, r.text)
            assert "evil" not in [row["name"] for row in client.get("/v1/loras").json()["loras"]]
            r = client.post("/v1/images", json={"prompt": "x", "loras": {"evil": 1.0}, "seed": 1, **GEN})
            assert r.status_code == 404
            assert client.post("/v1/loras", json={"path": "missing.safetensors"}).status_code == 404
    finally:
        link.unlink()
    _still_serving(server)


def test_register_upload_use_and_delete(server, world, library):
    expected = library.image("x", {"ink": 0.7}, 8)[0]
    with server.client() as client:
        r = client.post("/v1/loras", json={"path": "ink.safetensors", "name": "ink again"})
        assert r.status_code == 201, r.text
        assert r.json()["report"]["complete"] and r.json()["report"]["counts"]["mapped"] > 0
        up = client.post("/v1/loras", files={"file": ("mine.safetensors", world.files["ink"].read_bytes())},
                         data={"name": "ink_upload"})
        assert up.status_code == 201 and up.json()["format"] == "kohya", up.text
        for name in ("ink again", "ink_upload"):
            r = client.post("/v1/images", json={"prompt": "x", "loras": {name: 0.7}, "seed": 8, **GEN})
            assert_same_image(decode_png(r.content), expected, name)
        origins = {row["name"]: row["origin"] for row in client.get("/v1/loras").json()["loras"]}
        assert origins["ink again"] == "registered" and origins["ink_upload"] == "upload"
        assert client.post("/v1/loras", json={"path": "paper.safetensors", "name": "ink"}).status_code == 409
        assert client.post("/v1/loras", json={"path": "paper.safetensors", "name": "a:b"}).status_code == 422
        assert client.delete("/v1/loras/ink").status_code == 409  # a file of the folder: remove the file
        for name in ("ink again", "ink_upload"):
            assert client.delete(f"/v1/loras/{name}").status_code == 200
            r = client.post("/v1/images", json={"prompt": "x", "loras": {name: 0.7}, "seed": 8, **GEN})
            assert r.status_code == 404
        assert name not in server.state.cache.names_loaded()


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile_files(world) -> dict[str, bytes]:
    good = world.files["paper"].read_bytes()
    (length,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + length])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"] = [0, 10**12]  # a tensor the data section cannot hold
    lying = json.dumps(header).encode()
    marker = str(world.root / "PAYLOAD_RAN")
    return {
        "truncated": good[: len(good) // 2],
        "lying_header": struct.pack("<Q", len(lying)) + lying + good[8 + length:],
        "header_length_lie": struct.pack("<Q", 2**40) + good[8:],
        "pickle_payload": pickle.dumps({"lora_unet_x.lora_down.weight": _Payload(marker)}, protocol=2),
        "pickle_plain": pickle.dumps({"lora_unet_x.lora_down.weight": _Payload(marker)}, protocol=4),
    }


def test_hostile_files_are_422_with_the_readers_message(server, world):
    with server.client() as client:
        for kind, data in _hostile_files(world).items():
            suffix = ".bin" if kind.startswith("pickle") else ".safetensors"
            path = world.loras / f"hostile_{kind}{suffix}"
            path.write_bytes(data)
            try:
                r = client.post("/v1/images", json={"prompt": "x", "loras": {path.stem: 1.0}, "seed": 1, **GEN})
                assert r.status_code == 422 and path.name in r.json()["detail"], (kind, r.text)
                up = client.post("/v1/loras", files={"file": (path.name, data)}, data={"name": f"up_{kind}"})
                assert up.status_code == 422 and up.json()["detail"], (kind, up.text)
                if kind.startswith("pickle"):  # (a protocol-4 pickle.dump once read "corrupt or truncated")
                    assert "holds Python objects" in up.json()["detail"], (kind, up.text)
                listed = {row["name"]: row for row in client.get("/v1/loras").json()["loras"]}
                assert f"up_{kind}" not in listed and path.stem in listed
            finally:
                path.unlink()
        assert not (world.root / "PAYLOAD_RAN").exists()
        assert not list(server.state.upload_dir.iterdir())  # refused uploads leave nothing behind
    _still_serving(server)


def _raw_request(port: int, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_a_client_that_leaves_frees_its_place(server):
    engine, metrics = server.state.worker, server.state.metrics
    before = metrics.value("lorablend_requests_dropped_total")
    answer = {}

    def first() -> None:
        with server.client() as client:
            answer["r"] = client.post("/v1/images", json={"prompt": "a", "seed": 1, **GEN})

    with engine.lock:  # the worker takes the first request and waits for the pipeline
        thread = threading.Thread(target=first)
        thread.start()
        wait_until(lambda: engine.running, "the worker to take the first request")
        sock = _raw_request(server.port, {"prompt": "b", "seed": 2, **GEN})  # a second request, queued behind
        wait_until(lambda: engine._queue, "the second request queued")
        sock.close()  # its client goes away
        wait_until(lambda: metrics.value("lorablend_requests_dropped_total") > before, "the request dropped")
        assert not engine._queue
    thread.join()
    assert answer["r"].status_code == 200
    assert metrics.value("lorablend_requests_dropped_total") == before + 1


def test_eviction_is_invisible_except_in_latency(world, library):
    one_lora = world.files["ink"].stat().st_size  # the cache holds about one LoRA at a time
    small = RunningServer(world, cache_bytes=int(one_lora * 1.2), max_batch=2)
    try:
        with small.client() as client:
            for mix, seed in [({"ink": 0.5}, 1), ({"paper": 0.8}, 2), ({"ink": 0.5, "moss": -0.5}, 3),
                              ({"ink": 0.5}, 1), ({"clay": 1.0}, 4)]:
                r = client.post("/v1/images", json={"prompt": "e", "loras": mix, "seed": seed, **GEN})
                assert r.status_code == 200, r.text
                assert_same_image(decode_png(r.content), library.image("e", mix, seed)[0], f"evicting: {mix}")
        assert small.state.metrics.value("lorablend_adapter_cache_evictions_total") >= 3
        assert small.state.cache.names_loaded() == ["clay"]
    finally:
        small.stop()


def test_clients_asking_for_one_new_lora_at_once_parse_it_once(server, world):
    twin = world.loras / "twin.safetensors"
    twin.write_bytes(world.files["moss"].read_bytes())
    state, metrics = server.state, server.state.metrics
    before = metrics.value("lorablend_adapter_cache_misses_total")
    try:
        source = state.catalog.lookup("twin")
        with ThreadPoolExecutor(4) as pool:
            entries = list(pool.map(lambda _: state.cache.get(source), range(4)))
        assert all(e is entries[0] for e in entries)
        assert metrics.value("lorablend_adapter_cache_misses_total") == before + 1
    finally:
        twin.unlink()
