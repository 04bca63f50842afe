"""Baking LoRAs into a single-file Flux.1 transformer in BFL names (bake.py + checkpoint.transformer_layout): the
fused q/k/v rows of ``double_blocks.N.img_attn.qkv``, the q/k/v/mlp rows of ``single_blocks.N.linear1``, the swapped
halves of ``final_layer.adaLN_modulation.1``, biases and RMSNorm ``.scale`` s; bit for bit what fusing on the pipeline
and then writing in BFL names gives.

The BFL file is written here from the tiny pipeline's transformer by a table spelled out by hand (``bfl_state_dict``),
checked against the other hand-written table of tests/test_pipeline_flux.py. diffusers' own single-file converter
(``convert_flux_transformer_checkpoint_to_diffusers``) hard-codes the 3072 width, so it can neither be the oracle
for the tiny transformer nor load a tiny baked file back."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorablend import DiffusionPipeline
from lorablend.offline.bake import bake
from lorablend.offline.checkpoint import checkpoint_layout
from lorablend.errors import LoraCompatibilityError, LoraFormatError
from lorablend.fixtures.tiny_transformers import tiny_flux_pipeline

from test_pipeline_flux import _bfl_to_diffusers, _kohya_flux_file

pytest.importorskip("diffusers")


def _pairs(width: int, double: int, single: int) -> dict[str, list[str]]:
    """BFL tensor stem -> the diffusers modules whose rows it stacks, in order."""
    table: dict[str, list[str]] = {}
    for i in range(double):
        t, s = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for side, (q, k, v, out, ff, mod, nq, nk) in {
            "img": ("to_q", "to_k", "to_v", "to_out.0", "ff", "norm1", "norm_q", "norm_k"),
            "txt": ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context", "norm1_context",
                    "norm_added_q", "norm_added_k"),
        }.items():
            table.update({s + f"{side}_attn.qkv": [t + "attn." + m for m in (q, k, v)],
                          s + f"{side}_attn.proj": [t + "attn." + out],
                          s + f"{side}_attn.norm.query_norm": [t + "attn." + nq],
                          s + f"{side}_attn.norm.key_norm": [t + "attn." + nk],
                          s + f"{side}_mlp.0": [t + ff + ".net.0.proj"], s + f"{side}_mlp.2": [t + ff + ".net.2"],
                          s + f"{side}_mod.lin": [t + mod + ".linear"]})
    for i in range(single):
        t, s = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        table.update({s + "linear1": [t + "attn.to_q", t + "attn.to_k", t + "attn.to_v", t + "proj_mlp"],
                      s + "linear2": [t + "proj_out"], s + "modulation.lin": [t + "norm.linear"],
                      s + "norm.query_norm": [t + "attn.norm_q"], s + "norm.key_norm": [t + "attn.norm_k"]})
    table.update({"time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
                  "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
                  "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
                  "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
                  "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],  # FLUX.1-dev only
                  "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
                  "img_in": ["x_embedder"], "txt_in": ["context_embedder"], "final_layer.linear": ["proj_out"],
                  "final_layer.adaLN_modulation.1": ["norm_out.linear"]})
    return table


def bfl_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A Flux transformer's weights under BFL names (every diffusers tensor used exactly once)."""
    cfg = transformer.config
    sd = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    out = {}
    for stem, modules in _pairs(cfg.num_attention_heads * cfg.attention_head_dim, cfg.num_layers,
                                cfg.num_single_layers).items():
        for part in ("weight", "bias"):
            have = [sd.pop(f"{m}.{part}") for m in modules if f"{m}.{part}" in sd]
            if not have:
                continue
            t = torch.cat(have)
            if stem == "final_layer.adaLN_modulation.1":  # diffusers (scale, shift) -> BFL (shift, scale)
                scale, shift = t.chunk(2)
                t = torch.cat([shift, scale])
            name = f"{stem}.scale" if "norm." in stem and "norm.linear" not in stem and part == "weight" else f"{stem}.{part}"
            out[name] = t.contiguous()
    assert not sd, sorted(sd)  # every tensor placed
    return out


