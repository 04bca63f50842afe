"""diffusers' own expectations of its LoRA API that a drop-in must meet (issue 23): pipelines that share components
share adapters, a component replaced after wrapping is seen, Flux control semantics (narrow LoRAs zero-padded,
unload with reset_to_overwritten_params), norm replacements and ``lora_A.weight.alpha`` alphas in diffusers-format
state dicts, and save_pretrained never losing unfused adapters. diffusers + PEFT run beside as the oracle where they
read the same input."""

from __future__ import annotations

import copy
import gc

import numpy as np
import pytest
import torch

import lorablend
from lorablend.fixtures.tiny_transformers import tiny_flux_pipeline

from conftest import GEN_KW, assert_params_equal, assert_same_computed, params_of, peft_state_dict

FLUX_GEN = dict(num_inference_steps=2, height=32, width=32, output_type="np")
IMAGE_TOL = 1e-3  # two systems computing one image (tests/test_pipeline_flux.py's bound)


def _seed(s: int = 0) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(s))


def _sd1_image(pipe, seed: int = 0) -> np.ndarray:
    """An SD1 image through lorablend's numpy-seeded latents (any wrapper of the same pipeline gives these)."""
    return lorablend.DiffusionPipeline(pipe)(**GEN_KW, generator=_seed(seed)).images if not isinstance(
        pipe, lorablend.DiffusionPipeline) else pipe(**GEN_KW, generator=_seed(seed)).images


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_pipeline()


# ------------------------------------------------------------------------------------------- 1. shared components
def test_pipelines_sharing_components_share_one_set_of_adapters(make_pipe, make_adapter):
    from diffusers import StableDiffusionPipeline

    base = make_pipe("sd1")
    sd_a, sd_b = (peft_state_dict(make_adapter("sd1", n, seed=s, rank=4, alpha=None)) for n, s in (("a", 1), ("b", 2)))
    p1 = lorablend.DiffusionPipeline(StableDiffusionPipeline(**base.components))
    p1.load_lora_weights(sd_a, adapter_name="a")
    p2 = lorablend.DiffusionPipeline(StableDiffusionPipeline(**base.components))
    assert p2.get_list_adapters() == p1.get_list_adapters() and "a" in p2.get_list_adapters()["unet"]
    p2.load_lora_weights(sd_b, adapter_name="b")
    assert p1.get_active_adapters() == p2.get_active_adapters() == ["b"]  # one active set, as on the modules
    assert p1.runtime is p2.runtime
    reference = lorablend.DiffusionPipeline(make_pipe("sd1"))
    reference.load_lora_weights(sd_a, adapter_name="a")
    reference.load_lora_weights(sd_b, adapter_name="b")
    want = reference(**GEN_KW, generator=_seed()).images
    assert_same_computed(p1(**GEN_KW, generator=_seed()).images, want)  # "a" not stacked under "b"
    assert_same_computed(p2(**GEN_KW, generator=_seed()).images, want)
    # diffusers + PEFT: the adapters live on the modules, so the second pipeline sees the first's
    theirs = make_pipe("sd1")
    StableDiffusionPipeline(**theirs.components).load_lora_weights(sd_a, adapter_name="a")
    assert "a" in StableDiffusionPipeline(**theirs.components).get_list_adapters()["unet"]


def test_wrapping_twice_is_harmless_and_a_dropped_wrapper_leaves_only_what_was_fused(make_pipe, make_adapter):
    raw = make_pipe("sd1")
    plain = _sd1_image(copy.deepcopy(raw))
    sd_a = peft_state_dict(make_adapter("sd1", "a", seed=1, rank=4, alpha=None))
    first = lorablend.DiffusionPipeline(raw)
    first.load_lora_weights(sd_a, adapter_name="a")
    with_a = first(**GEN_KW, generator=_seed()).images
    second = lorablend.DiffusionPipeline(raw)
    assert_same_computed(second(**GEN_KW, generator=_seed()).images, with_a)  # applied once, not twice
    del first, second
    gc.collect()
    hooks = sum(len(m._forward_hooks) for m in raw.unet.modules())
    assert hooks == 0
    assert_same_computed(_sd1_image(raw), plain)  # nothing left applied in the raw pipeline
    fused = lorablend.DiffusionPipeline(raw)
    fused.load_lora_weights(sd_a, adapter_name="a")
    fused.fuse_lora()
    del fused
    gc.collect()
    assert_same_computed(_sd1_image(raw), with_a)  # what the user fused stays fused


