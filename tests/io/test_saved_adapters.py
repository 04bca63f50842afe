"""io/saved_adapters.py: what save_pretrained writes beside the components (checked before anything is written)
and how a folder's adapters come back. The round trip through a pipeline: tests/test_pipeline_dropin.py."""

from __future__ import annotations

import json

import pytest
import torch

from lorablend.io.saved_adapters import FOLDER, MANIFEST, plan_saved_adapters, reload_saved_adapters, write_saved_adapters
from lorablend.naming import components_of
from lorablend.runtime.binding import bind_adapter
from lorablend.runtime.lora_runtime import LoraRuntime


@pytest.fixture
def runtime(make_pipe, make_adapter):
    rt = LoraRuntime(components_of(make_pipe("sd1")))
    for name, seed in (("a", 1), ("b", 2)):
        rt.add(bind_adapter(make_adapter("sd1", name, seed=seed), rt.view))
    return rt


def test_a_plan_holds_each_unfused_adapter_and_the_active_mix(runtime, tmp_path):
    runtime.set_adapters(["b", "a"], [0.25, {"unet": 0.5}])
    plan = plan_saved_adapters(runtime)
    assert sorted(plan["files"]) == ["0.safetensors", "1.safetensors"]
    assert json.loads(plan["manifest"]) == {"adapters": ["a", "b"], "active": [["b", 0.25], ["a", {"unet": 0.5}]],
                                            "enabled": True}
    paths = write_saved_adapters(tmp_path, plan)
    assert [p.name for p in paths] == ["0.safetensors", "1.safetensors", MANIFEST]
    assert (tmp_path / FOLDER / MANIFEST).read_text() == plan["manifest"]


def test_nothing_to_write_when_all_is_fused_and_a_folder_without_a_manifest_holds_no_adapters(runtime, tmp_path):
    runtime.set_adapters(["a", "b"], [1.0, 1.0])
    runtime.fuse()
    plan = plan_saved_adapters(runtime)
    assert plan == {"files": {}, "manifest": None} and write_saved_adapters(tmp_path, plan) == []
    assert not (tmp_path / FOLDER).exists() and reload_saved_adapters(object(), tmp_path) == []


def test_two_experts_without_flat_names_are_written_in_diffusers_layout_and_come_back(tmp_path):
    import lorablend
    from lorablend.fixtures.tiny_2026 import tiny_2026_pipeline
    from lorablend.fixtures.tiny_unets import random_adapter

    raw = tiny_2026_pipeline("wan22-a14b")  # transformer_2 has no kohya / onetrainer names
    pipe = lorablend.DiffusionPipeline(raw)
    pipe.load_lora_weights(random_adapter(raw, "a", seed=1), adapter_name="a")
    pipe.save_pretrained(tmp_path / "wan")
    again = lorablend.DiffusionPipeline.from_pretrained(str(tmp_path / "wan"))
    assert again.get_list_adapters() == pipe.get_list_adapters() and "transformer_2" in again.get_list_adapters()
    for key, layer in pipe.runtime.adapters["a"].layers.items():  # the tensors written, back bit for bit
        back = again.runtime.adapters["a"].layers[key].delta
        assert back.scale == layer.delta.scale
        assert all(torch.equal(x, y) for x, y in zip(back.tensors(), layer.delta.tensors(), strict=True))