def test_the_bfl_table_here_agrees_with_the_pipeline_tests_table():
    theirs = _bfl_to_diffusers()
    ours = _pairs(32, 2, 2)
    for name, pieces in theirs.items():
        stem = name.replace("double_blocks_", "double_blocks.").replace("single_blocks_", "single_blocks.")
        stem = stem.replace("_img_", ".img_").replace("_txt_", ".txt_").replace("_linear", ".linear")
        stem = stem.replace("_modulation_lin", ".modulation.lin").replace("_attn_qkv", "_attn.qkv")
        stem = stem.replace("_attn_proj", "_attn.proj").replace("_mlp_", "_mlp.").replace("_mod_lin", "_mod.lin")
        assert ours[stem] == [m for m, _ in pieces], name


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bakeflux")
    pipe = tiny_flux_pipeline(torch_dtype=torch.bfloat16)
    ckpt = root / "flux-tiny.safetensors"
    save_file(bfl_state_dict(pipe.transformer), str(ckpt), metadata={"format": "pt"})
    a, _ = _kohya_flux_file(root / "a.safetensors", seed=3)
    b_sd = load_file(_kohya_flux_file(root / "b_raw.safetensors", seed=4)[0])
    g = torch.Generator().manual_seed(9)
    b_sd.update({  # the swapped final modulation, a norm-scale diff and a bias difference beside fused factors
        "lora_unet_final_layer_adaLN_modulation_1.lora_down.weight": torch.randn(2, 32, generator=g) * 0.2,
        "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": torch.randn(64, 2, generator=g) * 0.2,
        "lora_unet_final_layer_adaLN_modulation_1.alpha": torch.tensor(1.0),
        "lora_unet_double_blocks_0_img_attn_norm_key_norm.diff": torch.randn(16, generator=g) * 0.1,
        "lora_unet_double_blocks_1_img_attn_qkv.diff_b": torch.randn(96, generator=g) * 0.1,
    })
    b = root / "b.safetensors"
    save_file(b_sd, str(b))
    return {"ckpt": ckpt, "a": a, "b": str(b), "root": root}


def test_layout_places_every_module_at_its_bfl_rows(flux_files):
    layout = checkpoint_layout(flux_files["ckpt"])
    assert layout.family == "flux" and layout.prefix == ""
    p = layout.placement("transformer.single_transformer_blocks.1.proj_mlp")
    assert (p.weight_key, p.bias_key, p.rows) == ("single_blocks.1.linear1.weight", "single_blocks.1.linear1.bias", (96, 224))
    p = layout.placement("transformer.norm_out.linear")
    assert p.row_spans == ((32, 64), (0, 32)) and p.weight_key == "final_layer.adaLN_modulation.1.weight"
    assert layout.placement("transformer.transformer_blocks.0.attn.norm_k").weight_key == \
        "double_blocks.0.img_attn.norm.key_norm.scale"
    assert all(layout.problem(layout.placement(k)) is None for k in layout.view.index.modules)


@pytest.mark.parametrize("lora_scale", [1.0, 0.8])
def test_baked_flux_file_equals_pipeline_fusion_written_in_bfl_names(flux_files, tmp_path, lora_scale):
    out = tmp_path / "baked.safetensors"
    report = bake(flux_files["ckpt"], [(flux_files["a"], 0.7), (flux_files["b"], 0.5)], out, lora_scale=lora_scale)
    assert report.family == "flux" and report.kind == "single_file" and not report.skipped
    pipe = DiffusionPipeline(tiny_flux_pipeline(torch_dtype=torch.bfloat16))
    pipe.load_lora_weights(flux_files["a"], adapter_name="a")
    pipe.load_lora_weights(flux_files["b"], adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.5])
    pipe.fuse_lora(lora_scale=lora_scale)
    want = bfl_state_dict(pipe.transformer)
    got = load_file(str(out))
    assert set(got) == set(want)
    before = load_file(str(flux_files["ckpt"]))
    changed = [k for k in got if not torch.equal(got[k], before[k])]
    assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.1.linear1.weight", "double_blocks.1.img_attn.qkv.bias",
            "final_layer.adaLN_modulation.1.weight", "double_blocks.0.img_attn.norm.key_norm.scale"} <= set(changed)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