def test_pipelines_with_other_denoisers_sharing_a_text_encoder_never_add_up_there(make_pipe, make_adapter):
    """SDXL base and refiner share text encoders, not the UNet: one runtime each, so a second set of adapters on the
    shared encoder would add to the first's. Refused (nothing changed); a LoRA on the refiner's own UNet loads."""
    from diffusers import StableDiffusionXLPipeline

    base = make_pipe("sdxl")
    refiner = StableDiffusionXLPipeline(**{**base.components, "unet": copy.deepcopy(base.unet)})
    sd_a, sd_b = (peft_state_dict(make_adapter("sdxl", n, seed=s, rank=4, alpha=None)) for n, s in (("a", 1), ("b", 2)))
    p1, p2 = lorablend.DiffusionPipeline(base), lorablend.DiffusionPipeline(refiner)
    p1.load_lora_weights(sd_a, adapter_name="a")
    with pytest.raises(lorablend.errors.LoraCompatibilityError, match=r"\['text_encoder', 'text_encoder_2'\].*another"):
        p2.load_lora_weights(sd_b, adapter_name="b")
    assert p2.get_list_adapters() == {} and sum(len(m._forward_hooks) for m in refiner.unet.modules()) == 0
    p2.load_lora_weights({k: v for k, v in sd_b.items() if k.startswith("unet.")}, adapter_name="b")
    assert p2.get_list_adapters() == {"unet": ["b"]} and "a" in p1.get_list_adapters()["text_encoder_2"]


def _transformer_lora(transformer, seed: int) -> dict[str, torch.Tensor]:
    g, sd = torch.Generator().manual_seed(seed), {}
    for name, m in transformer.named_modules():
        if name.endswith(("attn.to_q", "attn.to_v")):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(4, m.in_features, generator=g) * 0.3
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.3
    return sd


@pytest.mark.parametrize("family", ["sdxl", "flux", "sd3"])
def test_from_pipe_shares_the_adapters_on_every_family(family, make_pipe, make_adapter):
    from lorablend.fixtures.tiny_transformers import tiny_sd3_pipeline

    if family == "sdxl":
        raw, gen = make_pipe("sdxl"), dict(GEN_KW)
        sd_a, sd_b = (peft_state_dict(make_adapter("sdxl", n, seed=s, rank=4, alpha=None)) for n, s in (("a", 1), ("b", 2)))
    else:
        raw, gen = (tiny_flux_pipeline() if family == "flux" else tiny_sd3_pipeline()), dict(prompt="a cat", **FLUX_GEN)
        sd_a, sd_b = _transformer_lora(raw.transformer, 1), _transformer_lora(raw.transformer, 2)
    theirs = copy.deepcopy(raw)
    p1 = lorablend.DiffusionPipeline(raw)
    p1.load_lora_weights(dict(sd_a), adapter_name="a")
    with_a = p1(**gen, generator=_seed()).images
    p2 = lorablend.DiffusionPipeline(type(raw).from_pipe(raw))
    assert p2.get_list_adapters() == p1.get_list_adapters()
    assert_same_computed(p2(**gen, generator=_seed()).images, with_a)  # applied once, not once per wrapper
    p2.load_lora_weights(dict(sd_b), adapter_name="b")
    p1.set_adapters("a")  # one active set: what p1 sets, p2 generates
    assert p2.get_active_adapters() == ["a"]
    assert_same_computed(p2(**gen, generator=_seed()).images, with_a)
    # diffusers + PEFT: the second pipeline from from_pipe sees the first's adapter
    theirs.load_lora_weights(dict(sd_a), adapter_name="a")
    assert type(theirs).from_pipe(theirs).get_list_adapters() == {k: ["a"] for k in p1.get_list_adapters()}


