"""Per-sample weights (runtime/sample_weights.py): on a Linear, a 1×1 and a 3×3 conv carrying four adapters, each
image of a mixed batch equals its own forward alone, the doubled (CFG) batch too; a schedule's new weights are read
at the next forward; a forward whose rows do not tile the samples is refused; a tiny SD1.5 batch of one adapter per
image equals each image alone."""

from __future__ import annotations

import contextvars

import pytest
import torch

from lorablend.kinds import LowRankDelta
from lorablend.runtime.layer_state import LayerTable
from lorablend.runtime.sample_weights import SampleWeights

NAMES = ("a", "b", "c", "d")
TOL = dict(rtol=1e-5, atol=1e-5)


def _table(module: torch.nn.Module, rank: int = 6):
    """One layer carrying four rank-``rank`` adapters, all contributing at weight 0.5–0.8."""
    torch.manual_seed(0)
    table = LayerTable(contextvars.ContextVar("scale", default=1.0))
    layer = table.add("unet.x", "unet", module)
    w = module.weight
    for i, name in enumerate(NAMES):
        if isinstance(module, torch.nn.Conv2d):
            down = torch.randn(rank, w.shape[1], *w.shape[2:]) * 0.3
            up = torch.randn(w.shape[0], rank, 1, 1) * 0.3
        else:
            down, up = torch.randn(rank, w.shape[1]) * 0.3, torch.randn(w.shape[0], rank) * 0.3
        layer.loaded[name] = LowRankDelta(down=down, up=up)
        table.weights[name] = {layer.key: 0.5 + 0.1 * i}
    table.low_rank_only = True
    return table, layer


def _contribute(table, layer, names) -> None:
    layer.set_contributors([(n, layer.loaded[n]) for n in names])
    table.version += 1


def _alone(table, layer, x, row: dict) -> torch.Tensor:
    """The layer's output for one image with only its own adapters, at its own weights (no per-sample weights)."""
    names = [n for n in NAMES if row.get(n)]
    saved = {n: dict(table.weights[n]) for n in names}
    for n in names:
        table.weights[n][layer.key] *= row[n]
    _contribute(table, layer, names)
    with torch.no_grad():
        out = layer.module(x)
    for n in names:
        table.weights[n] = saved[n]
    return out


MODULES = {
    "linear": (lambda: torch.nn.Linear(40, 48), (5, 40)),
    "pointwise": (lambda: torch.nn.Conv2d(40, 48, 1), (40, 4, 4)),
    "conv3x3": (lambda: torch.nn.Conv2d(40, 48, 3, padding=1), (40, 4, 4)),
}


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_each_image_of_a_mixed_batch_equals_its_forward_alone(kind):
    make, shape = MODULES[kind]
    table, layer = _table(make())
    rows = [{"a": 1.0}, {"b": -0.7}, {}, {"c": 0.4, "d": 1.3}]  # own ranks 6, 6, 0, 12 of the union's 24
    torch.manual_seed(1)
    x = torch.randn(2 * len(rows), *shape)  # the batch twice, as classifier-free guidance runs it
    expected = torch.cat([_alone(table, layer, x[i:i + 1], rows[i % len(rows)]) for i in range(len(x))])
    _contribute(table, layer, NAMES)
    samples = SampleWeights({n: i for i, n in enumerate(NAMES)},
                            torch.tensor([[row.get(n, 0.0) for n in NAMES] for row in rows]))
    token = table.sample_var.set(samples)
    try:
        with torch.no_grad():
            got = layer.module(x)
        torch.testing.assert_close(got, expected, **TOL)
    finally:
        table.sample_var.reset(token)


def test_new_weights_per_step_are_read_at_the_next_forward_and_bad_rows_are_refused():
    table, layer = _table(torch.nn.Linear(40, 48))
    x = torch.randn(2, 3, 40)
    step2 = _alone(table, layer, x[1:], {"b": 2.0})
    _contribute(table, layer, NAMES)
    samples = SampleWeights({n: i for i, n in enumerate(NAMES)}, torch.tensor([[1.0, 0, 0, 0], [0, 0.5, 0, 0]]))
    token = table.sample_var.set(samples)
    try:
        with torch.no_grad():
            layer.module(x)
            samples.matrix.copy_(torch.tensor([[0.0, 0, 0, 0], [0, 2.0, 0, 0]]))  # "a" scheduled to 0
            samples.generation += 1
            got = layer.module(x)
            torch.testing.assert_close(got[1:], step2, **TOL)
            torch.testing.assert_close(got[:1], torch.nn.functional.linear(x[:1], layer.module.weight,
                                                                           layer.module.bias), **TOL)
            with pytest.raises(ValueError, match="one weight row per image"):
                layer.module(x[:1])
    finally:
        table.sample_var.reset(token)


def test_a_pipeline_batch_of_one_adapter_per_image_equals_each_image_alone(make_pipe, make_adapter):
    """Tiny SD1.5, CFG on, 2 steps: four rank-4 adapters, one per image (the union's rank is 4× an image's): each
    image equals its own call within the suite's tolerance."""
    import numpy as np

    from lorablend import DiffusionPipeline

    pipe = DiffusionPipeline(make_pipe("sd1"))
    pipe.set_progress_bar_config(disable=True)
    for i, name in enumerate(NAMES):
        pipe.load_lora_weights(make_adapter("sd1", name, seed=10 + i, rank=4, strength=2.0), adapter_name=name)
    kw = dict(num_inference_steps=2, height=32, width=32, output_type="np", guidance_scale=7.5)
    rows = [{"a": 0.8}, {"b": 1.1}, {"c": -0.6}, {"d": 0.9}]
    prompts = [f"prompt {i}" for i in range(len(rows))]
    alone = []
    for seed, (row, prompt) in enumerate(zip(rows, prompts)):
        pipe.set_adapters(list(row), list(row.values()))
        alone.append(pipe(prompt, generator=np.random.Generator(np.random.PCG64(seed)), **kw).images[0])
    pipe.set_adapters(list(NAMES), [1.0] * len(NAMES))
    with pipe.runtime.call_sample_weights(rows):
        got = pipe(prompts, generator=[np.random.Generator(np.random.PCG64(s)) for s in range(4)], **kw).images
    for i, (g, a) in enumerate(zip(got, alone)):
        assert float(np.abs(g - a).max()) <= 1e-4, f"image {i} ({rows[i]})"
