"""``lorablend serve --engine ray`` on a local Ray instance (2 CPUs, once for this module): 2 pipeline replicas
behind Ray Serve answer with the images of the one-process server, requests of one mix go to one replica
(multiplexed by the sorted mix), and what would change one replica only is refused.
"""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")

import httpx  # noqa: E402

from test_serve_support import (  # noqa: E402
    GEN, TOKEN, RunningServer, assert_same_image, decode_png, free_port, make_world,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("serve-ray"))


@pytest.fixture(scope="module")
def ray_server(world):
    from ray import serve

    from lorablend.serve import ServeConfig
    from lorablend.serve.ray_app import RayServeOptions, deploy

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        deploy(str(world.model), ServeConfig(lora_dir=world.loras, token=TOKEN), RayServeOptions(replicas=2,
               device="cpu"), port=port, blocking=False)
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


def test_the_same_api_answers_and_refuses_on_ray(ray_server):
    assert httpx.get(f"{ray_server}/health").json() == {"status": "ok"}
    assert httpx.get(f"{ray_server}/v1/loras").status_code == 401
    headers = {"Authorization": f"Bearer {TOKEN}"}
    names = {row["name"] for row in httpx.get(f"{ray_server}/v1/loras", headers=headers).json()["loras"]}
    assert names == {"ink", "paper", "moss", "clay"}
    assert _post(ray_server, {"prompt": "x", "loras": {"nope": 1}, **GEN}).status_code == 404
    refused = httpx.post(f"{ray_server}/v1/loras", json={"path": "ink.safetensors", "name": "x"}, headers=headers)
    assert refused.status_code == 501 and "--lora-dir" in refused.json()["detail"]


def test_ray_flags_without_the_ray_engine_are_a_usage_error(world, capsys):
    from lorablend.cli import main

    args = ["serve", "--model", str(world.model), "--lora-dir", str(world.loras)]
    assert main(args + ["--replicas", "2"]) == 2
    assert "--engine ray" in capsys.readouterr().err
    assert main(args + ["--engine", "ray", "--replicas", "0"]) == 2
    assert "--replicas 0" in capsys.readouterr().err
