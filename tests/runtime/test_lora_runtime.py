"""The runtime on its own: bit-exact fuse/unfuse, selective unfuse, rollback, one term per layer, call scale."""

from __future__ import annotations

import pytest
import torch

from lorablend.adapter import Adapter, FullDelta, LoHaDelta, LowRankDelta
from lorablend.runtime.binding import bind_adapter
from lorablend.runtime.lora_runtime import LoraRuntime

from conftest import assert_params_equal, assert_same_computed, params_of


def _runtime(pipe, **kw) -> LoraRuntime:
    comps = {c: getattr(pipe, c) for c in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None}
    return LoraRuntime(comps, **kw)


def _load(rt: LoraRuntime, adapter: Adapter) -> None:
    rt.add(bind_adapter(adapter, rt.view))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_unfuse_restores_every_parameter_bit_for_bit(make_pipe, make_adapter, dtype, n):
    pipe = make_pipe("sd1", dtype)
    before = params_of(pipe)
    rt = _runtime(pipe)
    names = [f"a{i}" for i in range(n)]
    for i, name in enumerate(names):
        _load(rt, make_adapter("sd1", name, seed=i, alpha=2.0 + i, targets="all"))
    rt.set_adapters(names, [0.7 - 0.3 * i for i in range(n)])
    rt.fuse(lora_scale=0.9)
    assert rt.fused_names == names
    changed = sum(not torch.equal(p, before[k]) for k, p in params_of(pipe).items())
    assert changed > 0
    rt.unfuse()
    assert_params_equal(pipe, before)
    assert rt.fused_names == [] and rt.memory()["pristine"] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_unfuse_equals_fusing_only_the_rest(make_pipe, make_adapter, dtype):
    adapters = [make_adapter("sd1", f"a{i}", seed=10 + i, targets="all") for i in range(3)]

    pipe = make_pipe("sd1", dtype)
    rt = _runtime(pipe)
    for a in adapters:
        _load(rt, a)
    rt.set_adapters(["a0", "a1", "a2"], [0.5, -0.4, 0.8])
    rt.fuse(["a0", "a1", "a2"], lora_scale=0.7)
    rt.unfuse(["a1"])
    assert rt.fused_names == ["a0", "a2"]

    ref = make_pipe("sd1", dtype)
    rt_ref = _runtime(ref)
    for a in adapters:
        _load(rt_ref, a)
    rt_ref.set_adapters(["a0", "a1", "a2"], [0.5, -0.4, 0.8])
    rt_ref.fuse(["a0", "a2"], lora_scale=0.7)
    assert_params_equal(pipe, params_of(ref))


def test_200_fuse_unfuse_cycles_in_bf16_leave_zero_drift(make_pipe, make_adapter):
    pipe = make_pipe("sd1", torch.bfloat16)
    before = params_of(pipe)
    rt = _runtime(pipe)
    pool = [make_adapter("sd1", f"a{i}", seed=100 + i, targets="attn", strength=2.0) for i in range(4)]
    for a in pool:
        _load(rt, a)
    for cycle in range(200):
        name = f"a{cycle % 4}"
        rt.fuse([name], lora_scale=1.0 + 0.01 * cycle)
        rt.unfuse()
    assert_params_equal(pipe, before)


