"""``lorablend serve --engine ray`` on a local Ray instance (2 CPUs, once for this module): 2 pipeline replicas
behind Ray Serve answer with the images of the one-process server, requests of one mix go to one replica
(multiplexed by the sorted mix), what would change one replica only is refused, and an upload to the shared
--upload-dir is served by every replica.
"""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")

import httpx  # noqa: E402

from serve_support import (  # noqa: E402
    GEN, TOKEN, RunningServer, assert_same_image, decode_png, free_port, make_world,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("serve-ray"))


@pytest.fixture(scope="module")
def ray_server(world):
    from ray import serve

    from lorablend.serve import ServeSettings
    from lorablend.serve.ray_app import RayServeSettings, deploy

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        deploy(str(world.model), ServeSettings(lora_dir=world.loras, token=TOKEN, upload_dir=world.root / "uploads"),
               RayServeSettings(replicas=2, device="cpu"), port=port, blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def local_server(world):
    running = RunningServer(world)
    yield running
    running.stop()


def _post(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/images", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300)


def test_two_ray_replicas_give_the_images_of_the_local_server(ray_server, local_server):
    mixes = [{"ink": 0.8}, {"paper": 1.2, "moss": -0.5}, {}, {"ink": 0.8}, {"moss": -0.5, "paper": 1.2}]
    replicas: dict[str, set[str]] = {}
    for i, mix in enumerate(mixes):
        body = {"prompt": "a bowl of ramen", "loras": mix, "seed": 40 + i % 3, **GEN}
        got, want = _post(ray_server, body), _post(local_server.url, body)
        assert got.status_code == 200 and got.headers["content-type"] == "image/png", got.text
        assert_same_image(decode_png(got.content), decode_png(want.content), f"mix {mix}")
        replicas.setdefault(str(sorted(mix.items())), set()).add(got.headers["x-lorablend-replica"])
    # one after another, the requests of one mix reach the replica that holds it
    assert all(len(seen) == 1 for seen in replicas.values()), replicas


def _images_answered(url: str) -> float:
    """``/metrics``' count of 200 answers on /v1/images (the router sums the replicas)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return sum(s.value for s in families["lorablend_requests"].samples if s.name == "lorablend_requests_total"
               and s.labels.get("route") == "/v1/images" and s.labels.get("status") == "200")


def test_metrics_sum_every_replica(ray_server):
    pytest.importorskip("prometheus_client")
    before, sent, replicas = _images_answered(ray_server), 0, set()
    while len(replicas) < 2 and sent < 12:  # new mixes until both replicas have answered some
        r = _post(ray_server, {"prompt": "x", "loras": {"ink": round(0.1 + 0.05 * sent, 2)}, "seed": 1, **GEN})
        assert r.status_code == 200, r.text
        sent += 1
        replicas.add(r.headers["x-lorablend-replica"])
    assert len(replicas) == 2, "the router sent every mix to one replica"
    assert _images_answered(ray_server) - before == sent  # one replica's metrics would miss the other's


def test_the_same_api_answers_and_refuses_on_ray(ray_server):
    assert httpx.get(f"{ray_server}/health").json() == {"status": "ok"}
    assert httpx.get(f"{ray_server}/v1/loras").status_code == 401
    headers = {"Authorization": f"Bearer {TOKEN}"}
    names = {row["name"] for row in httpx.get(f"{ray_server}/v1/loras", headers=headers).json()["loras"]}
    assert names == {"ink", "paper", "moss", "clay"}
    assert _post(ray_server, {"prompt": "x", "loras": {"nope": 1}, **GEN}).status_code == 404
    refused = httpx.post(f"{ray_server}/v1/loras", json={"path": "ink.safetensors", "name": "x"}, headers=headers)
    assert refused.status_code == 501 and "--lora-dir" in refused.json()["detail"]


def test_an_upload_to_a_shared_upload_dir_reaches_every_replica(ray_server, world):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    up = httpx.post(f"{ray_server}/v1/loras", files={"file": ("shared.safetensors", world.files["moss"].read_bytes())},
                    headers=headers, timeout=300)
    assert up.status_code == 201, up.text
    for seed in range(2):  # the replica the mix is routed to serves the upload by name
        r = _post(ray_server, {"prompt": "x", "loras": {"shared": 0.5}, "seed": seed, **GEN})
        assert r.status_code == 200, r.text
    for _ in range(4):  # listed by every replica (listings go to any of them)
        listed = httpx.get(f"{ray_server}/v1/loras", headers=headers, timeout=60).json()["loras"]
        assert "shared" in {row["name"] for row in listed}
    assert httpx.delete(f"{ray_server}/v1/loras/shared", headers=headers, timeout=60).status_code == 200
    assert _post(ray_server, {"prompt": "x", "loras": {"shared": 0.5}, "seed": 9, **GEN}).status_code == 404


def test_ray_flags_without_the_ray_engine_are_a_usage_error(world, capsys):
    from lorablend.cli import main

    args = ["serve", "--model", str(world.model), "--lora-dir", str(world.loras)]
    assert main(args + ["--replicas", "2"]) == 2
    assert "--engine ray" in capsys.readouterr().err
    assert main(args + ["--engine", "ray", "--replicas", "0"]) == 2
    assert "--replicas 0" in capsys.readouterr().err


def test_a_killed_replica_is_replaced_and_no_request_gets_a_wrong_image(ray_server, local_server):
    """Last in this module: it kills a replica. Requests in flight on it may fail, with a 503 that says to send
    them again; every image that is answered is the right one; Ray Serve starts a new replica."""
    import os
    import signal
    import threading

    from serve_support import wait_until

    first = _post(ray_server, {"prompt": "a fox", "loras": {"clay": 0.5}, "seed": 1, **GEN})
    victim = int(first.headers["x-lorablend-replica"])
    bodies = [{"prompt": "a fox", "loras": mix, "seed": seed, **GEN}
              for seed in range(3) for mix in ({"clay": 0.5}, {"ink": 0.3}, {})]
    answers: list = [None] * len(bodies)
    started = threading.Event()

    def send(i: int) -> None:
        started.set()
        answers[i] = _post(ray_server, bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    started.wait()
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join()
    for body, got in zip(bodies, answers):
        assert got.status_code in (200, 503), got.text
        if got.status_code == 503:
            assert "send the request again" in got.json()["detail"]
        else:
            want = _post(local_server.url, body)
            assert_same_image(decode_png(got.content), decode_png(want.content), f"mix {body['loras']}")
    # Ray Serve starts a new replica: two live replicas answer again, neither of them the killed one (fresh mixes,
    # so the router spreads them over both)
    seen: set[int] = set()
    weights = iter(range(1, 10_000))

    def answered_by_two_live_replicas() -> bool:
        body = {"prompt": "a fox", "loras": {"ink": next(weights) / 1000}, "seed": 2, **GEN}
        r = _post(ray_server, body)
        if r.status_code == 200:
            seen.add(int(r.headers["x-lorablend-replica"]))
        return len(seen - {victim}) == 2

    wait_until(answered_by_two_live_replicas, "two live replicas after the kill")
    assert victim not in seen