# ------------------------------------------------------------------------------------------- 2. replaced components
def test_a_component_replaced_after_wrapping_is_seen_at_the_next_call(make_pipe, make_adapter):
    raw = make_pipe("sd1")
    pristine_unet = copy.deepcopy(raw.unet)
    sd_a, sd_b = (peft_state_dict(make_adapter("sd1", n, seed=s, rank=4, alpha=None)) for n, s in (("a", 1), ("b", 2)))
    pipe = lorablend.DiffusionPipeline(raw)
    pipe.load_lora_weights(sd_a, adapter_name="a")
    old_unet = raw.unet
    pipe.unet = copy.deepcopy(pristine_unet)
    # the old module's adapters went with it (as in diffusers, where they live on the module): nothing on the new
    assert "unet" not in pipe.get_list_adapters()
    assert sum(len(m._forward_hooks) for m in old_unet.modules()) == 0
    pipe.load_lora_weights(sd_b, adapter_name="b")
    assert pipe.runtime.layers.by_key and all(
        layer.module is pipe.unet.get_submodule(k.split(".", 1)[1])
        for k, layer in pipe.runtime.layers.by_key.items() if k.startswith("unet."))
    reference = lorablend.DiffusionPipeline(make_pipe("sd1"))
    reference.load_lora_weights(sd_a, adapter_name="a")
    reference.delete_adapters("a")  # ("a" still touches the text encoder in pipe: load it there only)
    reference.load_lora_weights({k: v for k, v in sd_a.items() if k.startswith("text_encoder")}, adapter_name="a")
    reference.load_lora_weights(sd_b, adapter_name="b")
    reference.set_adapters(["a", "b"])
    pipe.set_adapters(["a", "b"])
    assert_same_computed(pipe(**GEN_KW, generator=_seed()).images, reference(**GEN_KW, generator=_seed()).images)


def test_a_denoiser_replaced_in_static_mode_is_handed_back_and_the_new_one_takes_loras(make_pipe, make_adapter):
    raw = make_pipe("sd1")
    fresh = copy.deepcopy(raw.unet)
    sd_a = peft_state_dict(make_adapter("sd1", "a", seed=1, rank=4, alpha=None))
    pipe = lorablend.DiffusionPipeline(raw)
    pipe.load_lora_weights(sd_a, adapter_name="a")
    old = pipe.unet
    pipe.compile_denoiser(max_rank=4, backend=None)  # static mode: the old UNet's layers take fixed forwards
    pipe.unet = fresh
    pipe.load_lora_weights({k: v for k, v in sd_a.items() if k.startswith("unet.")}, adapter_name="b")
    assert "unet" not in pipe.runtime.layers.static and "forward" not in old.__dict__  # the old one's forwards back
    reference = lorablend.DiffusionPipeline(make_pipe("sd1"))
    reference.load_lora_weights(sd_a, adapter_name="a")
    pipe.set_adapters(["a", "b"])
    assert_same_computed(pipe(**GEN_KW, generator=_seed()).images, reference(**GEN_KW, generator=_seed()).images)


def test_flux_control_transformer_replaced_after_a_control_lora_takes_it_again(tmp_path, flux):
    from diffusers import FluxControlPipeline
    from PIL import Image

    path = _control_lora_file(tmp_path / "control.safetensors", flux)
    pipe = lorablend.DiffusionPipeline(FluxControlPipeline.from_pipe(copy.deepcopy(flux)))
    pipe.load_lora_weights(path, adapter_name="c")
    pipe.transformer = copy.deepcopy(flux.transformer)  # a fresh, narrow transformer
    pipe.load_lora_weights(path, adapter_name="c2")
    assert pipe.transformer.x_embedder.in_features == 8 == pipe.transformer.config.in_channels
    control = Image.new("RGB", (32, 32), (200, 10, 90))
    out = pipe(prompt="a cat", control_image=control, generator=_seed(), **FLUX_GEN).images
    assert np.isfinite(out).all()


# ------------------------------------------------------------------------------------------- 3-5. Flux control
def _control_lora_file(path, flux) -> str:
    """A control LoRA for the tiny transformer: x_embedder reads twice its inputs (noise + control latents)."""
    from safetensors.torch import save_file

    g, sd, r = torch.Generator().manual_seed(0), {}, 4
    xe = flux.transformer.x_embedder
    sd["transformer.x_embedder.lora_A.weight"] = torch.randn(r, 2 * xe.in_features, generator=g) * 0.2
    sd["transformer.x_embedder.lora_B.weight"] = torch.randn(xe.out_features, r, generator=g) * 0.2
    for name, m in flux.transformer.named_modules():
        if name.endswith("attn.to_q"):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(r, m.in_features, generator=g) * 0.2
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, r, generator=g) * 0.2
    save_file(sd, str(path))
    return str(path)


def _narrow_lora(flux, seed: int = 5) -> dict[str, torch.Tensor]:
    """A regular Flux LoRA that also adapts x_embedder at the plain model's width."""
    g, sd, r = torch.Generator().manual_seed(seed), {}, 4
    for name, m in flux.transformer.named_modules():
        if name == "x_embedder" or name.endswith("attn.to_k"):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(r, m.in_features, generator=g) * 0.2
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, r, generator=g) * 0.2
    return sd


