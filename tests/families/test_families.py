"""The guide's properties, written once, run on every family of ``family_specs.FAMILIES`` (sd1, sdxl, flux, sd3,
sd35-medium, Qwen-Image and its edit pipelines (Edit, Edit-2509), Wan 2.1 / 2.2 A14B (videos: 5 frames) and their
image-to-video pipelines, Flux.2 dev / klein, Z-Image, Chroma): a tiny pipeline of the family, LoRA files in
diffusers / PEFT names over its real module names, and diffusers + PEFT beside it as the oracle where it reads the
file. What a family's call needs beyond ``GEN`` (an input image, a size) is its row's ``call_kwargs``.

1. the load report is complete (every key mapped);
2. a blend and a call-time scale give diffusers + PEFT's images (≤ 1e-3, images in [0, 1]);
3. the call-time scale leaves no state behind; ``add_weighted_adapter(..., "cat")`` gives the blend's image;
4. fusing gives the unfused blend's image, and unfusing puts every weight back bit for bit (fp32);
   (3. and 4. run on one pipeline: one load, one reference image)
5. the same in bf16 after fusing several adapters (``torch.equal``);
6. a fused pipeline saved with ``save_pretrained`` reloads (diffusers' own loader) with the fused weights' bits.

To add a family: add a ``FamilySpec`` row to tests/families/family_specs.py (its docstring says what a row needs).
A property that only one family has (Flux's kohya fused rows, control LoRAs, per-block labels) does not belong
here: it stays in that family's own tests.
"""

from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
import torch

from lorablend import DiffusionPipeline

from conftest import assert_params_equal, assert_same_computed, params_of
from family_specs import FAMILIES

pytest.importorskip("peft")

IMAGE_TOL = 1e-3  # two systems computing one image in [0, 1] (diffusers' own parity bound)
GEN = dict(prompt="a bowl of ramen", num_inference_steps=2, height=32, width=32, output_type="np")
MIX = (["a", "b"], [0.7, -0.4])


@pytest.fixture(scope="module", params=FAMILIES, ids=[spec.name for spec in FAMILIES])
def family(request):
    """(spec, its tiny fp32 pipeline): built once per family; tests take copies."""
    return request.param, request.param.build()


@pytest.fixture(scope="module")
def files(family, tmp_path_factory):
    """{name: path} of two LoRA files (a, b) for the family's pipeline."""
    spec, base = family
    folder = tmp_path_factory.mktemp(spec.name)
    return {name: spec.lora_file(base, folder / f"{name}.safetensors", seed) for name, seed in (("a", 1), ("b", 2))}


def _run(pipe, spec, **kw):
    params = inspect.signature(type(getattr(pipe, "pipe", pipe)).__call__).parameters
    video = "num_frames" in params
    extra = {"num_frames": 5} if video else {}
    if "max_sequence_length" in params:  # (T5 / Qwen3 / Mistral prompts are padded to 256-512 tokens by default)
        extra["max_sequence_length"] = 32
    out = pipe(**{**GEN, **extra, **spec.call_kwargs}, **kw, generator=torch.manual_seed(0))
    return out.frames if video else out.images  # (a video: its frames, as many images)


def _ours(family, files, dtype=torch.float32):
    spec, base = family
    pipe = DiffusionPipeline(copy.deepcopy(base).to(dtype=dtype))
    reports = {name: pipe.load_lora_weights(path, adapter_name=name) for name, path in files.items()}
    return pipe, reports


def test_the_load_report_accounts_for_every_key_as_mapped(family, files):
    pipe, reports = _ours(family, files)
    for name, report in reports.items():
        assert report.complete, f"{name}: {report}"
        assert "0 unsupported, 0 unknown" in str(report), str(report)
    assert sorted(pipe.get_list_adapters()[pipe.denoiser_name]) == ["a", "b"]


def test_a_blend_and_a_call_time_scale_give_diffusers_peft_images(family, files):
    spec, base = family
    if not spec.oracle_reads_file:
        pytest.skip(f"diffusers + PEFT do not read {spec.name} LoRA files (FamilySpec.oracle_reads_file)")
    ours, _ = _ours(family, files)
    theirs = copy.deepcopy(base)
    for name, path in files.items():
        theirs.load_lora_weights(path, adapter_name=name)
    ours.set_adapters(*MIX)
    theirs.set_adapters(*MIX)
    got = _run(ours, spec)
    np.testing.assert_allclose(got, _run(theirs, spec), atol=IMAGE_TOL, rtol=0)
    scale = {spec.scale_kwarg: {"scale": 0.5}}
    np.testing.assert_allclose(_run(ours, spec, **scale), _run(theirs, spec, **scale), atol=IMAGE_TOL, rtol=0)
    ours.disable_lora()
    assert np.abs(got - _run(ours, spec)).max() > 20 * IMAGE_TOL  # the LoRAs move the image far beyond the tolerance


def test_one_blend_four_ways_scaled_call_cat_merge_fuse_and_bit_exact_unfuse(family, files):
    """3. and 4. on one pipeline (one load, one reference image): the call-time scale leaves no state, the cat
    merge and the fused weights give the blend's image, unfusing restores every parameter bit for bit."""
    spec, _ = family
    pipe, _ = _ours(family, files)
    pristine = params_of(pipe)
    pipe.set_adapters(*MIX)
    blend = _run(pipe, spec)
    scaled = _run(pipe, spec, **{spec.scale_kwarg: {"scale": 0.3}})
    assert np.abs(scaled - blend).max() > 10 * IMAGE_TOL
    assert_same_computed(_run(pipe, spec), blend, "the call-time scale left state behind")
    pipe.add_weighted_adapter(*MIX, "ab", combination_type="cat")
    pipe.set_adapters("ab")
    np.testing.assert_allclose(_run(pipe, spec), blend, atol=IMAGE_TOL, rtol=0, err_msg="cat merge != blend")
    pipe.set_adapters(*MIX)
    pipe.fuse_lora(adapter_names=MIX[0])
    assert pipe.num_fused_loras == 2
    np.testing.assert_allclose(_run(pipe, spec), blend, atol=IMAGE_TOL, rtol=0, err_msg="fused != unfused blend")
    pipe.unfuse_lora()
    assert_params_equal(pipe, pristine)


def test_bf16_unfuse_after_fusing_several_is_bit_exact(family, files, tmp_path):
    spec, base = family
    pipe, _ = _ours(family, files, dtype=torch.bfloat16)
    pipe.load_lora_weights(spec.lora_file(base, tmp_path / "c.safetensors", seed=3, rank=2), adapter_name="c")
    pristine = params_of(pipe)
    pipe.set_adapters(["a", "b", "c"], [0.7, -0.4, 0.9])
    pipe.fuse_lora(adapter_names=["a", "b", "c"], lora_scale=0.8)
    assert sum(not torch.equal(v, pristine[k]) for k, v in params_of(pipe).items()) >= len(files)
    pipe.unfuse_lora()
    assert_params_equal(pipe, pristine)


def test_a_fused_pipeline_saves_and_reloads_with_its_fused_bits(family, files, tmp_path):
    pipe, _ = _ours(family, files)
    pipe.set_adapters(*MIX)
    pipe.fuse_lora(adapter_names=MIX[0])
    pipe.unload_lora_weights()  # keeps what is fused
    fused = params_of(pipe)
    pipe.save_pretrained(str(tmp_path / "fused"))
    again = type(family[1]).from_pretrained(str(tmp_path / "fused"))
    assert_params_equal(again, fused)
