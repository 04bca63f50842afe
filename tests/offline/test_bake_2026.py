"""Baking LoRAs into single-file Wan, Qwen-Image, Flux.2, Chroma and Z-Image transformers in their own names (ComfyUI's split
files: ``blocks.0.self_attn.q.weight``, ``transformer_blocks.0.img_mod.1.weight``, BFL's ``double_blocks.0.img_attn.qkv``
with its fused rows, Z-Image's ``layers.0.attention.qkv``; with or without ``model.diffusion_model.``): bit for bit what fusing on the tiny pipeline and writing in those names gives. The
single file is written here from the pipeline's transformer through the index's original names (naming/fused.py,
whose Wan names tests/io/test_load_2026_oracle.py checks against diffusers' converters)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorablend import Adapter, DiffusionPipeline, LowRankDelta
from lorablend.errors import LoraFormatError
from lorablend.offline.bake import bake
from lorablend.offline.checkpoint import checkpoint_layout

tiny = pytest.importorskip("lorablend.fixtures.tiny_2026")


def original_state_dict(pipe: DiffusionPipeline, prefix: str = "") -> dict[str, torch.Tensor]:
    """The transformer's tensors in its original names, a fused layer's modules placed at their rows (a module
    without an original name, or a parameter that is no module's weight, keeps its diffusers name: Wan's patch
    embedding and modulation tables); BFL's RMSNorm weights as ``.scale``."""
    index = pipe.model_view.index
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], list] = {}
    for name, tensor in pipe.transformer.state_dict().items():
        module, _, part = name.rpartition(".")
        original = index.original_name(f"transformer.{module}")
        if original is None:
            out[prefix + name] = tensor.detach().clone().contiguous()
            continue
        fused.setdefault((original[0], part), []).append((original[1], tensor.detach()))
    for (stem, part), pieces in fused.items():
        if part == "weight" and stem.endswith(("query_norm", "key_norm")):
            part = "scale"
        if len(pieces) == 1 and pieces[0][0] is None:
            out[f"{prefix}{stem}.{part}"] = pieces[0][1].clone().contiguous()
            continue
        rows = max(b for spans, _ in pieces for _, b in spans)
        whole = torch.zeros(rows, *pieces[0][1].shape[1:], dtype=pieces[0][1].dtype)
        for spans, t in pieces:
            at = 0
            for a, b in spans:
                whole[a:b] = t[at:at + b - a]
                at += b - a
        out[f"{prefix}{stem}.{part}"] = whole
    return out


@pytest.mark.parametrize("family, build, prefix", [
    ("wan", lambda: tiny.tiny_wan_pipeline(torch_dtype=torch.bfloat16), ""),
    ("qwen", lambda: tiny.tiny_qwen_pipeline(torch_dtype=torch.bfloat16), "model.diffusion_model."),
    ("flux2", lambda: tiny.tiny_flux2_pipeline(klein=True, torch_dtype=torch.bfloat16), ""),
    ("chroma", lambda: tiny.tiny_chroma_pipeline(torch_dtype=torch.bfloat16), "model.diffusion_model."),
    ("zimage", lambda: tiny.tiny_zimage_pipeline(torch_dtype=torch.bfloat16), ""),
])
def test_baked_single_file_equals_pipeline_fusion(family, build, prefix, tmp_path):
    pipe = DiffusionPipeline(build())
    ckpt = tmp_path / f"{family}.safetensors"
    save_file(original_state_dict(pipe, prefix), str(ckpt))
    layout = checkpoint_layout(ckpt)
    assert layout.family == pipe.model_view.index.family
    g = torch.Generator().manual_seed(3)
    deltas = {key: LowRankDelta(torch.randn(2, info.weight_shape[1], generator=g) * 0.3,
                                torch.randn(info.weight_shape[0], 2, generator=g) * 0.3, alpha=1.0)
              for key, info in pipe.model_view.index.modules.items()
              if info.component == "transformer" and info.kind == "linear"}
    adapter = Adapter("every", layout.family, deltas)
    report = bake(ckpt, [(adapter, 0.6)], tmp_path / "baked.safetensors", lora_scale=0.9)
    assert not report.skipped and report.touched == len(deltas)
    pipe.load_lora_weights(adapter, adapter_name="every")
    pipe.set_adapters(["every"], adapter_weights=[0.6])
    pipe.fuse_lora(lora_scale=0.9)
    want, got = original_state_dict(pipe, prefix), load_file(str(tmp_path / "baked.safetensors"))
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key


def test_a_flux2_file_is_not_read_as_flux1(tmp_path):
    # Flux.2's double blocks are BFL-named like Flux.1's: its own modulation tensor tells it, and a file with only
    # part of what its config needs is refused by name
    path = tmp_path / "flux2.safetensors"
    save_file({"double_stream_modulation_img.lin.weight": torch.zeros(6, 2),
               "double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}, str(path))
    with pytest.raises(LoraFormatError, match="flux2 transformer names but not the whole transformer"):
        checkpoint_layout(path)


def test_a_wan_distillation_lora_bakes_its_modulation_tables(tmp_path):
    # a real Wan file names its tables blocks.N.modulation / head.modulation; a diff_m LoRA bakes into them with the
    # live fuse's formula (the same bits as fusing on the pipeline)
    pipe = DiffusionPipeline(tiny.tiny_wan_pipeline(torch_dtype=torch.bfloat16))
    renamed = {"scale_shift_table": "head.modulation",
               **{f"blocks.{i}.scale_shift_table": f"blocks.{i}.modulation" for i in range(len(pipe.transformer.blocks))}}
    state = {renamed.get(k, k): v for k, v in original_state_dict(pipe).items()}
    ckpt = tmp_path / "wan.safetensors"
    save_file(state, str(ckpt))
    g = torch.Generator().manual_seed(4)
    lora = {f"diffusion_model.{name[:-len('.modulation')]}.diff_m": torch.randn(tuple(state[name].shape), generator=g)
            for name in renamed.values()}
    save_file(lora, str(tmp_path / "lightning.safetensors"))
    report = bake(ckpt, [(str(tmp_path / "lightning.safetensors"), 0.7)], tmp_path / "baked.safetensors")
    assert not report.skipped and report.touched == len(renamed)
    pipe.load_lora_weights(lora, adapter_name="lightning")
    pipe.set_adapters(["lightning"], [0.7])
    pipe.fuse_lora()
    got = load_file(str(tmp_path / "baked.safetensors"))
    for diffusers_name, name in renamed.items():
        assert torch.equal(got[name], pipe.transformer.get_parameter(diffusers_name)), name
        assert not torch.equal(got[name], state[name])
