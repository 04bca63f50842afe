"""runtime/registry.py: one runtime per denoiser, shared by every holder, hooks gone with the last one."""

from __future__ import annotations

import gc

import pytest

from lorablend.naming import components_of
from lorablend.runtime.binding import bind_adapter
from lorablend.runtime.registry import find_runtime, follow_pipeline, runtime_for, shared_with_others


def _hooks(module) -> int:
    return sum(len(m._forward_hooks) for m in module.modules())


def test_one_runtime_per_denoiser_and_settings_that_clash_are_refused(make_pipe):
    pipe, other = make_pipe("sd1"), make_pipe("sd1")
    rt = runtime_for(components_of(pipe), keep_fuse_buffers=True)
    assert runtime_for(components_of(pipe)) is rt is find_runtime(pipe.unet)
    assert runtime_for(components_of(pipe), keep_fuse_buffers=True) is rt
    assert runtime_for(components_of(other)) is not rt
    with pytest.raises(ValueError, match="already wrapped with {'keep_fuse_buffers': True}"):
        runtime_for(components_of(pipe), keep_fuse_buffers=False)
    assert shared_with_others(rt, ["unet", "text_encoder", "text_encoder_2"]) == []  # (SD1 has no second encoder)


def test_the_last_holder_gone_takes_the_hooks_with_it(make_pipe, make_adapter):
    pipe = make_pipe("sd1")
    rt = runtime_for(components_of(pipe))
    rt.add(bind_adapter(make_adapter("sd1", "a", seed=1), rt.view))
    assert _hooks(pipe.unet) > 0 and _hooks(pipe.text_encoder) > 0
    del rt
    gc.collect()
    assert find_runtime(pipe.unet) is None
    assert _hooks(pipe.unet) == 0 and _hooks(pipe.text_encoder) == 0


def test_a_replaced_denoiser_moves_the_runtime_or_joins_the_one_serving_it(make_pipe, make_adapter):
    pipe, spare = make_pipe("sd1"), make_pipe("sd1")
    rt = runtime_for(components_of(pipe))
    rt.add(bind_adapter(make_adapter("sd1", "a", seed=1), rt.view))
    old = pipe.unet
    pipe.unet = spare.unet  # nobody serves the new one: this runtime moves, the old module handed back
    moved, denoiser = follow_pipeline(rt, components_of(pipe), old)
    assert moved is rt and denoiser is spare.unet and find_runtime(spare.unet) is rt and find_runtime(old) is None
    assert _hooks(old) == 0 and rt.list_adapters() == {"text_encoder": ["a"]}
    served = runtime_for(components_of(make_pipe("sd1")))  # a denoiser that has its own runtime: joined
    pipe.unet = served.view.components["unet"]
    joined, _ = follow_pipeline(rt, components_of(pipe), spare.unet)
    assert joined is served and joined.view.components["text_encoder"] is pipe.text_encoder