def test_a_lora_with_text_encoder_layers_is_refused_unless_strict_false(flux_files, tmp_path):
    sd = load_file(flux_files["a"])
    sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(2, 32)
    sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(37, 2)
    path = tmp_path / "te.safetensors"
    save_file(sd, str(path))
    with pytest.raises(LoraCompatibilityError, match="strict"):
        bake(flux_files["ckpt"], [(path, 1.0)], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    report = bake(flux_files["ckpt"], [(path, 1.0)], tmp_path / "x.safetensors", strict=False)
    assert any("lora_te1" in s["key"] for s in report.skipped)


def test_comfyui_prefixed_flux_checkpoint_bakes_the_same(flux_files, tmp_path):
    plain = load_file(str(flux_files["ckpt"]))
    prefixed = tmp_path / "comfy.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in plain.items()}, str(prefixed))
    bake(flux_files["ckpt"], [(flux_files["a"], 1.0)], tmp_path / "p.safetensors")
    bake(prefixed, [(flux_files["a"], 1.0)], tmp_path / "c.safetensors")
    p, c = load_file(str(tmp_path / "p.safetensors")), load_file(str(tmp_path / "c.safetensors"))
    assert all(torch.equal(c["model.diffusion_model." + k], v) for k, v in p.items())


# ------------------------------------------------------------------------------------------- SD3 (SAI names)


def _sai_pairs(layers: int) -> dict[str, tuple[list[str], bool]]:
    """SAI MMDiT tensor stem -> (diffusers modules stacked in order, whether its halves are (shift, scale))."""
    table: dict[str, tuple[list[str], bool]] = {}
    for i in range(layers):
        t, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        table.update({x + "attn.qkv": ([t + "attn.to_q", t + "attn.to_k", t + "attn.to_v"], False),
                      x + "attn.proj": ([t + "attn.to_out.0"], False), x + "mlp.fc1": ([t + "ff.net.0.proj"], False),
                      x + "mlp.fc2": ([t + "ff.net.2"], False), x + "adaLN_modulation.1": ([t + "norm1.linear"], False),
                      c + "attn.qkv": ([t + "attn.add_q_proj", t + "attn.add_k_proj", t + "attn.add_v_proj"], False),
                      c + "attn.proj": ([t + "attn.to_add_out"], False),
                      c + "mlp.fc1": ([t + "ff_context.net.0.proj"], False), c + "mlp.fc2": ([t + "ff_context.net.2"], False),
                      c + "adaLN_modulation.1": ([t + "norm1_context.linear"], i == layers - 1)})  # last: pre-only
    table.update({"x_embedder.proj": (["pos_embed.proj"], False), "context_embedder": (["context_embedder"], False),
                  "t_embedder.mlp.0": (["time_text_embed.timestep_embedder.linear_1"], False),
                  "t_embedder.mlp.2": (["time_text_embed.timestep_embedder.linear_2"], False),
                  "y_embedder.mlp.0": (["time_text_embed.text_embedder.linear_1"], False),
                  "y_embedder.mlp.2": (["time_text_embed.text_embedder.linear_2"], False),
                  "final_layer.linear": (["proj_out"], False), "final_layer.adaLN_modulation.1": (["norm_out.linear"], True)})
    return table


def sai_state_dict(transformer: torch.nn.Module, prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    """An SD3 transformer's weights under SAI's names (every diffusers tensor used exactly once)."""
    sd = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    out = {prefix + "pos_embed": sd.pop("pos_embed.pos_embed")}
    for stem, (modules, swapped) in _sai_pairs(transformer.config.num_layers).items():
        for part in ("weight", "bias"):
            have = [sd.pop(f"{m}.{part}") for m in modules if f"{m}.{part}" in sd]
            if have:
                t = torch.cat(have)
                out[f"{prefix}{stem}.{part}"] = torch.cat(t.chunk(2)[::-1]).contiguous() if swapped else t
    assert not sd, sorted(sd)
    return out


def test_baked_sd3_file_equals_pipeline_fusion_written_in_sai_names(tmp_path):
    from lorablend import Adapter, LowRankDelta
    from lorablend.fixtures.tiny_transformers import tiny_sd3_pipeline

    pipe = DiffusionPipeline(tiny_sd3_pipeline(torch_dtype=torch.bfloat16))
    ckpt = tmp_path / "sd3-tiny.safetensors"
    save_file(sai_state_dict(pipe.transformer), str(ckpt))
    g = torch.Generator().manual_seed(2)
    deltas = {}
    for key, info in pipe.model_view.index.modules.items():
        if info.component == "transformer" and info.kind == "linear":
            out, fan_in = info.weight_shape
            deltas[key] = LowRankDelta(torch.randn(2, fan_in, generator=g) * 0.3, torch.randn(out, 2, generator=g) * 0.3,
                                       alpha=1.0)
    adapter = Adapter("every", "sd3", deltas)
    report = bake(ckpt, [(adapter, 0.6)], tmp_path / "baked.safetensors", lora_scale=0.9)
    assert report.family == "sd3" and not report.skipped and report.touched == len(deltas)
    pipe.load_lora_weights(adapter, adapter_name="every")
    pipe.set_adapters(["every"], adapter_weights=[0.6])
    pipe.fuse_lora(lora_scale=0.9)
    want, got = sai_state_dict(pipe.transformer), load_file(str(tmp_path / "baked.safetensors"))
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key
    before = load_file(str(ckpt))
    assert not torch.equal(got["model.diffusion_model.final_layer.adaLN_modulation.1.weight"],
                           before["model.diffusion_model.final_layer.adaLN_modulation.1.weight"])


def test_a_bfl_file_missing_what_its_config_needs_is_refused_by_name(tmp_path):
    path = tmp_path / "part.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(96, 32)}, str(path))
    with pytest.raises(LoraFormatError, match="not the whole transformer"):
        checkpoint_layout(path)


def test_a_kohya_flux_file_read_on_a_tiny_pipeline_is_written_back_bit_for_bit(flux_files):
    from lorablend.io import load_adapter
    from lorablend.io.write import adapter_state_dict

    pipe = tiny_flux_pipeline()
    original = load_file(flux_files["b"])
    written, _ = adapter_state_dict(load_adapter(flux_files["b"], target=pipe), "kohya", target=pipe)
    assert set(written) == set(original)
    assert all(torch.equal(written[k], v) for k, v in original.items())