def _theirs(pipe, noise, **kw):
    from lorablend.pipeline import _host_noise_in_prepare_latents, _seeded_for_the_rest

    with _host_noise_in_prepare_latents(pipe, noise):
        return pipe(prompt="a cat", generator=_seeded_for_the_rest(_seed(), "cpu"), **FLUX_GEN, **kw).images


def test_a_narrow_lora_after_a_control_lora_is_zero_padded_like_diffusers(tmp_path, flux):
    from diffusers import FluxControlPipeline
    from PIL import Image

    path, narrow = _control_lora_file(tmp_path / "control.safetensors", flux), _narrow_lora(flux)
    ours = lorablend.DiffusionPipeline(FluxControlPipeline.from_pipe(copy.deepcopy(flux)))
    theirs = FluxControlPipeline.from_pipe(copy.deepcopy(flux))
    for p in (ours, theirs):
        p.load_lora_weights(path, adapter_name="c")
        p.load_lora_weights(dict(narrow), adapter_name="n")
        p.set_adapters(["c", "n"], [1.0, 0.8])
    kw = dict(control_image=Image.new("RGB", (32, 32), (200, 10, 90)))
    want = _theirs(theirs, _seed(), **kw)
    got = ours(prompt="a cat", generator=_seed(), **FLUX_GEN, **kw).images
    np.testing.assert_allclose(got, want, atol=IMAGE_TOL, rtol=0)
    ours.fuse_lora()
    np.testing.assert_allclose(ours(prompt="a cat", generator=_seed(), **FLUX_GEN, **kw).images, want,
                               atol=IMAGE_TOL, rtol=0)


def test_a_narrow_lora_on_a_control_transformer_built_wide_is_zero_padded_like_diffusers(flux):
    from diffusers import FluxControlPipeline, FluxTransformer2DModel
    from PIL import Image

    config = {k: v for k, v in flux.transformer.config.items() if not k.startswith("_")}
    wide = FluxTransformer2DModel.from_config({**config, "in_channels": 8, "out_channels": 4})
    control = FluxControlPipeline.from_pipe(copy.deepcopy(flux), transformer=wide)
    narrow = _narrow_lora(flux, seed=6)
    ours, theirs = lorablend.DiffusionPipeline(copy.deepcopy(control)), copy.deepcopy(control)
    ours.load_lora_weights(dict(narrow), adapter_name="n")
    theirs.load_lora_weights(dict(narrow), adapter_name="n")
    kw = dict(control_image=Image.new("RGB", (32, 32), (20, 100, 90)))
    np.testing.assert_allclose(ours(prompt="a cat", generator=_seed(), **FLUX_GEN, **kw).images,
                               _theirs(theirs, _seed(), **kw), atol=IMAGE_TOL, rtol=0)


def test_unload_with_reset_to_overwritten_params_restores_x_embedder_and_config(tmp_path, flux):
    from diffusers import FluxControlPipeline, FluxPipeline

    path = _control_lora_file(tmp_path / "control.safetensors", flux)
    raw = FluxControlPipeline.from_pipe(copy.deepcopy(flux))
    before = params_of(raw)
    pipe = lorablend.DiffusionPipeline(raw)
    pipe.load_lora_weights(_transformer_lora(flux.transformer, 3), adapter_name="c")
    with pytest.raises(ValueError, match="already loaded"):  # widened, then refused: the widening goes too
        pipe.load_lora_weights(path, adapter_name="c")
    assert pipe.transformer.x_embedder.in_features == 4 == pipe.transformer.config.in_channels
    pipe.delete_adapters("c")
    assert_params_equal(raw, before)
    pipe.load_lora_weights(path, adapter_name="c")
    pipe.unload_lora_weights(reset_to_overwritten_params=False)  # diffusers: stays widened
    assert pipe.transformer.x_embedder.in_features == 8 == pipe.transformer.config.in_channels
    pipe.load_lora_weights(path, adapter_name="c")
    pipe.unload_lora_weights(reset_to_overwritten_params=True)
    assert pipe.transformer.x_embedder.in_features == 4 == pipe.transformer.config.in_channels
    assert_params_equal(raw, before)
    plain = FluxPipeline.from_pipe(raw)  # crashed before: config and module still 8 wide
    want = lorablend.DiffusionPipeline(copy.deepcopy(flux))(prompt="a cat", generator=_seed(), **FLUX_GEN).images
    got = lorablend.DiffusionPipeline(plain)(prompt="a cat", generator=_seed(), **FLUX_GEN).images
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------- 6-7. state dicts
def _norm_keys(flux) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {f"transformer.{name}.weight": 1 + 0.3 * torch.randn(m.weight.shape, generator=g)
            for name, m in flux.transformer.named_modules() if name.endswith(("norm_q", "norm_k"))}


