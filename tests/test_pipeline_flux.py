"""What only Flux.1 / Kontext pipelines have: Kontext's host noise, kohya's fused q/k/v rows, per-block labels, norm
scale diffs, LoRA biases, control LoRAs, static mode on a transformer, T5 prefixes. Tiny pipelines from config
numbers, LoRA files with the real module names, images against diffusers + PEFT where it reads the file.

The guide's properties common to every family (blend and call-time scale parity, cat = blend, fuse ≈ unfused,
bit-exact unfuse in fp32 and bf16, save + reload) run once for all families in tests/families/."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import lorablend
from lorablend.fixtures.tiny_transformers import tiny_flux_pipeline

from conftest import assert_params_equal, params_of

GEN = dict(num_inference_steps=2, height=32, width=32, output_type="np")
IMAGE_TOL = 1e-3  # the issue's parity bound for images in [0, 1] computed by two systems
FLUX_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "proj_mlp", "proj_out",
                "ff.net.2", "ff_context.net.0.proj", "norm1.linear", "norm.linear")


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_pipeline()


def _seed(s: int = 0) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(s))


def _peft_file(path, transformer, seed: int, rank: int = 4, targets=FLUX_TARGETS, prefix="transformer") -> str:
    """A diffusers/PEFT-named LoRA over ``targets`` of ``transformer`` (every block that has them)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name.endswith(t) for t in targets):
            sd[f"{prefix}.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.2
            sd[f"{prefix}.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.2
    save_file(sd, str(path))
    return str(path)


def _theirs(pipe, noise, **kw):
    """diffusers' own call with the noise our numpy generator gives (drawn where the pipeline draws it)."""
    from lorablend.pipeline import _host_noise_in_prepare_latents

    with _host_noise_in_prepare_latents(pipe, noise):
        return pipe(prompt="a cat", **GEN, **kw).images


def test_kontext_draws_host_noise_where_the_pipeline_sizes_it(tmp_path):
    from PIL import Image

    base = tiny_flux_pipeline(kontext=True)
    f = _peft_file(tmp_path / "k.safetensors", base.transformer, seed=3)
    ours, theirs = lorablend.DiffusionPipeline(copy.deepcopy(base)), copy.deepcopy(base)
    ours.load_lora_weights(f, adapter_name="k")
    theirs.load_lora_weights(f, adapter_name="k")
    kw = dict(image=Image.new("RGB", (32, 32), (120, 30, 200)), _auto_resize=False, max_area=32 * 32)
    got = ours(prompt="a cat", generator=_seed(5), **GEN, **kw).images
    np.testing.assert_allclose(got, _theirs(theirs, _seed(5), **kw), atol=IMAGE_TOL, rtol=0)
    again = ours(prompt="a cat", generator=[_seed(5)], **GEN, **kw).images  # one generator per image: the same noise
    np.testing.assert_allclose(again, got, atol=1e-6, rtol=0)


def _kohya_flux_file(path, seed: int, rank: int = 4, dim: int = 32, mlp: int = 128, double: int = 2, single: int = 2):
    """A kohya sd-scripts Flux LoRA with BFL names for the tiny transformer (fused qkv and linear1 rows)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {}
    for i in range(double):
        for s in ("img", "txt"):
            shapes.update({f"double_blocks_{i}_{s}_attn_qkv": (dim, 3 * dim), f"double_blocks_{i}_{s}_attn_proj": (dim, dim),
                           f"double_blocks_{i}_{s}_mlp_0": (dim, mlp), f"double_blocks_{i}_{s}_mlp_2": (mlp, dim),
                           f"double_blocks_{i}_{s}_mod_lin": (dim, 6 * dim)})
    for i in range(single):
        shapes.update({f"single_blocks_{i}_linear1": (dim, 3 * dim + mlp), f"single_blocks_{i}_linear2": (dim + mlp, dim),
                       f"single_blocks_{i}_modulation_lin": (dim, 3 * dim)})
    sd = {}
    for name, (fan_in, fan_out) in shapes.items():
        sd[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, fan_in, generator=g) * 0.2
        sd[f"lora_unet_{name}.lora_up.weight"] = torch.randn(fan_out, rank, generator=g) * 0.2
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(float(rank) / 2)
    save_file(sd, str(path))
    return str(path), len(sd)


# BFL name -> [(diffusers module, rows)] for the tiny transformer (written out by hand, independently of naming/)
def _bfl_to_diffusers(dim: int = 32, mlp: int = 128, double: int = 2, single: int = 2) -> dict:
    table = {}
    for i in range(double):
        b = f"transformer_blocks.{i}"
        for s, (q, k, v, out, ff, norm) in {
            "img": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff", "norm1.linear"),
            "txt": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff_context",
                    "norm1_context.linear"),
        }.items():
            table[f"double_blocks_{i}_{s}_attn_qkv"] = [(f"{b}.{m}", slice(j * dim, (j + 1) * dim))
                                                      for j, m in enumerate((q, k, v))]
            table[f"double_blocks_{i}_{s}_attn_proj"] = [(f"{b}.{out}", slice(None))]
            table[f"double_blocks_{i}_{s}_mlp_0"] = [(f"{b}.{ff}.net.0.proj", slice(None))]
            table[f"double_blocks_{i}_{s}_mlp_2"] = [(f"{b}.{ff}.net.2", slice(None))]
            table[f"double_blocks_{i}_{s}_mod_lin"] = [(f"{b}.{norm}", slice(None))]
    for i in range(single):
        b = f"single_transformer_blocks.{i}"
        table[f"single_blocks_{i}_linear1"] = [(f"{b}.{m}", slice(j * dim, (j + 1) * dim))
                                               for j, m in enumerate(("attn.to_q", "attn.to_k", "attn.to_v"))]
        table[f"single_blocks_{i}_linear1"].append((f"{b}.proj_mlp", slice(3 * dim, 3 * dim + mlp)))
        table[f"single_blocks_{i}_linear2"] = [(f"{b}.proj_out", slice(None))]
        table[f"single_blocks_{i}_modulation_lin"] = [(f"{b}.norm.linear", slice(None))]
    return table


def test_kohya_flux_file_gives_the_image_of_its_rows_split_by_hand(tmp_path, flux):
    """kohya's fused q/k/v (and single-block linear1) LoRA: one down shared by the split up rows. diffusers reads
    such files only at the real widths (its converter hard-codes 3072 / 12288), so the oracle here is diffusers +
    PEFT on a diffusers-named file split by hand from the same tensors (the scale folded into lora_B)."""
    path, n_keys = _kohya_flux_file(tmp_path / "kohya.safetensors", seed=7)
    from safetensors.torch import load_file

    kohya, split = load_file(path), {}
    for bfl, targets in _bfl_to_diffusers().items():
        down, up = kohya[f"lora_unet_{bfl}.lora_down.weight"], kohya[f"lora_unet_{bfl}.lora_up.weight"]
        scale = float(kohya[f"lora_unet_{bfl}.alpha"]) / down.shape[0]
        for module, rows in targets:
            split[f"transformer.{module}.lora_A.weight"] = down.clone()
            split[f"transformer.{module}.lora_B.weight"] = (up[rows] * scale).contiguous()
    save_file(split, str(tmp_path / "split.safetensors"))
    ours, theirs = lorablend.DiffusionPipeline(copy.deepcopy(flux)), copy.deepcopy(flux)
    report = ours.load_lora_weights(path, adapter_name="k")
    assert f"{n_keys} keys mapped, 0 unsupported, 0 unknown" in str(report)
    theirs.load_lora_weights(str(tmp_path / "split.safetensors"), adapter_name="k")
    got = ours(prompt="a cat", generator=_seed(), **GEN).images
    np.testing.assert_allclose(got, _theirs(theirs, _seed()), atol=IMAGE_TOL, rtol=0)
    ours.disable_lora()
    assert np.abs(got - ours(prompt="a cat", generator=_seed(), **GEN).images).max() > 20 * IMAGE_TOL


def test_per_block_weights_on_flux_equal_a_file_cut_to_those_blocks(tmp_path, flux):
    """{"D01": 0.8, "S00": -0.5} and every other block 0 (BASE included) gives the image of a file that holds
    only those blocks' keys at those weights (checked with diffusers + PEFT)."""
    full = _peft_file(tmp_path / "full.safetensors", flux.transformer, seed=4)
    from safetensors.torch import load_file

    sd = load_file(full)
    cut = {k: (v * 0.8 if ".lora_B." in k and ".transformer_blocks.1." in k else
               v * -0.5 if ".lora_B." in k and "single_transformer_blocks.0." in k else v)
           for k, v in sd.items() if ".transformer_blocks.1." in k or "single_transformer_blocks.0." in k}
    cut = {k: v for k, v in cut.items() if not k.startswith("transformer.single_transformer_blocks.1")}
    save_file(cut, str(tmp_path / "cut.safetensors"))
    ours, theirs = lorablend.DiffusionPipeline(copy.deepcopy(flux)), copy.deepcopy(flux)
    ours.load_lora_weights(full, adapter_name="f")
    ours.set_adapters("f", {"D01": 0.8, "S00": -0.5, "D00": 0.0, "S01": 0.0, "BASE": 0.0, "FINAL": 0.0})
    theirs.load_lora_weights(str(tmp_path / "cut.safetensors"), adapter_name="c")
    got = ours(prompt="a cat", generator=_seed(), **GEN).images
    np.testing.assert_allclose(got, _theirs(theirs, _seed()), atol=IMAGE_TOL, rtol=0)


def test_a_norm_scale_diff_applies_unfused_and_fused_like_the_edited_weight(flux):
    """kohya / control LoRAs carry diffs of the q/k RMSNorm scales (diffusers drops them): unfused, the hook adds
    n(x) · ΔW; fused, the weight moves; both give the image of a pipeline whose norm weights were edited by hand."""
    from lorablend.adapter import Adapter, FullDelta

    pipe = lorablend.DiffusionPipeline(copy.deepcopy(flux))
    norms = [k for k, info in pipe.model_view.index.modules.items() if info.kind == "norm"]
    assert len(norms) == 12  # norm_q / norm_k / norm_added_q / norm_added_k of 2 double blocks, q / k of 2 single
    g = torch.Generator().manual_seed(9)
    deltas = {k: FullDelta(diff=torch.randn(pipe.model_view.module(k).weight.shape, generator=g)) for k in norms}
    pipe.load_lora_weights(Adapter("norms", "flux", deltas), adapter_name="norms")
    pipe.set_adapters("norms", 0.6)
    unfused = pipe(prompt="a cat", generator=_seed(), **GEN).images
    edited = copy.deepcopy(flux)
    with torch.no_grad():
        for k, d in deltas.items():
            edited.transformer.get_submodule(k.split(".", 1)[1]).weight.add_(d.diff, alpha=0.6)
    want = _theirs(edited, _seed())
    np.testing.assert_allclose(unfused, want, atol=IMAGE_TOL, rtol=0)
    before = params_of(pipe)
    pipe.fuse_lora()
    np.testing.assert_allclose(pipe(prompt="a cat", generator=_seed(), **GEN).images, want, atol=IMAGE_TOL, rtol=0)
    pipe.unfuse_lora()
    assert_params_equal(pipe, before)
    assert np.abs(unfused - _theirs(copy.deepcopy(flux), _seed())).max() > 10 * IMAGE_TOL  # (0.015 seen)


def test_lora_biases_apply_unfused_as_fused(tmp_path, flux):
    """A LoRA with lora_B.bias (BFL control LoRAs have one on every layer) or a kohya diff_b: the unfused forward
    adds the weighted bias as fusing writes it; PEFT's oracle reads lora_B.bias from a diffusers-named file."""
    from safetensors.torch import load_file

    path = _peft_file(tmp_path / "b.safetensors", flux.transformer, seed=6, targets=("attn.to_q", "proj_mlp"))
    sd, g = load_file(path), torch.Generator().manual_seed(1)
    for k in [k for k in sd if k.endswith("lora_B.weight")]:
        sd[k.replace("lora_B.weight", "lora_B.bias")] = torch.randn(sd[k].shape[0], generator=g)
    save_file(sd, str(tmp_path / "bias.safetensors"))
    pipe = lorablend.DiffusionPipeline(copy.deepcopy(flux))
    pipe.load_lora_weights(str(tmp_path / "bias.safetensors"), adapter_name="b")
    pipe.set_adapters("b", 0.7)
    unfused = pipe(prompt="a cat", generator=_seed(), **GEN).images
    pipe.fuse_lora()
    fused = pipe(prompt="a cat", generator=_seed(), **GEN).images
    np.testing.assert_allclose(unfused, fused, atol=IMAGE_TOL, rtol=0)
    pipe.unfuse_lora()
    no_bias = lorablend.DiffusionPipeline(copy.deepcopy(flux))
    no_bias.load_lora_weights(path, adapter_name="b")
    no_bias.set_adapters("b", 0.7)
    assert np.abs(unfused - no_bias(prompt="a cat", generator=_seed(), **GEN).images).max() > 10 * IMAGE_TOL


def _control_lora_file(path, flux) -> str:
    """A control LoRA for the tiny transformer: x_embedder reads twice its inputs (noise + control latents)."""
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


def test_a_control_lora_is_refused_on_a_plain_pipeline_and_applied_on_a_control_one(tmp_path, flux):
    from diffusers import FluxControlPipeline
    from PIL import Image

    from lorablend.errors import LoraCompatibilityError
    from lorablend.pipeline import _seeded_for_the_rest

    path = _control_lora_file(tmp_path / "control.safetensors", flux)
    plain = lorablend.DiffusionPipeline(copy.deepcopy(flux))
    before = params_of(plain)
    with pytest.raises(LoraCompatibilityError, match="control LoRA.*FluxControlPipeline"):
        plain.load_lora_weights(path, adapter_name="c")
    assert_params_equal(plain, before)
    assert not plain.get_list_adapters() and plain.transformer.x_embedder.in_features == 4
    ours = lorablend.DiffusionPipeline(FluxControlPipeline.from_pipe(copy.deepcopy(flux)))
    theirs = FluxControlPipeline.from_pipe(copy.deepcopy(flux))
    ours.load_lora_weights(path, adapter_name="c")
    theirs.load_lora_weights(path, adapter_name="c")  # diffusers widens x_embedder the same way
    assert ours.transformer.x_embedder.in_features == 8 == ours.transformer.config.in_channels
    control = Image.new("RGB", (32, 32), (200, 10, 90))
    got = ours(prompt="a cat", control_image=control, generator=_seed(), **GEN).images
    want = _theirs(theirs, _seed(), control_image=control, generator=_seeded_for_the_rest(_seed(), "cpu"))
    np.testing.assert_allclose(got, want, atol=IMAGE_TOL, rtol=0)
    again = ours(prompt="a cat", control_image=control, generator=_seed(), **GEN).images
    np.testing.assert_allclose(again, got, atol=1e-6, rtol=0)  # the control image's VAE sample is seeded too


def test_compiled_flux_transformer_switches_with_one_graph_and_refuses_a_norm_delta(tmp_path, flux):
    """Static mode on a transformer: one graph, no break, no recompile across mixes; outputs = eager; a delta on a
    norm's scale (no buffer for it) is refused at the switch with the way out (fuse it)."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    from lorablend.adapter import Adapter, FullDelta

    pipe = lorablend.DiffusionPipeline(copy.deepcopy(flux))
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        pipe.load_lora_weights(_peft_file(tmp_path / f"{name}.safetensors", flux.transformer, seed, rank=2 + seed),
                               adapter_name=name)
    mixes = [(["a", "b"], [0.5, 0.5]), (["c"], [1.0]), (["a", "c"], [0.3, -0.7]), (["b"], [0.9])]
    eager = []
    for names, weights in mixes:
        pipe.set_adapters(names, weights)
        eager.append(pipe(prompt="a cat", generator=_seed(), **GEN).images)
    dynamo.reset()
    counters.clear()
    static = pipe.compile_denoiser(backend="eager", fullgraph=False)
    for (names, weights), want in zip(mixes, eager):
        pipe.set_adapters(names, weights)
        np.testing.assert_allclose(pipe(prompt="a cat", generator=_seed(), **GEN).images, want, atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"] and not counters["recompiles"]
    key = next(k for k, info in pipe.model_view.index.modules.items() if info.kind == "norm")
    shape = pipe.model_view.module(key).weight.shape
    pipe.load_lora_weights(Adapter("n", "flux", {key: FullDelta(diff=torch.ones(shape))}), adapter_name="n")
    with pytest.raises(ValueError, match="norm's scale.*Fuse it"):
        pipe.set_adapters(["a", "n"], [1.0, 1.0])
        static.sync()
    static.close()


@pytest.mark.parametrize("prefix", ["lora_te3", "lora_te2"])  # sd-scripts / OneTrainer names for Flux's T5
def test_t5_keys_in_either_trainers_prefix_map_to_text_encoder_2(tmp_path, flux, prefix):
    pipe = lorablend.DiffusionPipeline(copy.deepcopy(flux))
    keys = [k for k, info in pipe.model_view.index.modules.items() if info.component == "text_encoder_2"][:3]
    g, sd = torch.Generator().manual_seed(2), {}
    for key in keys:
        m, name = pipe.model_view.module(key), f"{prefix}_" + key.split(".", 1)[1].replace(".", "_")
        sd[f"{name}.lora_down.weight"] = torch.randn(2, m.in_features, generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(m.out_features, 2, generator=g)
    save_file(sd, str(tmp_path / "t5.safetensors"))
    report = pipe.load_lora_weights(str(tmp_path / "t5.safetensors"), adapter_name="t5")
    assert "6 keys mapped, 0 unsupported, 0 unknown" in str(report)
    assert pipe.get_list_adapters() == {"text_encoder_2": ["t5"]}