def test_one_term_per_layer_for_any_number_of_adapters(make_pipe, make_adapter):
    pipe = make_pipe("sd1")
    rt = _runtime(pipe)
    for i in range(3):
        _load(rt, make_adapter("sd1", f"a{i}", seed=i, rank=2, targets="attn"))
    rt.set_adapters(["a0", "a1", "a2"], [1.0, 0.5, 0.0])
    to_q = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert len(to_q._forward_hooks) == 1
    slot = rt._layers.by_key["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert slot.up is None  # built lazily, on the next forward or by prepare()
    rt.prepare()
    # weight 0 drops an adapter from the blend: rank 2 + 2, one pair
    assert slot.up.shape[1] == 4 and slot.down.shape[0] == 4
    # the blended pair is exactly Σ w_i ΔW_i
    expected = sum(w * rt.adapters[n].layers[slot.key].delta.delta_weight() for n, w in [("a0", 1.0), ("a1", 0.5)])
    # (the weights sit in a per-rank vector between the two products)
    torch.testing.assert_close((slot.up * slot.svec) @ slot.down, expected, rtol=1e-6, atol=1e-6)
    # a weight-only change keeps the concatenated factors and refreshes the vector only
    up = slot.up
    rt.set_adapters(["a0", "a1", "a2"], [0.25, 0.5, 0.0])
    rt.prepare()
    assert slot.up is up and slot.svec.tolist() == [0.25, 0.25, 0.5, 0.5]
    rt.set_enabled(False)
    assert len(to_q._forward_hooks) == 0  # disabled: no hook at all, base speed


def test_non_low_rank_kinds_add_one_dense_term(make_pipe):
    pipe = make_pipe("sd1")
    rt = _runtime(pipe)
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    w = pipe.unet.get_submodule(key.split(".", 1)[1]).weight
    g = torch.Generator().manual_seed(0)
    loha = LoHaDelta(*(torch.randn(s, generator=g) * 0.3 for s in [(64, 2), (2, 64), (64, 2), (2, 64)]), alpha=1.0)
    full = FullDelta(diff=torch.randn(64, 64, generator=g) * 0.01)
    lora = LowRankDelta(down=torch.randn(2, 64, generator=g), up=torch.randn(64, 2, generator=g) * 0.1)
    for name, d in [("loha", loha), ("full", full), ("lora", lora)]:
        _load(rt, Adapter(name, "sd1", {key: d}))
    rt.set_adapters(["loha", "full", "lora"], [0.5, 1.0, -1.0])
    rt.prepare()
    slot = rt._layers.by_key[key]
    assert slot.dense is not None and slot.up is None
    expected = 0.5 * loha.delta_weight() + full.delta_weight() - lora.delta_weight()
    torch.testing.assert_close(slot.dense, expected, rtol=1e-5, atol=1e-6)
    x = torch.randn(3, 64)
    module = pipe.unet.get_submodule(key.split(".", 1)[1])
    with torch.no_grad():
        torch.testing.assert_close(module(x), x @ (w + expected).T, rtol=1e-4, atol=1e-5)


def test_failure_midway_through_fuse_rolls_back_every_layer(make_pipe, make_adapter, monkeypatch):
    pipe = make_pipe("sd1", torch.float16)
    rt = _runtime(pipe)
    _load(rt, make_adapter("sd1", "a", seed=1))
    _load(rt, make_adapter("sd1", "b", seed=2))
    rt.fuse(["a"])
    fused_a = params_of(pipe)
    calls = {"n": 0}
    original = rt._write_fused

    def flaky(slot, entries, safe):
        calls["n"] += 1
        if calls["n"] == 20:
            raise RuntimeError("device lost")
        original(slot, entries, safe)

    monkeypatch.setattr(rt, "_write_fused", flaky)
    with pytest.raises(RuntimeError, match="device lost"):
        rt.fuse(["b"])
    assert_params_equal(pipe, fused_a)
    assert rt.fused_names == ["a"]
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="device lost"):
        rt.unfuse(["a"])
    assert_params_equal(pipe, fused_a)
    monkeypatch.undo()
    rt.unfuse()
    assert rt.fused_names == []


def test_safe_fusing_refuses_inf_and_changes_nothing(make_pipe, make_adapter):
    pipe = make_pipe("sd1", torch.float16)
    before = params_of(pipe)
    rt = _runtime(pipe)
    _load(rt, make_adapter("sd1", "a", seed=1))
    with pytest.raises(ValueError, match="NaN or Inf"):
        rt.fuse(["a"], lora_scale=1e6, safe_fusing=True)  # overflows fp16
    assert_params_equal(pipe, before)
    assert rt.fused_names == [] and rt.memory()["pristine"] == 0


def test_call_scale_is_restored_even_when_the_call_raises(make_pipe, make_adapter):
    pipe = make_pipe("sd1")
    rt = _runtime(pipe)
    _load(rt, make_adapter("sd1", "a", seed=1))
    with pytest.raises(ZeroDivisionError):
        with rt.call_scale(0.25):
            assert rt._scale.get() == 0.25
            1 / 0
    assert rt._scale.get() == 1.0


def test_pristine_copies_can_live_on_the_host(make_pipe, make_adapter):
    pipe = make_pipe("sd1")
    before = params_of(pipe)
    rt = _runtime(pipe, pristine_device="cpu")
    _load(rt, make_adapter("sd1", "a", seed=1))
    rt.fuse()
    mem = rt.memory()
    assert mem["pristine"] > 0 and mem["adapters"] > 0
    rt.unfuse()
    assert_params_equal(pipe, before)


