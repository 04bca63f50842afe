"""Every real 2025-26 LoRA layout (../shared/realdata/newfamily_loras/2026/keylists) read offline: the right family,
every key accounted for, files of one family never read as another, uncovered families refused by name.

Files are synthetic (seeded values) in each layout's exact names, shapes and dtypes (tests/support/keylists_2026.py);
the expanded layouts (the key sets real trainers and converters write) must map every key; the excerpts copied
from issue threads may cut a module in half, and each such key must say so.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from keylists_2026 import (KEYLISTS_2026, expected_family, layout, layouts, requires_2026, shape_from_family,
                           state_dict)
from lorablend.errors import LoraFormatError
from lorablend.io.load import load_adapter
from lorablend.naming import standard_index

pytestmark = requires_2026

_EXCERPT_REASONS = ("incomplete module", "no weights for this module")


def _layout_file(stem: str) -> dict[str, torch.Tensor]:
    family = expected_family(stem)
    return state_dict(stem, shape_from_family(family or "flux"))


# every layout but the HunyuanVideo excerpt, whose outcome test_hunyuanvideo states
_WALKED = [s for s in layouts() if not s.startswith("hunyuanvideo_")] if KEYLISTS_2026.is_dir() else []


@pytest.mark.parametrize("stem", _WALKED)
def test_every_layout_reads_as_its_family(stem):
    family = expected_family(stem)
    sd = _layout_file(stem)
    if family is None:
        with pytest.raises(LoraFormatError, match="does not cover HiDream-I1"):
            load_adapter(sd)
        return
    entry = layout(stem)
    excerpt = entry.get("complete") is False
    try:
        adapter = load_adapter(sd)
    except LoraFormatError as err:  # only an excerpt whose every layer other models have as well may be ambiguous
        assert excerpt and "ambiguous" in str(err) and family in str(err), str(err)
        adapter = load_adapter(sd, family=family)
    assert adapter.family == family, (adapter.family, adapter.also_fits)
    records = {r.key: r for r in adapter.report.records}
    assert set(records) == set(sd), "every key is accounted for"
    idx = standard_index(adapter.family)
    for rec in records.values():
        if rec.status == "mapped":
            assert rec.target in idx.modules
    not_mapped = [r for r in records.values() if r.status != "mapped"]
    if not excerpt:
        assert not not_mapped, not_mapped[:3]
    elif stem != "zimage_kohya-fused-and-split__diffusers-issue13203":
        assert all(r.reason.startswith(_EXCERPT_REASONS) for r in not_mapped), not_mapped[:3]


def test_fused_layers_split_by_rows():
    # Flux.2 klein 9B in musubi's names: img_attn.qkv's 12288 rows are to_q / to_k / to_v, 4096 each
    adapter = load_adapter(state_dict("flux2-klein-9b_kohya__musubi-tuner-expanded"))
    qkv = "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"
    rec = next(r for r in adapter.report.records if r.key == qkv)
    assert "to_k rows 4096:8192" in rec.reason
    sd = state_dict("flux2-klein-9b_kohya__musubi-tuner-expanded")
    down, up = sd[qkv.replace("lora_up", "lora_down")].float(), sd[qkv].float()
    alpha = float(sd[qkv.replace("lora_up.weight", "alpha")].float())
    whole = (alpha / down.shape[0]) * (up @ down)
    for i, proj in enumerate(("to_q", "to_k", "to_v")):
        got = adapter.deltas[f"transformer.transformer_blocks.0.attn.{proj}"].delta_weight()
        assert torch.equal(got, whole[4096 * i: 4096 * (i + 1)])
    # a single block's linear1 stays fused: diffusers' to_qkv_mlp_proj is one Linear
    assert adapter.deltas["transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj"].shape == (36864, 4096)


def test_zimage_comfy_fused_qkv_with_block_sparse_up():
    # ComfyUI-native Z-Image: attention_qkv's down stacks q / k / v downs [3r, 3840], its up is block-diagonal
    # [11520, 3r] and its alpha is 3x the split one: each of to_q / to_k / to_v gets exactly its own LoRA back
    r, dim, g = 2, 3840, torch.Generator().manual_seed(0)
    downs = [torch.randn(r, dim, generator=g) for _ in range(3)]
    ups = [torch.randn(dim, r, generator=g) for _ in range(3)]
    sparse = torch.zeros(3 * dim, 3 * r)
    for i, up in enumerate(ups):
        sparse[i * dim:(i + 1) * dim, i * r:(i + 1) * r] = up
    name = "lora_unet_layers_0_attention_qkv"
    sd = {f"{name}.lora_down.weight": torch.cat(downs), f"{name}.lora_up.weight": sparse,
          f"{name}.alpha": torch.tensor(3.0 * 4), "lora_unet_layers_0_attention_out.lora_down.weight": downs[0],
          "lora_unet_layers_0_attention_out.lora_up.weight": ups[0],
          "lora_unet_layers_0_attention_out.alpha": torch.tensor(4.0)}
    adapter = load_adapter(sd)
    assert adapter.family == "z-image" and adapter.report.complete
    for i, proj in enumerate(("to_q", "to_k", "to_v")):
        got = adapter.deltas[f"transformer.layers.0.attention.{proj}"].delta_weight()
        torch.testing.assert_close(got, (4.0 / r) * ups[i] @ downs[i], rtol=1e-5, atol=1e-6)
    assert "transformer.layers.0.attention.to_out.0" in adapter.deltas


def _wan21_i2v_file() -> dict[str, torch.Tensor]:
    """A Wan 2.1 I2V LoRA in ComfyUI names with what distillation LoRAs add: norm_k_img and img_emb deltas."""
    sd = state_dict("wan21-i2v-14b_comfy__musubi-convert-lora-other-expanded")
    g = torch.Generator().manual_seed(1)
    sd["diffusion_model.blocks.0.cross_attn.norm_k_img.diff"] = torch.randn(5120, generator=g).bfloat16()
    sd["diffusion_model.img_emb.proj.1.lora_down.weight"] = torch.randn(2, 1280, generator=g).bfloat16()
    sd["diffusion_model.img_emb.proj.1.lora_up.weight"] = torch.randn(1280, 2, generator=g).bfloat16()
    sd["diffusion_model.blocks.0.cross_attn.k_img.diff_b"] = torch.randn(5120, generator=g).bfloat16()
    return sd


def test_wan21_i2v_lora_on_wan22_i2v_reports_exactly_the_image_keys():
    sd = _wan21_i2v_file()
    alone = load_adapter(sd)
    assert alone.family == "wan-i2v-14b" and alone.report.complete
    on_22 = load_adapter(sd, target=standard_index("wan-14b"))  # Wan 2.2 I2V A14B: each expert is this tree
    image_keys = {k for k in sd if any(s in k for s in ("k_img", "v_img", "norm_k_img", "img_emb"))}
    not_mapped = {r.key: r for r in on_22.report.records if r.status != "mapped"}
    assert set(not_mapped) == image_keys
    assert all(r.status == "unsupported" and "of a Wan 2.1 I2V 14B model" in r.reason for r in not_mapped.values())


def test_qwen_image_in_comfyui_names_is_not_flux():
    peft = state_dict("qwenimage_kohya__musubi-tuner-expanded")
    comfy = {}
    idx = standard_index("qwen-image")
    for key, t in peft.items():  # the same modules in ComfyUI's spelling: diffusion_model. + diffusers path
        flat, _, suffix = key.partition(".")
        path = idx.modules[idx.lookup_kohya(flat)].path
        comfy[f"diffusion_model.{path}.{suffix}"] = t
    adapter = load_adapter(comfy)
    assert adapter.family == "qwen-image" and adapter.report.complete and not adapter.also_fits


def test_the_same_names_on_other_widths_are_other_families():
    # Wan's names at 1536 / 3072 / 5120 wide; Flux.2's BFL names at 3072 / 4096 / 6144: never one another
    for stem, family in (("wan21-t2v-1.3b_kohya__musubi-tuner-expanded", "wan-1.3b"),
                         ("wan22-ti2v-5b_kohya__musubi-tuner-expanded", "wan-5b"),
                         ("flux2-klein-4b_kohya__musubi-tuner-expanded", "flux2-klein-4b"),
                         ("flux2-dev_kohya__musubi-tuner-expanded", "flux2-dev")):
        adapter = load_adapter(state_dict(stem))
        assert adapter.family == family and not adapter.also_fits


def test_hunyuanvideo():
    # The excerpt's 51 keys (double blocks 2-15, guidance_in) are BFL names with Flux.1's exact widths: nothing in
    # it tells HunyuanVideo from Flux.1, so it reads as Flux.1 (known limit). A HunyuanVideo file names its 20th
    # double block or its token refiner, which no covered family has: refused by name.
    sd = _layout_file("hunyuanvideo_comfy-diff__hyvideowrapper-issue468")
    assert load_adapter(sd).family == "flux"
    for key in ("diffusion_model.double_blocks.19.img_attn.qkv.lora_down.weight",
                "diffusion_model.img_in.proj.lora_down.weight", "lora_unet_img_in_proj.lora_down.weight"):
        with pytest.raises(LoraFormatError, match="a HunyuanVideo LoRA .* does not cover HunyuanVideo"):
            load_adapter({**sd, key: torch.zeros(2, 3072)})


@pytest.mark.parametrize("name", ["diffusion_model.single_blocks.{}.linear2", "lora_unet_single_blocks_{}_linear2"])
def test_a_deeper_model_with_flux_names_is_refused_not_half_applied(name):
    # HunyuanVideo has 40 single blocks at Flux.1's width (Flux.1: 38): a file of single blocks only names no layer
    # that HunyuanVideo alone has, but its blocks 38 and 39 fit Flux.1's block 0 by shape — refused, nothing read.
    # Flux.2 dev's single_blocks.38-47 (6144 wide) and a Flux.1 file of blocks 0-37 still read as their models.
    def single_blocks(n: int, width: int, inputs: int) -> dict:  # linear2 reads attention + MLP: width + mlp
        return {f"{name.format(i)}.{part}": t for i in range(n) for part, t in
                (("lora_down.weight", torch.zeros(2, inputs)), ("lora_up.weight", torch.zeros(width, 2)))}

    with pytest.raises(LoraFormatError, match=r"single_blocks.38.linear2' is in a block the Flux.1 model does not "
                                              r"have.*HunyuanVideo.*nothing is loaded"):
        load_adapter(single_blocks(40, 3072, 15360))
    assert load_adapter(single_blocks(38, 3072, 15360)).family == "flux"
    assert load_adapter(single_blocks(48, 6144, 24576)).family == "flux2-dev"


def test_a_file_that_fits_several_models_is_refused_and_read_with_family(tmp_path):
    # InvokeAI's Qwen-Image fixture: to_q / to_k of two blocks at width 3072, which Flux.1, Qwen-Image, Flux.2 klein 4B
    # and Chroma all have: never read as the first of them; family= says which
    sd = _layout_file("qwenimage_diffusers-bare-downup__invokeai-testfixture")
    with pytest.raises(LoraFormatError, match=r"ambiguous: its layers fit flux, qwen-image, flux2-klein-4b, chroma .*"
                                              r"family='qwen-image'"):
        load_adapter(sd)
    adapter = load_adapter(sd, family="qwen-image")
    assert adapter.family == "qwen-image" and adapter.report.counts()["mapped"] == len(sd)
    assert load_adapter(sd, family="flux").family == "flux"  # the caller's word is taken
    with pytest.raises(ValueError, match="family='qwen' is not a family lorablend covers; choose one of sd1"):
        load_adapter(sd, family="qwen")
    with pytest.raises(LoraFormatError, match="none of its layers is a layer of sd1"):
        load_adapter(sd, family="sd1")
    # a file that says its model in its metadata (kohya's / lorablend's modelspec.architecture) is read as that model
    save_file(sd, str(tmp_path / "q.safetensors"), metadata={"modelspec.architecture": "qwen-image/lora"})
    assert load_adapter(tmp_path / "q.safetensors").family == "qwen-image"
    # a tie inside one model's line is no ambiguity: a Wan 2.1 T2V 14B file fits the I2V 14B too and reads as T2V
    wan = load_adapter(_layout_file("wan21-t2v-14b_kohya__musubi-tuner-expanded"))
    assert wan.family == "wan-14b" and wan.also_fits == ("wan-i2v-14b",)


def test_distillation_deltas():
    # lightx2v / Kijai: head.head.diff is proj_out's whole ΔW, diff_b a bias ΔW, diff_m a block's modulation table
    g = torch.Generator().manual_seed(2)
    sd = {"diffusion_model.head.head.diff": torch.randn(64, 1536, generator=g),
          "diffusion_model.head.head.diff_b": torch.randn(64, generator=g),
          "diffusion_model.blocks.0.diff_m": torch.randn(1, 6, 1536, generator=g),
          "diffusion_model.blocks.0.self_attn.q.diff": torch.randn(1536, 1536, generator=g)}
    adapter = load_adapter(sd)
    assert adapter.family == "wan-1.3b"
    assert torch.equal(adapter.deltas["transformer.proj_out"].delta_weight(), sd["diffusion_model.head.head.diff"])
    assert torch.equal(adapter.deltas["transformer.proj_out"].delta_bias(), sd["diffusion_model.head.head.diff_b"])
    # diff_m: the block's modulation table (diffusers' scale_shift_table), its ΔT the tensor itself
    diff_m = next(r for r in adapter.report.records if r.key.endswith("diff_m"))
    assert diff_m.status == "mapped" and diff_m.target == "transformer.blocks.0.scale_shift_table"
    assert torch.equal(adapter.deltas[diff_m.target].delta_weight(), sd["diffusion_model.blocks.0.diff_m"])


def test_kohya_prefix_spellings():
    # lora_unet__ (a double underscore) and lycoris_ read as lora_unet_
    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(2, 1536, generator=g), torch.randn(1536, 2, generator=g)
    for prefix in ("lora_unet__", "lycoris_"):
        adapter = load_adapter({f"{prefix}blocks_0_self_attn_q.lora_down.weight": down,
                                f"{prefix}blocks_0_self_attn_q.lora_up.weight": up})
        assert adapter.family == "wan-1.3b" and list(adapter.deltas) == ["transformer.blocks.0.attn1.to_q"]
