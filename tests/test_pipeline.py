"""The guide's API on lorablend.DiffusionPipeline: semantics, the properties of real_material.md §4 (A–D),
and one clear error with the pipeline unchanged for bad input to every method."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorablend
from lorablend import DiffusionPipeline, LoraCompatibilityError
from lorablend.adapter import Adapter, LowRankDelta

from conftest import GEN_KW, assert_params_equal, assert_same_computed, params_of


def run(pipe, **kw):
    return pipe(**{**GEN_KW, **kw}, generator=torch.manual_seed(0)).images


def close(a, b, atol=1e-3):
    return np.allclose(a, b, atol=atol, rtol=1e-3)


@pytest.fixture
def sd1(make_pipe, make_adapter):
    """A wrapped tiny SD1.5 pipeline with adapters a, b, c loaded (every Linear/Conv2d, text encoder too)."""
    pipe = DiffusionPipeline(make_pipe("sd1"))
    for i, name in enumerate("abc"):
        pipe.load_lora_weights(make_adapter("sd1", name, seed=i + 1, alpha=2.0), adapter_name=name)
    return pipe


@pytest.fixture
def base_out(tiny_pipes):
    return run(tiny_pipes["sd1"])


# ------------------------------------------------------------------------------------------ wrapper basics
def test_wraps_and_delegates(make_pipe):
    inner = make_pipe("sd1")
    pipe = DiffusionPipeline(inner)
    assert pipe.unet is inner.unet and pipe.vae_scale_factor == inner.vae_scale_factor
    assert pipe.to("cpu") is pipe  # chaining keeps the LoRA API
    assert lorablend.DiffusionPipeline is DiffusionPipeline
    out = pipe(**GEN_KW, generator=np.random.Generator(np.random.PCG64(0)))
    assert out[0][0].shape == (32, 32, 3) and out.images[0].shape == (32, 32, 3)
    with pytest.raises(TypeError, match="unet"):
        DiffusionPipeline(object())


def test_numpy_generator_draws_host_latents(make_pipe):
    pipe = DiffusionPipeline(make_pipe("sdxl"))
    a = pipe(**GEN_KW, generator=np.random.Generator(np.random.PCG64(0))).images
    b = pipe(**GEN_KW, generator=np.random.Generator(np.random.PCG64(0))).images
    c = pipe(**GEN_KW, generator=np.random.Generator(np.random.PCG64(1))).images
    assert_same_computed(a, b)
    assert not np.allclose(a, c)
    # the same latents passed by hand (diffusers scales them by init_noise_sigma itself)
    noise = np.random.Generator(np.random.PCG64(0)).standard_normal((1, 4, 16, 16))
    d = pipe(**GEN_KW, latents=torch.from_numpy(noise).float()).images
    assert_same_computed(a, d)
    # one generator per image
    gens = [np.random.Generator(np.random.PCG64(s)) for s in (0, 1)]
    two = pipe(**GEN_KW, num_images_per_prompt=2, generator=gens).images
    assert np.allclose(two[0], a[0], atol=1e-5) and np.allclose(two[1], c[0], atol=1e-5)
    with pytest.raises(ValueError, match="one per image"):
        pipe(**GEN_KW, num_images_per_prompt=3, generator=gens)


# ------------------------------------------------------------------------------------------ A: apply / scale
def test_A1_A2_adapter_changes_output_and_scale_zero_is_base(sd1, base_out):
    y = run(sd1)
    assert not close(y, base_out)
    assert close(run(sd1, cross_attention_kwargs={"scale": 0.0}), base_out, atol=1e-5)
    assert not close(run(sd1, cross_attention_kwargs={"scale": 0.5}), y)


def test_scale_zero_leaves_set_adapters_weights_in_place(sd1):
    sd1.set_adapters(["a", "b"], [0.3, -0.6])
    y = run(sd1)
    run(sd1, cross_attention_kwargs={"scale": 0.0})
    assert_same_computed(run(sd1), y)  # diffusers + PEFT reset the weights to 1.0 here


def test_A3_call_scale_equals_set_adapters_weight(sd1):
    sd1.set_adapters(["a"], [0.5])
    y_weight = run(sd1)
    sd1.set_adapters(["a"])
    assert close(run(sd1, cross_attention_kwargs={"scale": 0.5}), y_weight, atol=1e-5)


def test_call_scale_reaches_the_text_encoder(make_pipe, make_adapter, base_out):
    pipe = DiffusionPipeline(make_pipe("sd1"))
    pipe.load_lora_weights(make_adapter("sd1", "te", seed=3, components=["text_encoder"], strength=2.0))
    assert not close(run(pipe), base_out)
    assert close(run(pipe, cross_attention_kwargs={"scale": 0.0}), base_out, atol=1e-6)


def test_A4_partial_lora_changes_output_differently(make_pipe, make_adapter, base_out):
    full = make_adapter("sd1", "full", seed=5)
    partial = Adapter("partial", "sd1", {k: d for i, (k, d) in enumerate(full.deltas.items()) if i % 3})
    pipe = DiffusionPipeline(make_pipe("sd1"))
    pipe.load_lora_weights(full)
    y_full = run(pipe)
    pipe.load_lora_weights(partial)
    y_partial = run(pipe)
    assert not close(y_partial, base_out) and not close(y_partial, y_full)


def test_A5_adapter_matching_nothing_is_an_error_not_a_silent_no_op(make_pipe):
    pipe = DiffusionPipeline(make_pipe("sd1"))
    bogus = Adapter("bogus", "sd1", {"unet.no.such.layer": LowRankDelta(torch.ones(2, 4), torch.ones(4, 2))})
    with pytest.raises(LoraCompatibilityError, match="no.such.layer"):
        pipe.load_lora_weights(bogus)
    with pytest.raises(LoraCompatibilityError, match="no layer"):
        pipe.load_lora_weights(bogus, strict=False)
    assert pipe.get_list_adapters() == {}


# ------------------------------------------------------------------------------------------ B: fuse / unfuse
def test_B1_B2_B3_fuse_keeps_output_and_unfuse_restores(sd1, base_out):
    before = params_of(sd1)
    sd1.set_adapters(["a", "b"], [0.7, 0.8])
    y = run(sd1)
    y_scaled = run(sd1, cross_attention_kwargs={"scale": 0.8})
    sd1.fuse_lora()
    assert sd1.num_fused_loras == 2 and sd1.fused_loras == {"a", "b"}
    assert close(run(sd1), y)
    sd1.unfuse_lora()
    assert sd1.num_fused_loras == 0
    assert_params_equal(sd1, before)
    assert close(run(sd1), y)  # adapters still loaded and active
    sd1.fuse_lora(lora_scale=0.8)
    assert close(run(sd1), y_scaled) and not close(run(sd1), base_out)


def test_B4_fuse_one_then_several(sd1):
    sd1.set_adapters(["a"])
    y_a = run(sd1)
    sd1.set_adapters(["a", "b"])
    y_ab = run(sd1)
    sd1.fuse_lora(adapter_names=["a"])
    sd1.set_adapters(["a"])
    assert close(run(sd1), y_a)
    sd1.unfuse_lora()
    sd1.set_adapters(["a", "b"])
    sd1.fuse_lora(adapter_names=["b", "a"])
    assert sd1.num_fused_loras == 2
    assert close(run(sd1), y_ab)


def test_B5_partial_component_unfuse_bookkeeping(sd1):
    before = params_of(sd1)
    sd1.fuse_lora(components=["unet", "text_encoder"], adapter_names=["a"])
    sd1.unfuse_lora(components=["text_encoder"])
    assert sd1.num_fused_loras == 1
    te_before = {k: v for k, v in before.items() if k.startswith("text_encoder.")}
    assert all(torch.equal(v, params_of(sd1)[k]) for k, v in te_before.items())
    assert not torch.equal(params_of(sd1)["unet.down_blocks.1.attentions.0.proj_in.weight"],
                           before["unet.down_blocks.1.attentions.0.proj_in.weight"])
    sd1.unfuse_lora(components=["unet"])
    assert sd1.num_fused_loras == 0
    assert_params_equal(sd1, before)


def test_B7_sequential_fuse_unfuse_reproduces_the_first(sd1):
    outs = []
    for name in "abc":
        sd1.set_adapters([name])
        sd1.fuse_lora()
        outs.append(run(sd1))
        sd1.unfuse_lora()
    sd1.set_adapters(["a"])
    sd1.fuse_lora()
    assert_same_computed(run(sd1), outs[0])


def test_B8_unfuse_then_unload_is_base_and_unfuse_after_unload_works(sd1, base_out):
    before = params_of(sd1)
    sd1.set_adapters(["a", "c"], [1.0, 0.5])
    sd1.fuse_lora()
    sd1.unload_lora_weights()  # keeps what is fused (the guide's fuse -> unload -> save recipe)
    assert sd1.get_list_adapters() == {} and sd1.fused_loras == {"a", "c"}
    assert not close(run(sd1), base_out)
    sd1.unfuse_lora(adapter_names=["c"])  # diffusers cannot unfuse after unload, nor one of several
    sd1.unfuse_lora()
    assert_params_equal(sd1, before)
    assert close(run(sd1), base_out, atol=1e-6)


def test_B9_fusing_twice_is_a_clear_error(sd1):
    sd1.fuse_lora(adapter_names=["a"])
    snapshot = params_of(sd1)
    with pytest.raises(ValueError, match=r"'a' is already fused.*unfuse_lora"):
        sd1.fuse_lora(adapter_names=["a"])
    assert_params_equal(sd1, snapshot)


def test_B11_safe_fusing_equals_ordinary_fusing(sd1, make_pipe, make_adapter):
    sd1.fuse_lora(adapter_names=["a"], safe_fusing=True)
    other = DiffusionPipeline(make_pipe("sd1"))
    other.load_lora_weights(make_adapter("sd1", "a", seed=1, alpha=2.0))
    other.fuse_lora(adapter_names=["a"])
    assert_params_equal(sd1, params_of(other))


def test_keep_fuse_buffers_switches_without_allocating_and_stays_exact(make_pipe, make_adapter):
    pipe = DiffusionPipeline(make_pipe("sd1"), keep_fuse_buffers=True)
    before = params_of(pipe)
    for i, name in enumerate("ab"):
        pipe.load_lora_weights(make_adapter("sd1", name, seed=i + 1, alpha=2.0), adapter_name=name)
    pipe.set_adapters(["a", "b"], [0.7, 0.8])
    pipe.fuse_lora(adapter_names=["a", "b"])
    fused = params_of(pipe)
    to_q = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    first = to_q.weight.data_ptr()
    pipe.unfuse_lora()
    assert_params_equal(pipe, before)
    assert pipe.runtime.memory()["fuse_buffers"] > 0  # one copy of the touched weights, kept while unfused
    pipe.fuse_lora(adapter_names=["a", "b"])
    assert to_q.weight.data_ptr() == first  # written into the kept tensor
    assert_params_equal(pipe, fused)
    pipe.unfuse_lora()
    assert_params_equal(pipe, before)


def test_fused_pipeline_refuses_a_call_scale(sd1):
    sd1.fuse_lora(adapter_names=["a"])
    with pytest.raises(ValueError, match="cannot rescale fused adapters"):
        run(sd1, cross_attention_kwargs={"scale": 0.5})
    run(sd1, cross_attention_kwargs={"scale": 1.0})


def test_saved_fused_pipeline_reloads_with_the_same_output(sd1, tmp_path):
    sd1.set_adapters(["a", "b"], [0.7, 0.8])
    sd1.fuse_lora(adapter_names=["a", "b"], lora_scale=1.0)
    sd1.unload_lora_weights()
    y = run(sd1)
    sd1.save_pretrained(tmp_path / "fused")
    again = DiffusionPipeline.from_pretrained(str(tmp_path / "fused"))
    again.set_progress_bar_config(disable=True)
    assert_same_computed(run(again), y)  # bit-equal weights at other addresses: see COMPUTED_TOL
    with pytest.raises(ValueError, match="nothing is fused"):
        again.unfuse_lora()


# ------------------------------------------------------------------------------------------ C: unload / delete
def test_C1_C2_unload_is_base_and_reload_reproduces(sd1, make_adapter, base_out):
    sd1.set_adapters(["a"])
    y = run(sd1)
    sd1.unload_lora_weights()
    assert close(run(sd1), base_out, atol=1e-6) and sd1.get_list_adapters() == {}
    sd1.load_lora_weights(make_adapter("sd1", "a", seed=1, alpha=2.0))
    assert_same_computed(run(sd1), y)


def test_C3_loading_does_not_change_the_callers_tensors(make_pipe, make_adapter):
    adapter = make_adapter("sd1", "a", seed=1)
    copies = {k: (d.down.clone(), d.up.clone()) for k, d in adapter.deltas.items()}
    pipe = DiffusionPipeline(make_pipe("sd1"))
    pipe.load_lora_weights(adapter)
    pipe.fuse_lora()
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert all(torch.equal(d.down, copies[k][0]) and torch.equal(d.up, copies[k][1]) for k, d in adapter.deltas.items())


def test_C4_C5_delete_adapters(sd1, make_adapter, base_out):
    sd1.set_adapters(["b"])
    y_b = run(sd1)
    sd1.set_adapters(["a", "b"])
    sd1.delete_adapters("a")
    assert sd1.get_active_adapters() == ["b"]
    assert close(run(sd1), y_b)
    sd1.delete_adapters(["b", "c"])
    assert close(run(sd1), base_out, atol=1e-6)
    sd1.load_lora_weights(make_adapter("sd1", "b", seed=2, alpha=2.0))
    assert_same_computed(run(sd1), y_b)


def test_C6_disable_enable(sd1, base_out):
    y = run(sd1)
    sd1.disable_lora()
    assert close(run(sd1), base_out, atol=1e-6)
    sd1.enable_lora()
    assert_same_computed(run(sd1), y)


def test_C7_unload_then_add_a_new_adapter(sd1, make_adapter, base_out):
    sd1.unload_lora_weights()
    sd1.load_lora_weights(make_adapter("sd1", "z", seed=9))
    assert sd1.get_active_adapters() == ["z"] and not close(run(sd1), base_out)


# ------------------------------------------------------------------------------------------ D: names / weights
def test_D1_blends_differ_and_weights_matter(sd1):
    outs = {}
    for names, w in [(["a"], None), (["b"], None), (["a", "b"], None), (["a", "b"], [0.5, 0.6])]:
        sd1.set_adapters(names, w)
        outs[(tuple(names), str(w))] = run(sd1)
    vals = list(outs.values())
    assert all(not close(vals[i], vals[j]) for i in range(4) for j in range(i + 1, 4))


def test_D1_blend_is_exact_linear_combination(sd1):
    """W0 + Σ w ΔW: the blended LoRA term of a layer is linear in the weights (no cross terms)."""
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    module = sd1.unet.get_submodule(key.split(".", 1)[1])
    x = torch.randn(2, 5, module.in_features)

    def lora_term(names, weights):
        sd1.set_adapters(names, weights)
        with torch.no_grad():
            return module(x) - torch.nn.functional.linear(x, module.weight, module.bias)

    combo = lora_term(["a", "b", "c"], [0.7, -0.4, 0.0])
    ref = 0.7 * lora_term(["a"], [1.0]) - 0.4 * lora_term(["b"], [1.0])
    torch.testing.assert_close(combo, ref, rtol=1e-4, atol=1e-5)


def test_D3_active_and_list_adapters(sd1):
    assert sd1.get_active_adapters() == ["c"]  # the last loaded, as in diffusers
    sd1.set_adapters(["b", "a"])
    assert sd1.get_active_adapters() == ["b", "a"]
    assert sd1.get_list_adapters() == {"unet": ["a", "b", "c"], "text_encoder": ["a", "b", "c"]}


def test_D4_block_weights_every_form(sd1):
    base_w = run(sd1)
    forms = [
        {"unet": {"down": 0.5, "mid": 0.0, "up": 1.0}},
        {"unet": {"down": {"block_0": 0.3, "block_1": [1.0, 0.2]}, "up": {"block_0": [0.1, 0.2, 0.3]}}},
        {"unet": {"IN01": 0.0, "M00": 0.5}, "text_encoder": 0.5},
        {"IN04": 0.0, "OUT05": 2.0, "BASE": 0.0},
        {"unet": 0.5, "text_encoder": 0.0},
    ]
    outs = []
    for form in forms:
        sd1.set_adapters(["c"], [form])
        outs.append(run(sd1))
    assert all(not close(o, base_w) for o in outs)
    assert all(not close(outs[i], outs[j]) for i in range(len(outs)) for j in range(i + 1, len(outs)))
    # block weights reach resnets and samplers, not only attentions
    sd1.set_adapters(["c"], [{"unet": {"down": {"block_0": 0.0}}}])
    rt = sd1.runtime
    assert rt._contributors(rt._layers.by_key["unet.down_blocks.0.resnets.0.conv1"]) == []
    assert rt._contributors(rt._layers.by_key["unet.down_blocks.0.downsamplers.0.conv"]) == []
    assert rt._contributors(rt._layers.by_key["unet.down_blocks.1.resnets.0.conv1"]) != []


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p: p.set_adapters(["a", "nope"]), r"\['nope'\] not in the list of present adapters \['a', 'b', 'c'\]"),
        (lambda p: p.set_adapters(["a", "b"], [0.5]), "1 weights for 2 adapters"),
        (lambda p: p.set_adapters(["a"], [float("nan")]), "finite"),
        (lambda p: p.set_adapters(["a"], [{"unet": {"down": {"block_7": 1.0}}}]), r"block_7.*block_0"),
        (lambda p: p.set_adapters(["a"], [{"unet": {"up": {"block_0": [1.0]}}}]), "3 layers"),
        (lambda p: p.set_adapters(["a"], [{"text_encoder_2": 1.0}]), "components are"),
        (lambda p: p.set_adapters(["a"], [{"IN99": 1.0}]), "IN99"),
        (lambda p: p.fuse_lora(adapter_names=["zzz"]), r"\['zzz'\] not in the list"),
        (lambda p: p.fuse_lora(components=["vae"]), r"unknown component.*vae"),
        (lambda p: p.fuse_lora(lora_scale=float("inf")), "finite"),
        (lambda p: p.unfuse_lora(), "nothing is fused"),
        (lambda p: p.delete_adapters("zzz"), r"\['zzz'\] not in the list"),
        (lambda p: p.set_lora_device(["zzz"], "cpu"), r"\['zzz'\] not in the list"),
        (lambda p: p.add_weighted_adapter(["a", "zzz"], [1.0, 1.0], "m"), r"\['zzz'\] not in the list"),
        (lambda p: p.add_weighted_adapter(["a", "b"], [1.0], "m"), "1 weights for 2 adapters"),
        (lambda p: p.add_weighted_adapter(["a", "b"], [1.0, 1.0], "c"), "'c' already exists"),
        (lambda p: p.load_lora_weights(p.runtime.adapters["a"].adapter), "already loaded"),
        (lambda p: p.load_lora_weights("/no/such/file.safetensors"), "does not exist"),
        (lambda p: p(**GEN_KW, cross_attention_kwargs={"scale": float("nan")}), "finite"),
    ],
)
def test_bad_input_raises_one_clear_error_and_changes_nothing(sd1, call, match):
    sd1.set_adapters(["a", "b"], [0.5, 0.7])
    before = params_of(sd1)
    state = (sd1.get_active_adapters(), sd1.get_list_adapters(), sd1.runtime.weight_specs)
    terms = _terms(sd1)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        call(sd1)
    assert_params_equal(sd1, before)
    assert (sd1.get_active_adapters(), sd1.get_list_adapters(), sd1.runtime.weight_specs) == state
    after = _terms(sd1)
    assert after.keys() == terms.keys()
    assert all(all(torch.equal(x, y) if x is not None else y is None for x, y in zip(terms[k], after[k])) for k in terms)


def _terms(pipe) -> dict:
    """The blended per-layer terms the forward hooks add (what a generation would use)."""
    pipe.runtime.prepare()
    return {k: (s.up, s.down, s.dense) for k, s in pipe.runtime.layers.by_key.items() if s.handle is not None}


def test_unfusing_what_is_not_fused_names_what_is(sd1):
    sd1.fuse_lora(adapter_names=["a"])
    with pytest.raises(ValueError, match=r"\['b'\] are not fused; fused adapters: \{'a': \['unet', 'text_encoder'\]\}"):
        sd1.unfuse_lora(adapter_names=["b"])


def test_lora_for_another_family_is_refused_and_nothing_changes(make_pipe, make_adapter):
    pipe = DiffusionPipeline(make_pipe("sd1"))
    before = params_of(pipe)
    xl = make_adapter("sdxl", "xl", seed=1)
    with pytest.raises(LoraCompatibilityError, match="sdxl LoRA but the pipeline is sd1"):
        pipe.load_lora_weights(xl)
    mis = make_adapter("sd1", "m", seed=1, targets="attn")
    key = next(k for k in mis.deltas if k.endswith("attn2.to_k"))
    mis.deltas[key] = LowRankDelta(torch.ones(4, 77), torch.ones(64, 4))  # an SD2-width LoRA on SD1.5
    with pytest.raises(LoraCompatibilityError, match=r"attn2\.to_k.*made for another model"):
        pipe.load_lora_weights(mis)
    report = pipe.load_lora_weights(mis, strict=False)
    assert [r.key for r in report.unsupported] == [key]
    nan = make_adapter("sd1", "n", seed=1, targets="attn")
    next(iter(nan.deltas.values())).up[0, 0] = float("nan")
    with pytest.raises(LoraCompatibilityError, match="NaN"):
        pipe.load_lora_weights(nan)
    pipe.unload_lora_weights()
    assert_params_equal(pipe, before)


def test_add_weighted_adapter_cat_is_exact_and_svd_full_rank_too(sd1):
    sd1.set_adapters(["a", "b"], [0.7, -0.3])
    y = run(sd1)
    sd1.add_weighted_adapter(["a", "b"], [0.7, -0.3], "cat", combination_type="cat")
    assert sd1.get_active_adapters() == ["a", "b"]  # not activated, as in PEFT
    sd1.set_adapters(["cat"])
    assert close(run(sd1), y, atol=1e-4)
    sd1.add_weighted_adapter(["a", "b"], [0.7, -0.3], "svd", combination_type="svd", svd_rank=8)
    sd1.set_adapters(["svd"])
    assert close(run(sd1), y, atol=1e-4)


def test_hotswap_replaces_tensors_and_keeps_weights(sd1, make_adapter):
    sd1.set_adapters(["a", "b"], [0.5, 0.5])
    sd1.load_lora_weights(make_adapter("sd1", "x", seed=7, alpha=2.0), adapter_name="a", hotswap=True)
    assert sd1.get_active_adapters() == ["a", "b"]
    y = run(sd1)
    ref = sd1
    ref.delete_adapters("a")
    ref.load_lora_weights(make_adapter("sd1", "x", seed=7, alpha=2.0), adapter_name="a")
    ref.set_adapters(["a", "b"], [0.5, 0.5])
    assert_same_computed(run(ref), y)


def test_set_lora_device_keeps_the_blend(sd1):
    sd1.set_adapters(["a", "b"], [0.5, 0.5])
    y = run(sd1)
    sd1.set_lora_device(["a"], "cpu")
    sd1.set_adapters(["a", "b"], [0.5, 0.5])
    assert_same_computed(run(sd1), y)


def test_half_precision_pipeline_blends_and_fuses(make_pipe, make_adapter):
    pipe = DiffusionPipeline(make_pipe("sdxl", torch.bfloat16))
    before = params_of(pipe)
    pipe.load_lora_weights(make_adapter("sdxl", "a", seed=1), adapter_name="a")
    pipe.load_lora_weights(make_adapter("sdxl", "b", seed=2), adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.7, 0.8])
    y = pipe(**GEN_KW, generator=np.random.Generator(np.random.PCG64(0))).images
    pipe.fuse_lora()
    y_fused = pipe(**GEN_KW, generator=np.random.Generator(np.random.PCG64(0))).images
    assert np.isfinite(y).all() and np.abs(y - y_fused).max() < 0.1  # bf16 rounding differs, the image does not
    pipe.unfuse_lora()
    assert_params_equal(pipe, before)


def test_state_dict_input_goes_through_io_and_is_not_mutated(make_pipe, make_adapter):
    pytest.importorskip("lorablend.io")
    from conftest import peft_state_dict

    adapter = make_adapter("sd1", "a", seed=4)
    state = peft_state_dict(adapter)
    snapshot = {k: v.clone() for k, v in state.items()}
    from_dict = DiffusionPipeline(make_pipe("sd1"))
    report = from_dict.load_lora_weights(state, adapter_name="a")
    assert report.complete and len(report.mapped) == len(state)
    from_adapter = DiffusionPipeline(make_pipe("sd1"))
    from_adapter.load_lora_weights(adapter)
    assert_same_computed(run(from_dict), run(from_adapter))
    from_dict.fuse_lora()
    from_dict.unload_lora_weights()
    assert state.keys() == snapshot.keys() and all(torch.equal(state[k], snapshot[k]) for k in state)


def test_moving_the_pipeline_to_another_dtype_rebuilds_the_terms(make_pipe, make_adapter):
    pipe = DiffusionPipeline(make_pipe("sd1"))
    pipe.load_lora_weights(make_adapter("sd1", "a", seed=1))
    y32 = run(pipe)
    pipe.to(dtype=torch.bfloat16)
    y16 = pipe(**GEN_KW, generator=torch.manual_seed(0)).images
    assert np.isfinite(y16).all() and np.abs(y16 - y32).max() < 0.1
    slot = next(s for s in pipe.runtime.layers.by_key.values() if s.up is not None)
    assert slot.up.dtype == torch.bfloat16