@pytest.mark.parametrize("with_lora", [True, False])
def test_norm_replacements_load_like_diffusers_and_come_off_bit_for_bit_on_unload(flux, with_lora):
    norms = _norm_keys(flux)
    sd = {**(_narrow_lora(flux) if with_lora else {}), **norms}
    ours, theirs = lorablend.DiffusionPipeline(copy.deepcopy(flux)), copy.deepcopy(flux)
    before = params_of(ours)
    ours.load_lora_weights(dict(sd), adapter_name="n")
    theirs.load_lora_weights(dict(sd), adapter_name="n")
    for key, value in norms.items():
        assert torch.equal(ours.transformer.get_submodule(key[len("transformer."):-len(".weight")]).weight, value)
    np.testing.assert_allclose(ours(prompt="a cat", generator=_seed(), **FLUX_GEN).images,
                               _theirs(theirs, _seed()), atol=IMAGE_TOL, rtol=0)
    ours.unload_lora_weights()
    assert_params_equal(ours, before)


def test_alphas_spelled_lora_a_weight_alpha_scale_like_kohya_alphas(tmp_path, flux):
    from safetensors.torch import save_file

    sd = _narrow_lora(flux)
    modules = [k[: -len(".lora_A.weight")] for k in sd if k.endswith(".lora_A.weight")]
    folded = dict(sd)
    for m in modules:
        folded[f"{m}.lora_B.weight"] = sd[f"{m}.lora_B.weight"] * (2.0 / 4)  # alpha 2, rank 4
    want = lorablend.DiffusionPipeline(copy.deepcopy(flux))
    want.load_lora_weights(folded, adapter_name="x")
    want_image = want(prompt="a cat", generator=_seed(), **FLUX_GEN).images
    as_floats = {**sd, **{f"{m}.lora_A.weight.alpha": 2.0 for m in modules}}
    as_tensors = {**sd, **{f"{m}.lora_A.weight.alpha": torch.tensor(2.0) for m in modules}}
    save_file(as_tensors, str(tmp_path / "alpha.safetensors"))
    for source in (as_floats, str(tmp_path / "alpha.safetensors")):
        pipe = lorablend.DiffusionPipeline(copy.deepcopy(flux))
        report = pipe.load_lora_weights(source, adapter_name="x")
        assert report.counts()["mapped"] == len(as_floats)
        assert_same_computed(pipe(prompt="a cat", generator=_seed(), **FLUX_GEN).images, want_image)


# ------------------------------------------------------------------------------------------- 8. save_pretrained
def test_save_pretrained_keeps_unfused_adapters_and_from_pretrained_loads_them_back(tmp_path, make_pipe, make_adapter):
    pipe = lorablend.DiffusionPipeline(make_pipe("sd1"))
    pipe.load_lora_weights(make_adapter("sd1", "a", seed=1, rank=4, alpha=2.0), adapter_name="a")
    pipe.load_lora_weights(make_adapter("sd1", "b", seed=2, rank=8), adapter_name="b")
    pipe.load_lora_weights(make_adapter("sd1", "c", seed=3, rank=2), adapter_name="c")
    pipe.set_adapters(["a", "b"], [0.7, {"unet": 0.5, "text_encoder": 1.0}])
    want = pipe(**GEN_KW, generator=_seed()).images
    pipe.save_pretrained(tmp_path / "out")
    again = lorablend.DiffusionPipeline.from_pretrained(str(tmp_path / "out"))
    assert again.get_list_adapters() == pipe.get_list_adapters() and again.get_active_adapters() == ["a", "b"]
    assert_same_computed(again(**GEN_KW, generator=_seed()).images, want)
    again.set_adapters("c")  # the inactive one came back too
    pipe.set_adapters("c")
    assert_same_computed(again(**GEN_KW, generator=_seed()).images, pipe(**GEN_KW, generator=_seed()).images)
    pipe.fuse_lora(components=["unet"], adapter_names=["a"])  # fused into one of its two components: refused
    with pytest.raises(ValueError, match=r"'a' is fused into \['unet'\].*nothing was written"):
        pipe.save_pretrained(tmp_path / "partial")
    assert not (tmp_path / "partial").exists()
