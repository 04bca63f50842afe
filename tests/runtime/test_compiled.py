"""Static mode (``compile_denoiser``): the UNet under torch.compile with no graph break, no recompile across
switches of adapters / weights / number / enable / call scale / fuse, and the eager runtime's outputs.

Dynamo runs with ``backend="eager"`` (through a counting backend): the same tracing, guards and graph breaks as
inductor, without the C++ compile. Each compile of the tiny SDXL UNet costs a few seconds: the tests share few.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from lorablend import DiffusionPipeline
from lorablend.adapter import Adapter, DoRADelta, FullDelta, LoHaDelta, LowRankDelta
from lorablend.runtime.compiled import CapacityError

from conftest import GEN_KW, assert_same_computed


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    counters.clear()
    yield
    dynamo.reset()


def _pair(make_pipe, make_adapter, family, adapters):
    """(static-mode pipeline, eager reference) with the same adapters loaded."""
    pipes = DiffusionPipeline(make_pipe(family)), DiffusionPipeline(make_pipe(family))
    for a in adapters:
        for p in pipes:
            p.load_lora_weights(a)
    return pipes


def _image(pipe, scale=1.0):
    return pipe(**GEN_KW, generator=np.random.Generator(np.random.PCG64(0)),
                cross_attention_kwargs={"scale": scale} if scale != 1.0 else None).images[0]


def _adapters(make_adapter, family, n):
    """``n`` LoRAs of ranks 1-6 over three target sets (every layer, attention only, UNet + text encoders)."""
    out = []
    for i in range(n):
        comps = ["unet", "text_encoder"] if i % 3 == 2 else ["unet"]
        out.append(make_adapter(family, f"lora{i}", rank=1 + i % 6, seed=i, alpha=float(1 + i % 4),
                                targets="attn" if i % 3 == 1 else "all", components=comps))
    return out


def test_sdxl_twenty_adapters_one_graph_no_break_no_recompile(make_pipe, make_adapter):
    adapters = _adapters(make_adapter, "sdxl", 21)
    pipe, ref = _pair(make_pipe, make_adapter, "sdxl", adapters[:20])
    for p in (pipe, ref):
        p.set_adapters(["lora0", "lora1"], [0.7, -0.4])
    backend = CompileCounterWithBackend("eager")
    static = pipe.compile_denoiser(max_rank=18, backend=backend, fullgraph=False)  # a break would be counted
    assert_same_computed(_image(pipe), _image(ref))  # warm-up: the one compile
    assert backend.frame_count == 1 and not counters["graph_break"], dict(counters["graph_break"])

    rng = random.Random(0)
    steps = []
    for i in range(10):  # random mixes of 1-3 (ranks up to 15 of the 18); 22 took 12 more image pairs, no new path
        names = rng.sample([a.name for a in adapters[:20] if a.name != "lora3"], rng.randint(1, 3))
        steps.append(lambda p, n=names, w=[rng.uniform(-1.0, 1.5) for _ in names]: p.set_adapters(n, w))
    steps[3:3] = [lambda p: p.disable_lora(), lambda p: p.enable_lora()]
    steps[8:8] = [lambda p: p.set_adapters(["lora2", "lora5"], [0.5, 0.5]),
                  lambda p: p.set_adapters(["lora2", "lora5"], [1.5, -0.25])]  # weights only
    steps[12:12] = [lambda p: p.delete_adapters("lora3"), lambda p: p.load_lora_weights(adapters[20]),
                    lambda p: p.set_adapters(["lora20", "lora4"], [0.9, 0.3])]
    steps += [lambda p: p.fuse_lora(adapter_names=["lora20"]),
              lambda p: p.set_adapters(["lora20", "lora7"], [0.9, 0.6]), lambda p: p.unfuse_lora()]
    with dynamo.config.patch(error_on_recompile=True):
        for i, step in enumerate(steps):
            for p in (pipe, ref):
                step(p)
            scale = (1.0, 0.5, 0.0)[i % 3] if not pipe.fused_loras else 1.0
            assert_same_computed(_image(pipe, scale), _image(ref, scale), f"after switch {i}")
    assert backend.frame_count == 1 and not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1
    for p in (pipe, ref):  # ranks 6 + 5 + 4 + 3 = 18: fits; one more is over capacity
        p.set_adapters(["lora5", "lora4", "lora9", "lora8"], [0.3, 0.3, 0.3, 0.3])
    assert_same_computed(_image(pipe), _image(ref))
    assert backend.frame_count == 1 and static.capacity == 18
    for p in (pipe, ref):
        p.set_adapters(["lora5", "lora4", "lora9", "lora8", "lora1"], [0.3, 0.3, 0.3, 0.3, 0.3])
    assert_same_computed(_image(pipe), _image(ref))
    assert static.capacity == 36 and backend.frame_count == 2  # grown: ONE recompile


def test_sd1_static_mode_matches_eager_and_close_gives_the_hooks_back(make_pipe, make_adapter):
    adapters = _adapters(make_adapter, "sd1", 4)
    pipe, ref = _pair(make_pipe, make_adapter, "sd1", adapters)
    keys = set(pipe.unet.state_dict())
    backend = CompileCounterWithBackend("eager")
    static = pipe.compile_denoiser(max_rank=16, backend=backend)
    mixes = [(["lora0", "lora3"], [0.6, 0.9]), (["lora1"], [1.2]), (["lora2", "lora0", "lora1"], [1.0, -1.0, 0.5])]
    for names, weights in mixes:
        for p in (pipe, ref):
            p.set_adapters(names, weights)
        assert_same_computed(_image(pipe, 0.7), _image(ref, 0.7))
    assert backend.frame_count == 1 and not counters["graph_break"]
    assert set(pipe.unet.state_dict()) == keys  # the buffers are not the model's
    static.close()
    assert "forward" not in pipe.unet.__dict__
    to_q = pipe.model_view.module("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    assert len(to_q._forward_hooks) == 1  # the eager hook is back
    assert_same_computed(_image(pipe), _image(ref))
    assert backend.frame_count == 1


def test_a_mix_over_capacity_grows_or_raises(make_pipe, make_adapter):
    adapters = [make_adapter("sd1", f"r{i}", rank=4, seed=i, targets="attn") for i in range(3)]
    pipe, ref = _pair(make_pipe, make_adapter, "sd1", adapters)
    static = pipe.compile_denoiser(max_rank=4, grow=False, backend=None)
    for p in (pipe, ref):
        p.set_adapters(["r0", "r1"], [1.0, 1.0])
    with pytest.raises(CapacityError, match=r"needs rank 8 .* compile_denoiser\(max_rank=8\)"):
        static.sync()
    static.close()

    static = pipe.compile_denoiser(max_rank=4, backend=None)
    assert static.capacity == 8  # max(need, 2 × capacity)
    for names in (["r0"], ["r0", "r1", "r2"], ["r1", "r2"], ["r2"]):
        for p in (pipe, ref):
            p.set_adapters(names, [0.8] * len(names))
        assert_same_computed(_image(pipe), _image(ref))
    assert static.capacity == 16


def test_dense_layers_take_every_kind_and_pair_layers_refuse_what_has_no_factors(make_pipe):
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    g = torch.Generator().manual_seed(0)
    lora = LowRankDelta(down=torch.randn(2, 64, generator=g), up=torch.randn(64, 2, generator=g) * 0.1)
    full = FullDelta(diff=torch.randn(64, 64, generator=g) * 0.01)
    dora = DoRADelta(LowRankDelta(torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g) * 0.1),
                     magnitude=torch.rand(64, generator=g) + 0.5)
    loha = LoHaDelta(*(torch.randn(s, generator=g) * 0.3 for s in [(64, 2), (2, 64), (64, 2), (2, 64)]), alpha=1.0)
    kinds = (("lora", lora), ("full", full), ("dora", dora), ("loha", loha))
    adapters = [Adapter(n, "sd1", {key: d}) for n, d in kinds]

    pipe, ref = _pair(make_pipe, None, "sd1", adapters)
    static = pipe.compile_denoiser(max_rank=32, backend=None)  # 32·(64+64) ≥ 64·64: a dense ΔW buffer
    for p in (pipe, ref):
        p.set_adapters(["lora", "full", "dora"], [0.5, 1.0, -0.7])
    assert_same_computed(_image(pipe), _image(ref))
    static.close()

    # (the first of the mix by name is named: contributors are taken in name order)
    with pytest.raises(ValueError, match=r"adapter 'dora' .*fuse_lora\(adapter_names=\['dora'\]\)"):
        pipe.compile_denoiser(max_rank=8, backend=None)  # a rank-8 pair: no room for a full diff
    assert not pipe.runtime.layers.static and "forward" not in pipe.unet.__dict__  # nothing changed
    for p in (pipe, ref):
        p.fuse_lora(adapter_names=["full", "dora"])
        p.set_adapters(["lora", "loha"], [0.5, 0.8])  # LoHa through its exact rank-4 factors
    static = pipe.compile_denoiser(max_rank=8, backend=None)
    assert_same_computed(_image(pipe), _image(ref))
    assert static.layers[key].used == 2 + 4


def test_a_dtype_change_remakes_the_buffers(make_pipe, make_adapter):
    pipe, ref = _pair(make_pipe, make_adapter, "sd1", _adapters(make_adapter, "sd1", 2))
    static = pipe.compile_denoiser(max_rank=8, backend=None)
    for p in (pipe, ref):
        p.set_adapters(["lora0", "lora1"], [0.5, 0.5])
        p.to(dtype=torch.float64)
    assert_same_computed(_image(pipe), _image(ref))
    assert static.shared.svecs.dtype == torch.float64


def _batch(pipe, prompts, rows=None, **kw):
    """One call for ``prompts`` (seed i for image i), each image with its own weights when ``rows`` is given."""
    generators = [np.random.Generator(np.random.PCG64(i)) for i in range(len(prompts))]
    call = dict(GEN_KW, prompt=prompts, generator=generators, **kw)
    if rows is None:
        return pipe(**call).images
    with pipe.runtime.call_sample_weights(rows):
        return pipe(**call).images


def test_mixed_batches_and_schedules_run_compiled_with_no_recompile(make_pipe, make_adapter):
    """Per-sample weights (a batch of different mixes) and per-step weights (``lora_schedule``) are data in the
    compiled denoiser: the eager runtime's images, and no new graph when the mixes or the steps' weights change."""
    adapters = [make_adapter("sd1", n, rank=2 + i, seed=i) for i, n in enumerate("abc")]
    pipe, ref = _pair(make_pipe, make_adapter, "sd1", adapters)
    for p in (pipe, ref):
        p.set_adapters(["a", "b", "c"], [1.0, 1.0, 1.0])
    backend = CompileCounterWithBackend("eager")
    static = pipe.compile_denoiser(max_rank=12, backend=backend, per_sample=True)
    assert static.pair_layers == len(static.layers)  # per-sample weights need a pair on every layer
    prompts = [f"prompt {i}" for i in range(4)]
    mixes = [[{"a": 0.7}, {"b": -0.5, "c": 1.2}, {}, {"a": 0.3, "b": 0.9, "c": 0.4}],
             [{"c": 1.5}, {"a": -1.0}, {"a": 0.2, "b": 0.2}, {"b": 1.1}]]
    ramp = {"a": [[0.0, 1.5], [0.5, -1.0]], "b": "0.2@0,1.0@1"}
    # warm-up: one graph per batch size (4 images per-sample; 1 image with one mix)
    assert_same_computed(_batch(pipe, prompts, mixes[0]), _batch(ref, prompts, mixes[0]))
    assert_same_computed(_image(pipe), _image(ref))
    graphs = backend.frame_count
    with dynamo.config.patch(error_on_recompile=True):
        for rows in mixes[1:] + [[{"a": 0.1}] * 4]:
            assert_same_computed(_batch(pipe, prompts, rows), _batch(ref, prompts, rows), str(rows))
        for steps in (2, 3):
            kw = dict(num_inference_steps=steps, lora_schedule=ramp)
            scheduled = _batch(pipe, prompts[:1], **kw)
            assert_same_computed(scheduled, _batch(ref, prompts[:1], **kw), f"{steps} steps")
            assert float(np.abs(scheduled - _batch(ref, prompts[:1], num_inference_steps=steps)).max()) > 1e-3
    assert backend.frame_count == graphs and not counters["graph_break"]


def test_the_first_per_sample_call_makes_every_layer_a_pair(make_pipe, make_adapter):
    pipe, ref = _pair(make_pipe, make_adapter, "sd1", [make_adapter("sd1", "a", rank=8, seed=0)])
    static = pipe.compile_denoiser(max_rank=64, backend=None)  # 64·(32+32) ≥ 32·32: dense ΔW buffers
    assert static.pair_layers < len(static.layers)
    rows = [{"a": 0.5}, {"a": -1.0}]
    assert_same_computed(_batch(pipe, ["x", "y"], rows), _batch(ref, ["x", "y"], rows))
    assert static.per_sample and static.pair_layers == len(static.layers)
