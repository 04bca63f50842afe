"""Moving adapters between devices: one transfer per dtype for a whole adapter, views of one buffer, values intact."""

from __future__ import annotations

import torch

from lorablend.adapter import DoRADelta, FullDelta, LoHaDelta, LowRankDelta
from lorablend.runtime.transfer import deltas_to, map_tensors
from lorablend.runtime.binding import bind_adapter
from lorablend.runtime.lora_runtime import LoraRuntime

from conftest import COMPUTED_TOL, assert_same_computed

# torch.device("cpu:0") differs from a CPU tensor's device("cpu") while naming the same memory: moving there takes
# the whole transfer path (pack, one copy, views) on a machine without a GPU.
OTHER_CPU = torch.device("cpu", 0)


def _deltas():
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(8, 2, generator=g)
    return [
        LowRankDelta(down=torch.randn(2, 6, generator=g).half(), up=shared, alpha=1.0),
        LoHaDelta(*(torch.randn(s, generator=g) for s in [(8, 2), (2, 6), (8, 2), (2, 6)]), alpha=2.0),
        DoRADelta(inner=LowRankDelta(down=torch.randn(2, 6, generator=g), up=shared), magnitude=torch.rand(8)),
        FullDelta(diff=torch.randn(8, 6, generator=g).bfloat16(), diff_b=torch.randn(8, generator=g).bfloat16()),
    ]


def test_map_tensors_returns_the_same_delta_when_nothing_changes_and_reaches_nested_deltas():
    d = _deltas()[2]
    assert map_tensors(d, lambda t: t) is d
    halved = map_tensors(d, lambda t: t.half())
    assert halved is not d and halved.inner.up.dtype == torch.float16 and halved.magnitude.dtype == torch.float16
    assert d.inner.up.dtype == torch.float32  # the original is left untouched


def test_deltas_to_moves_a_whole_adapter_in_one_buffer_per_dtype():
    deltas = _deltas()
    moved = deltas_to(deltas, OTHER_CPU)
    for a, b in zip(deltas, moved):
        assert type(a) is type(b) and a is not b
        ta, tb = list(a.tensors()), list(b.tensors())
        assert len(ta) == len(tb)
        for x, y in zip(ta, tb):
            assert torch.equal(x, y) and x.dtype == y.dtype and x.shape == y.shape
            assert x.data_ptr() != y.data_ptr()  # a copy
        torch.testing.assert_close(a.delta_weight((8, 6), **({"base": torch.ones(8, 6)} if isinstance(a, DoRADelta) else {})),
                                   b.delta_weight((8, 6), **({"base": torch.ones(8, 6)} if isinstance(b, DoRADelta) else {})),
                                   **COMPUTED_TOL)  # copies at other addresses: the tensors are bit-equal (above)
    storages = {}
    for t in (t for d in moved for t in d.tensors()):
        storages.setdefault(t.dtype, set()).add(t.untyped_storage().data_ptr())
    assert {dt: len(ptrs) for dt, ptrs in storages.items()} == {torch.float16: 1, torch.float32: 1, torch.bfloat16: 1}
    # the factor two deltas share is moved once and still shared
    assert moved[0].up is moved[2].inner.up


def test_an_adapter_read_from_a_file_moves_as_one_span_of_bytes(tmp_path, make_pipe, make_adapter):
    from lorablend.io import load_adapter, save_adapter

    pipe = make_pipe("sd1")
    path = save_adapter(make_adapter("sd1", "a", seed=3, targets="all"), tmp_path / "a.safetensors", format="kohya",
                        target=pipe)
    adapter = load_adapter(path, target=pipe)
    deltas = list(adapter.deltas.values())
    moved = deltas_to(deltas, OTHER_CPU)
    storages = {t.untyped_storage().data_ptr() for d in moved for t in d.tensors()}
    assert len(storages) == 1  # the file's data section, moved once
    for a, b in zip(deltas, moved):
        for x, y in zip(a.tensors(), b.tensors()):
            assert torch.equal(x, y) and x.dtype == y.dtype and x.data_ptr() != y.data_ptr()


def test_a_few_views_of_a_big_buffer_are_packed_not_moved_with_it():
    big = torch.arange(10_000, dtype=torch.float32)
    d = LowRankDelta(down=big[:6].view(2, 3), up=big[-8:].view(4, 2))
    moved = deltas_to([d], OTHER_CPU)[0]
    assert torch.equal(moved.down, d.down) and torch.equal(moved.up, d.up)
    assert moved.down.untyped_storage().nbytes() == 14 * 4  # 6 + 8 values, not 10,000


def test_deltas_to_keeps_tensors_already_there_and_works_on_the_meta_device():
    deltas = _deltas()
    assert all(a is b for a, b in zip(deltas, deltas_to(deltas, "cpu")))
    meta = deltas_to(deltas, "meta")
    assert all(t.device.type == "meta" for d in meta for t in d.tensors())
    assert [t.shape for t in meta[1].tensors()] == [t.shape for t in deltas[1].tensors()]


def test_loading_next_to_the_model_moves_nothing(make_pipe, make_adapter):
    pipe = make_pipe("sd1")
    rt = LoraRuntime({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    adapter = make_adapter("sd1", "a", seed=1, targets="all")
    rt.add(bind_adapter(adapter, rt.view))
    assert all(layer.delta is adapter.deltas[key] for key, layer in rt.adapters["a"].layers.items())


def test_set_lora_device_moves_every_layer_and_keeps_the_blend(make_pipe, make_adapter):
    pipe = make_pipe("sd1")
    rt = LoraRuntime({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    rt.add(bind_adapter(make_adapter("sd1", "a", seed=1, targets="attn"), rt.view))
    x = torch.randn(1, 4, 8, 8)
    text = torch.randn(1, 4, pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        before = pipe.unet(x, 5, encoder_hidden_states=text, return_dict=False)[0]
        rt.move_adapters(["a"], OTHER_CPU)
        layers = rt.adapters["a"].layers.values()
        assert len({layer.delta.up.untyped_storage().data_ptr() for layer in layers}) == 1  # one buffer
        rt.set_adapters(["a"], [1.0])
        after = pipe.unet(x, 5, encoder_hidden_states=text, return_dict=False)[0]
    assert_same_computed(before, after)  # factors moved to other addresses: COMPUTED_TOL
