"""Per-step adapters (LoRA Switch, K-LoRA's runtime mode): the schedule a UNet call sees is the one asked for,
step by step, on a live tiny SD1 pipeline; a constant schedule draws the image of set_adapters."""

from __future__ import annotations

import numpy as np
import pytest

from lorablend import DiffusionPipeline
from lorablend.evaluate.steps import StepAdapters, klora_schedule, lora_switch_schedule
from lorablend.merge.klora import klora_plan

from conftest import assert_same_computed

STEPS = 4


def _pipe(make_pipe, make_adapter):
    pipe = DiffusionPipeline(make_pipe("sd1"))
    pipe.load_lora_weights(make_adapter("sd1", "a", seed=1, targets="attn"), adapter_name="a")
    pipe.load_lora_weights(make_adapter("sd1", "b", seed=2, targets="attn"), adapter_name="b")
    return pipe


def _draw(pipe, **kw):
    return pipe("x", generator=np.random.Generator(np.random.PCG64(0)), num_inference_steps=STEPS,
                guidance_scale=1.0, height=32, width=32, output_type="np", **kw).images[0]


def _record_active(pipe) -> list:
    seen: list = []
    pipe.denoiser.register_forward_pre_hook(lambda *_: seen.append(tuple(pipe.get_active_adapters())))
    return seen


def test_lora_switch_alternates_and_refuses_an_empty_schedule():
    assert lora_switch_schedule(["a", "b"], steps=4, every=1) == [(["a"], [1.0]), (["b"], [1.0])] * 2
    with pytest.raises(ValueError, match="every >= 1"):
        lora_switch_schedule(["a", "b"], steps=4, every=0)


def test_each_unet_call_sees_its_steps_adapters(make_pipe, make_adapter):
    pipe = _pipe(make_pipe, make_adapter)
    seen = _record_active(pipe)
    switch = StepAdapters(pipe, lora_switch_schedule(["a", "b"], STEPS)).start()
    _draw(pipe, callback_on_step_end=switch)
    assert seen == [("a",), ("b",), ("a",), ("b",)]


def test_a_constant_schedule_draws_the_set_adapters_image(make_pipe, make_adapter):
    pipe = _pipe(make_pipe, make_adapter)
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.8])
    expected = _draw(pipe)
    pipe.set_adapters("a")
    steady = StepAdapters(pipe, [(["a", "b"], [0.7, 0.8])] * STEPS).start()
    assert_same_computed(_draw(pipe, callback_on_step_end=steady), expected)
    switched = StepAdapters(pipe, lora_switch_schedule(["a", "b"], STEPS)).start()
    assert np.abs(_draw(pipe, callback_on_step_end=switched) - expected).max() > 1e-3


def test_klora_schedule_loads_one_adapter_per_distinct_selection(make_pipe, make_adapter):
    pipe = _pipe(make_pipe, make_adapter)
    plan = klora_plan(make_adapter("sd1", "c", seed=3, targets="attn"), make_adapter("sd1", "s", seed=4, targets="attn"))
    schedule = klora_schedule(pipe, plan, STEPS, prefix="k")
    names = [n[0] for n, _ in schedule]
    distinct = {tuple(sorted(plan.choose(i / (STEPS - 1)).items())) for i in range(STEPS)}
    assert len(set(names)) == len(distinct)
    assert set(names) <= set(pipe.get_list_adapters()["unet"])
    seen = _record_active(pipe)
    _draw(pipe, callback_on_step_end=StepAdapters(pipe, schedule).start())
    assert [s[0] for s in seen] == names