def test_fuse_rebinds_and_unfuse_puts_the_original_tensor_back(make_pipe, make_adapter):
    """Fuse keeps the original weight tensor as the backup (no copy); unfuse rebinds it (no copy, exact)."""
    pipe = make_pipe("sd1")
    before = params_of(pipe)
    rt = _runtime(pipe)
    _load(rt, make_adapter("sd1", "a", seed=1, targets="all"))
    key = next(iter(rt.adapters["a"].layers))
    weight = rt.view.module(key).weight
    original = weight.data
    rt.fuse()
    assert weight.data_ptr() != original.data_ptr() and rt.pristine_weight(key).data_ptr() == original.data_ptr()
    rt.unfuse()
    assert weight.data_ptr() == original.data_ptr()
    assert_params_equal(pipe, before)


def test_kept_fuse_buffers_are_reused_and_stay_exact(make_pipe, make_adapter):
    pipe = make_pipe("sd1")
    before = params_of(pipe)
    rt = _runtime(pipe, keep_fuse_buffers=True)
    for i in range(2):
        _load(rt, make_adapter("sd1", f"a{i}", seed=i, targets="all"))
    rt.set_adapters(["a0", "a1"], [0.6, -0.3])
    key = next(iter(rt.adapters["a0"].layers))
    weight = rt.view.module(key).weight
    rt.fuse()
    fused = params_of(pipe)
    first = weight.data_ptr()
    rt.unfuse()
    assert_params_equal(pipe, before)
    mem = rt.memory()
    assert mem["pristine"] == 0 and mem["fuse_buffers"] > 0
    rt.fuse()
    assert weight.data_ptr() == first  # written into the kept tensor
    assert_params_equal(pipe, fused)
    assert rt.memory()["fuse_buffers"] == 0  # while fused, the layer holds its backup instead
    rt.unfuse()
    rt.release_fuse_buffers()
    assert rt.memory()["fuse_buffers"] == 0
    assert_params_equal(pipe, before)


def test_unfuse_holds_fused_tensors_until_the_next_forward_so_a_switch_reuses_them(make_pipe, make_adapter):
    """Default runtime: unfuse → set_adapters → fuse writes into the tensors the unfuse released (no fresh memory),
    stays exact, and the held tensors are freed by the next forward of a component they belong to."""
    pipe = make_pipe("sd1")
    before = params_of(pipe)
    rt = _runtime(pipe)
    for i in range(2):
        _load(rt, make_adapter("sd1", f"a{i}", seed=i, targets="all"))
    key = next(iter(rt.adapters["a0"].layers))
    weight = rt.view.module(key).weight
    rt.set_adapters(["a0"], [0.6])
    rt.fuse()
    first = weight.data_ptr()
    rt.unfuse()
    assert_params_equal(pipe, before)
    assert rt.memory()["fuse_buffers"] > 0 and rt.memory()["pristine"] == 0
    rt.set_adapters(["a1"], [-0.4])
    rt.fuse()
    assert weight.data_ptr() == first  # the switch wrote into the held tensor
    fused_a1 = params_of(pipe)
    rt.unfuse()
    rt.fuse(["a1"])
    assert_params_equal(pipe, fused_a1)  # same bits whether written into held or fresh memory
    rt.unfuse()
    assert rt.memory()["fuse_buffers"] > 0
    ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        pipe.text_encoder(ids)  # a touched component's forward frees every held tensor; the hooks go with it
    assert rt.memory()["fuse_buffers"] == 0 and not rt._release_hooks
    assert_params_equal(pipe, before)
    rt.fuse()
    rt.unfuse()
    rt.prepare()  # so does prepare()
    assert rt.memory()["fuse_buffers"] == 0


def test_pointwise_conv_term_matches_the_conv_delta(make_pipe, make_adapter):
    """1×1 convs (proj_in/proj_out) run their term as channel matmuls; the result is the conv's."""
    pipe = make_pipe("sd1")
    rt = _runtime(pipe)
    for i in range(2):
        _load(rt, make_adapter("sd1", f"a{i}", seed=i, targets="all"))
    rt.set_adapters(["a0", "a1"], [0.7, 0.4])
    rt.prepare()
    slots = [s for s in rt._layers.by_key.values() if s.is_conv and s.is_pointwise and s.up is not None]
    assert slots
    for slot in slots:
        m = slot.module
        x = torch.randn(2, m.in_channels, 5, 3)
        with torch.no_grad():
            base = torch.nn.functional.conv2d(x, m.weight, m.bias)
            got = slot(m, (x,), base.clone()) - base
            dw = sum(w * rt.adapters[n].layers[slot.key].delta.delta_weight(tuple(m.weight.shape))
                     for n, w in [("a0", 0.7), ("a1", 0.4)])
            want = torch.nn.functional.conv2d(x, dw)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _unet_out(pipe) -> torch.Tensor:
    unet = pipe.unet
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
    text = torch.randn(1, 4, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=text, return_dict=False)[0]


