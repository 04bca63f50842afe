"""serve/ray_app.py: the routing id of a request (its sorted LoRA mix) and the Ray Serve settings; Ray itself runs
in tests/serve/test_serve_ray.py."""

from __future__ import annotations

import pytest

from lorablend.serve.config import ServeSettings
from lorablend.serve.ray_app import RayServeSettings, mix_id


def test_a_generation_is_routed_by_its_sorted_mix_whatever_the_spelling():
    cfg = ServeSettings(".")
    a = mix_id("/v1/images", b'{"prompt": "a cat <lora:ink:0.5>", "loras": {"paper": 1}}', cfg)
    b = mix_id("/v1/images", b'{"prompt": "a dog", "loras": {"paper": 1.0, "ink": 0.5}}', cfg)
    assert a == b == '[["ink", 0.5], ["paper", 1.0]]'
    assert mix_id("/v1/images", b'{"prompt": "a cat"}', cfg) == "[]"


def test_other_routes_and_bad_bodies_go_to_any_replica():
    cfg = ServeSettings(".")
    assert mix_id("/v1/loras", b"{}", cfg) == "" and mix_id("/v1/images", b"not json", cfg) == ""


def test_settings_are_checked_by_name():
    assert RayServeSettings(replicas=2).check().replicas == 2
    with pytest.raises(ValueError, match="replicas"):
        RayServeSettings(replicas=0).check()


def test_a_replica_compiles_its_denoiser_when_asked(tmp_path):
    """``serve --engine ray --compile``: each replica loads its pipeline with the compiled denoiser (static mode,
    mixed batches kept); the compile itself runs at the first request (tests/serve/test_batch_mixed.py)."""
    pytest.importorskip("httpx")
    from serve_support import make_world

    from lorablend.serve.ray_app import PipelineReplica

    world = make_world(tmp_path)
    replica = PipelineReplica(str(world.model), {"lora_dir": str(world.loras)}, "cpu", None, compile=True)
    try:
        state = replica.app.state.lorablend
        assert state.worker._run_batch.compiled is not None and state.worker.mixed
        assert replica.pipe.runtime.layers.static  # the denoiser's layers belong to static mode
        assert replica.app.state.lorablend.worker._run_batch.compiled.per_sample
    finally:
        replica.app.state.lorablend.close()
