"""Any mix in one batch: per-sample LoRA weights in the unfused forward (``LoraRuntime.call_sample_weights``) and
the server's worker batching requests with different mixes. Each image must equal the library's image for its own
mix alone (tiny SD1.5, classifier-free guidance on: the doubled batch takes the same per-sample weights); a mix the
per-sample path cannot take (not low-rank) is refused by the runtime and batched alone by the worker.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lorablend import DiffusionPipeline
from lorablend.fixtures.tiny_unets import random_adapter, tiny_pipeline

KW = dict(num_inference_steps=2, height=32, width=32, output_type="np", guidance_scale=7.5)
MIXES = [{"a": 0.7}, {"b": -0.5, "c": 1.2}, {}, {"a": 0.3, "b": 0.9, "c": 0.4}]
TOL = 1e-4  # float images in [0, 1]: the per-sample term differs from the single-mix term only in rounding


@pytest.fixture(scope="module")
def loaded():
    base = tiny_pipeline("sd1")
    pipe = DiffusionPipeline(base)
    pipe.set_progress_bar_config(disable=True)
    adapters = {}
    for i, name in enumerate("abc"):
        adapters[name] = random_adapter(base, name, seed=i + 1, rank=4 + i, strength=2.0)
        pipe.load_lora_weights(adapters[name], adapter_name=name)
    return pipe, adapters


def _alone(pipe, mix, prompt, seed):
    pipe.set_adapters(list(mix), list(mix.values()))
    return pipe(prompt, generator=np.random.Generator(np.random.PCG64(seed)), **KW).images[0]


def test_each_image_of_a_mixed_batch_equals_its_own_call(loaded):
    pipe, _ = loaded
    prompts = [f"prompt {i}" for i in range(len(MIXES))]
    alone = [_alone(pipe, m, p, s) for s, (m, p) in enumerate(zip(MIXES, prompts))]
    pipe.set_adapters(["a", "b", "c"], [1.0, 1.0, 1.0])
    with pipe.runtime.call_sample_weights(MIXES):
        got = pipe(prompts, generator=[np.random.Generator(np.random.PCG64(s)) for s in range(4)], **KW).images
    for i, (g, a) in enumerate(zip(got, alone)):
        assert float(np.abs(g - a).max()) <= TOL, f"image {i} ({MIXES[i]})"
    # the weights were the call's only: the next call without them is the plain blend again
    assert float(np.abs(pipe("prompt 0", generator=np.random.Generator(np.random.PCG64(0)), **KW).images[0]
                        - _alone(pipe, {"a": 1.0, "b": 1.0, "c": 1.0}, "prompt 0", 0)).max()) == 0.0


def test_per_sample_weights_are_refused_with_the_cause(loaded):
    pipe, _ = loaded
    pipe.set_adapters(["a"], [1.0])
    with pytest.raises(ValueError, match=r"\['b'\].*active"):
        with pipe.runtime.call_sample_weights([{"b": 1.0}]):
            pass
    with pytest.raises(ValueError, match="one weight row per image"):
        with pipe.runtime.call_sample_weights([{"a": 1.0}] * 3):
            pipe(["x", "y"], generator=np.random.Generator(np.random.PCG64(0)), **KW)


def _full_rank(adapter):
    """The same adapter as dense ΔW deltas (a kind with no low-rank pair)."""
    import dataclasses

    from lorablend.kinds import FullDelta

    return dataclasses.replace(adapter, deltas={k: FullDelta(diff=d.delta_weight()) for k, d in adapter.deltas.items()})


def test_the_worker_batches_different_mixes_and_keeps_dense_ones_apart(loaded):
    from lorablend.serve.batch import Generation
    from lorablend.serve.cache import AdapterCache, CachedAdapter, takes_sample_weights
    from lorablend.serve.metrics import Metrics
    from lorablend.serve.worker import Worker

    ref, adapters = loaded
    pipe = DiffusionPipeline(tiny_pipeline("sd1"))
    pipe.set_progress_bar_config(disable=True)
    dense = _full_rank(adapters["a"])
    entries = {n: CachedAdapter(n, i, a, 0, (0, 0), Path(n), low_rank=takes_sample_weights(a))
               for i, (n, a) in enumerate({**adapters, "dense": dense}.items())}
    assert not entries["dense"].low_rank and entries["a"].low_rank
    metrics = Metrics()
    worker = Worker(pipe, AdapterCache(pipe, budget_bytes=2**30, metrics=metrics), metrics, max_batch=4)
    asks = [*MIXES, {"dense": 0.5}]
    worker.start()
    with worker._cond:  # every request queues before the worker may take the first (it forms a batch under _cond)
        jobs = [worker.submit(Generation(f"prompt {i}", seed=i, steps=2, loras=m, width=32, height=32,
                                         guidance_scale=7.5), [entries[n] for n in m]) for i, m in enumerate(asks)]
    results = [job.future.result(timeout=300) for job in jobs]
    worker.stop()
    assert [r.batch_images for r in results] == [4, 4, 4, 4, 1]
    ref.load_lora_weights(dense, adapter_name="dense")
    try:
        for i, (mix, result) in enumerate(zip(asks, results)):
            want = _alone(ref, mix, f"prompt {i}", i)
            assert float(np.abs(result.images[0] - want).max()) <= TOL, f"request {i} ({mix})"
    finally:
        ref.delete_adapters("dense")
    text = metrics.render()  # two batches: four mixes, then the dense one alone
    assert "lorablend_batch_mixes_sum 5.000000" in text and "lorablend_batch_mixes_count 2" in text


def test_a_batch_whose_clients_all_left_stops_between_steps(loaded):
    from lorablend.serve.batch import Generation
    from lorablend.serve.cache import AdapterCache
    from lorablend.serve.errors import ClientGone
    from lorablend.serve.metrics import Metrics
    from lorablend.serve.worker import Worker

    pipe = DiffusionPipeline(tiny_pipeline("sd1"))
    pipe.set_progress_bar_config(disable=True)
    metrics = Metrics()
    worker = Worker(pipe, AdapterCache(pipe, budget_bytes=2**30, metrics=metrics), metrics, max_batch=4)
    seen = []
    original = worker._run_batch._callback

    def counting(should_stop, interrupt):  # the client leaves during the first step
        inner = original(should_stop, interrupt)

        def step(p, i, t, tensors):
            seen.append(i)
            if i == 0:
                worker.abandon(job)
            return inner(p, i, t, tensors)
        return step
    worker._run_batch._callback = counting
    worker.start()
    job = worker.submit(Generation("x", seed=1, steps=50, width=32, height=32), [])
    with pytest.raises(ClientGone):
        job.future.result(timeout=300)
    worker.stop()
    assert seen == [0] and metrics.value("lorablend_batches_cancelled_total") == 1
    assert torch.is_tensor(worker.progress.latents)


def test_a_schedule_equals_setting_each_steps_weights_by_hand(loaded):
    pipe, _ = loaded
    kw = {**KW, "num_inference_steps": 4}
    pipe.set_adapters(["a", "b"], [1.0, 0.5])
    got = pipe("x", generator=np.random.Generator(np.random.PCG64(0)), lora_schedule={"a": "1.0@0,0@0.5"},
               **kw).images[0]
    weights = [1.0, 0.5, 0.0, 0.0]  # 1.0 at step 0, 0 from position 0.5 (step 2), linear between

    def by_hand(p, i, t, tensors):
        if i + 1 < len(weights):
            pipe.set_adapters(["a", "b"], [weights[i + 1], 0.5])
        return tensors
    pipe.set_adapters(["a", "b"], [1.0, 0.5])
    want = pipe("x", generator=np.random.Generator(np.random.PCG64(0)), callback_on_step_end=by_hand, **kw).images[0]
    assert float(np.abs(got - want).max()) <= TOL
    pipe.set_adapters(["a", "b"], [1.0, 0.5])
    constant = pipe("x", generator=np.random.Generator(np.random.PCG64(0)), **kw).images[0]
    assert float(np.abs(got - constant).max()) > 100 * TOL  # the schedule did change the image


def test_the_worker_runs_a_scheduled_request_beside_a_constant_one(loaded):
    from lorablend.serve.batch import Generation
    from lorablend.serve.cache import AdapterCache, CachedAdapter
    from lorablend.serve.metrics import Metrics
    from lorablend.serve.schemas import ImageRequest
    from lorablend.serve.config import ServeSettings
    from lorablend.serve.worker import Worker

    ref, adapters = loaded
    pipe = DiffusionPipeline(tiny_pipeline("sd1"))
    pipe.set_progress_bar_config(disable=True)
    entries = {n: CachedAdapter(n, i, a, 0, (0, 0), Path(n), low_rank=True) for i, (n, a) in enumerate(adapters.items())}
    settings = ServeSettings(lora_dir=".")
    scheduled = ImageRequest(prompt="s <lora:a:1@0,0@0.5>", loras={"b": [[0, 0.0], [1, 1.0]]}, seed=1, steps=4,
                             width=32, height=32, guidance_scale=7.5).generation(settings)
    assert scheduled.schedules == {"a": ((0.0, 1.0), (0.5, 0.0)), "b": ((0.0, 0.0), (1.0, 1.0))}
    constant = Generation("c", seed=2, steps=4, loras={"c": 0.8}, width=32, height=32, guidance_scale=7.5)
    metrics = Metrics()
    worker = Worker(pipe, AdapterCache(pipe, budget_bytes=2**30, metrics=metrics), metrics, max_batch=4)
    worker.start()
    with worker._cond:  # both queue before the worker takes the first
        jobs = [worker.submit(g, [entries[n] for n in g.loras]) for g in (scheduled, constant)]
    results = [job.future.result(timeout=300) for job in jobs]
    worker.stop()
    assert [r.batch_images for r in results] == [2, 2]
    ref.set_adapters(["a", "b"], [1.0, 1.0])
    want = ref("s", generator=np.random.Generator(np.random.PCG64(1)), **{**KW, "num_inference_steps": 4},
               lora_schedule={"a": [[0, 1.0], [0.5, 0.0]], "b": [[0, 0.0], [1, 1.0]]}).images[0]
    assert float(np.abs(results[0].images[0] - want).max()) <= TOL
    ref.set_adapters(["c"], [0.8])
    want = ref("c", generator=np.random.Generator(np.random.PCG64(2)), **{**KW, "num_inference_steps": 4}).images[0]
    assert float(np.abs(results[1].images[0] - want).max()) <= TOL


def test_the_compiled_worker_batches_mixes_and_schedules_with_no_recompile(loaded):
    """``serve --compile``: requests with different mixes and schedules share a batch on the compiled denoiser, each
    image its own call's, and the second round of other mixes and schedules makes no new graph."""
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    from lorablend.serve.batch import Generation
    from lorablend.serve.cache import AdapterCache, CachedAdapter
    from lorablend.serve.metrics import Metrics
    from lorablend.serve.worker import Worker

    ref, adapters = loaded
    pipe = DiffusionPipeline(tiny_pipeline("sd1"))
    pipe.set_progress_bar_config(disable=True)
    entries = {n: CachedAdapter(n, i, a, 0, (0, 0), Path(n), low_rank=True) for i, (n, a) in enumerate(adapters.items())}
    dynamo.reset()
    backend = CompileCounterWithBackend("eager")  # dynamo's tracing and guards, without inductor's C++ build
    metrics = Metrics()
    worker = Worker(pipe, AdapterCache(pipe, budget_bytes=2**30, metrics=metrics), metrics, max_batch=4,
                    compiled=pipe.compile_denoiser(backend=backend, per_sample=True))
    kw = dict(steps=3, width=32, height=32, guidance_scale=7.5)
    rounds = [[({"a": 0.7}, {}), ({"b": 1.0}, {"b": ((0.0, 1.0), (0.5, -0.5))})],
              [({"c": -0.6, "a": 0.4}, {}), ({"a": 1.0, "c": 1.0}, {"a": ((0.0, 0.0), (1.0, 1.5))})]]
    try:
        worker.start()
        for r, asks in enumerate(rounds):
            with worker._cond:  # both queue before the worker takes the first: one batch
                jobs = [worker.submit(Generation(f"p{i}", seed=i, loras=m, schedules=s, **kw), [entries[n] for n in m])
                        for i, (m, s) in enumerate(asks)]
            results = [job.future.result(timeout=300) for job in jobs]
            assert [res.batch_images for res in results] == [2, 2]
            graphs = backend.frame_count if r == 0 else graphs
            for i, ((mix, schedule), res) in enumerate(zip(asks, results)):
                ref.set_adapters(list(mix), list(mix.values()))
                want = ref(f"p{i}", generator=np.random.Generator(np.random.PCG64(i)), num_inference_steps=3,
                           **{k: v for k, v in KW.items() if k != "num_inference_steps"},
                           lora_schedule={n: [list(p) for p in pts] for n, pts in schedule.items()} or None).images[0]
                assert float(np.abs(res.images[0] - want).max()) <= TOL, f"round {r}, request {i}"
        assert backend.frame_count == graphs >= 1  # compiled once, in round 0
    finally:
        worker.stop()
        dynamo.reset()