def test_any_sequence_of_set_adapters_gives_the_bits_of_a_fresh_runtime(make_pipe, make_adapter):
    """Weight-only changes take a fast path (the version bump); zero weights, block weights, dense kinds and
    enable/disable take the general one. After every step, the output equals that of a runtime that made only
    the final call, bit for bit, whether terms were built lazily (by the forward) or by prepare()."""
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    g = torch.Generator().manual_seed(0)
    loha = Adapter("loha", "sd1", {key: LoHaDelta(*(torch.randn(s, generator=g) * 0.3 for s in
                                                   [(64, 2), (2, 64), (64, 2), (2, 64)]), alpha=1.0)})
    adapters = [make_adapter("sd1", f"a{i}", seed=40 + i, targets="all") for i in range(2)] + [loha]
    steps = [
        (["a0", "a1"], [0.7, 0.8]),
        (["a0", "a1"], [0.3, -0.5]),  # weights only
        (["a0", "a1"], [0.3, 0.0]),  # a1 leaves every layer
        (["a0", "a1"], [0.4, 0.0]),  # weights only, on terms rebuilt with fewer ranks
        (["a0", "a1"], [0.3, 0.6]),  # and comes back
        (["a0", "a1"], [{"unet": {"down": 0.0, "up": 2.0}}, 0.6]),  # a0 leaves the down blocks
        (["a0", "a1"], [{"unet": {"down": 0.5, "up": 2.0}}, 0.6]),
        (["a0", "a1", "loha"], [0.5, 0.6, 0.9]),  # a dense term on one layer
        (["a0", "a1", "loha"], [0.5, 0.6, -0.4]),  # weights only, dense layer included
        (["a1", "a0", "loha"], [0.6, 0.5, -0.4]),  # another order
        ("disable", None),
        (["a1", "a0", "loha"], [0.1, 0.2, 0.3]),  # while disabled
        ("enable", None),
    ]
    pipe = make_pipe("sd1")
    rt = _runtime(pipe)
    for a in adapters:
        _load(rt, a)
    enabled, last = True, None
    for i, (names, weights) in enumerate(steps):
        if names == "disable":
            rt.set_enabled(False)
            enabled = False
        elif names == "enable":
            rt.set_enabled(True)
            enabled = True
        else:
            rt.set_adapters(names, weights)
            last = (names, weights)
        if i % 2:
            rt.prepare()
        got = _unet_out(pipe)
        ref_pipe = make_pipe("sd1")
        ref = _runtime(ref_pipe)
        for a in adapters:
            _load(ref, a)
        ref.set_adapters(*last)
        ref.set_enabled(enabled)
        # a fresh pipeline's tensors sit at other addresses: equal within COMPUTED_TOL (a stale weight or term
        # changes the output by far more), and the weights we write are compared bit for bit by the tests above
        assert_same_computed(got, _unet_out(ref_pipe), f"step {i}: {names} {weights}")


def test_a_mix_is_a_set_the_blended_term_does_not_depend_on_the_order_it_was_named_in(make_pipe, make_adapter):
    """set_adapters(["b", "a"]) builds the same term as set_adapters(["a", "b"]) (factors concatenated by name):
    float sums depend on order, and a strong mix turned that into visible image differences."""
    rt = _runtime(make_pipe("sd1"))
    for name, seed in (("b", 1), ("a", 2)):
        _load(rt, make_adapter("sd1", name, seed=seed, targets="all"))
    terms = []
    for names, weights in ((["a", "b"], [0.7, -0.2]), (["b", "a"], [-0.2, 0.7])):
        rt.set_adapters(names, weights)
        rt.prepare()
        terms.append({k: (l.up.clone(), l.down.clone(), l.svec.clone()) for k, l in rt._layers.by_key.items()
                      if l.up is not None})
    assert terms[0].keys() == terms[1].keys() and terms[0]
    for key, (up, down, svec) in terms[0].items():
        other = terms[1][key]
        assert torch.equal(up, other[0]) and torch.equal(down, other[1]) and torch.equal(svec, other[2]), key
