"""Parity with diffusers' own Flux converters (``FluxLoraLoaderMixin.lora_state_dict``: no pipeline needed) on
files with the real Flux layouts: where diffusers reads a layout, each module's ΔW is the ΔW of the lora_A / lora_B
pair it returns; where it drops keys (diff / diff_b / norm diffs, T5, dora_scale, the ai-toolkit names), a test
says so and that we keep them; where it is wrong (the control LoRA's final modulation), the formula decides."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from lorablend.io import load_adapter

from conftest import assert_same_computed
from flux_keylists import probe, requires_keylists, state_dict

pytestmark = requires_keylists
diffusers_loaders = pytest.importorskip("diffusers.loaders")

_PAIR = re.compile(r"^(?P<mod>.+?)\.(?:(?P<peft>lora_[AB])|(?:lora_linear_layer|(?P<proj>to_[qkv]|to_out)_lora)\.(?P<ud>down|up))"
                   r"\.(?P<what>weight|bias)$")
_TEXT_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}  # diffusers' old names


def diffusers_reads(tmp_path, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    path = tmp_path / "lora.safetensors"
    save_file(sd, str(path))
    return diffusers_loaders.FluxLoraLoaderMixin.lora_state_dict(str(path))


def diffusers_pairs(converted: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers' converted keys -> {our target key: {"A", "B", "bias"}}; CLIP paths keep ``text_model.``."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in converted.items():
        m = _PAIR.match(key)
        if m is None:
            continue
        role = {"lora_A": "A", "lora_B": "B", "down": "A", "up": "B"}[m["peft"] or m["ud"]]
        module = m["mod"] + ("." + _TEXT_PROJ[m["proj"]] if m["proj"] else "")
        pairs.setdefault(module, {})["bias" if m["what"] == "bias" else role] = t
    return pairs


def their_delta(pair: dict[str, torch.Tensor]) -> torch.Tensor:
    return pair["B"].float() @ pair["A"].float()  # kohya alphas are baked into A and B by diffusers' converter


def _assert_parity(ours, theirs, skip=()):
    """Every module's ΔW, compared through ΔW @ X (both sides low-rank: no dense 3072 x 12288 ΔW built)."""
    assert set(ours.deltas) - set(skip) == set(theirs) - set(skip)
    for key, pair in theirs.items():
        if key in skip:
            continue
        x = torch.randn(pair["A"].shape[1], 3, generator=torch.Generator().manual_seed(1))
        assert_same_computed(probe(ours.deltas[key], x.shape[0]), pair["B"].float() @ (pair["A"].float() @ x), msg=key)
        if "bias" in pair:
            assert_same_computed(ours.deltas[key].delta_bias(), pair["bias"].float(), msg=key)


# the layouts diffusers reads, every module compared
@pytest.mark.parametrize("layout", ["flux_lora_kohya_with_te1_format", "flux_lora_xlabs_format",
                                    "flux_lora_diffusers_format"])
def test_each_module_matches_diffusers_conversion(tmp_path, layout):
    sd = state_dict(layout, rank=1)
    ours = load_adapter(sd)
    _assert_parity(ours, diffusers_pairs(diffusers_reads(tmp_path, sd)))


def test_kohya_flux_file_matches_diffusers_at_its_own_rank(tmp_path):
    sd = state_dict("flux_lora_kohya_format", rank=None)  # rank 16, alpha 4: diffusers bakes alpha/rank into A, B
    _assert_parity(load_adapter(sd), diffusers_pairs(diffusers_reads(tmp_path, sd)))


def test_control_lora_matches_diffusers_but_for_its_final_modulation(tmp_path):
    sd = state_dict("flux_control_lora_format", rank=2)  # diffusers' converter fails on rank 1 (chunks lora_A in 2)
    converted = diffusers_reads(tmp_path, sd)
    ours = load_adapter(sd)
    norm_out = "transformer.norm_out.linear"
    _assert_parity(ours, diffusers_pairs(converted), skip=(norm_out,) + tuple(
        k for k in ours.deltas if ours.deltas[k].kind == "set"))
    # the norm scales: diffusers returns the new weights, we hold them as replacements of the same values
    for key, delta in ours.deltas.items():
        if delta.kind == "set":
            assert torch.equal(delta.value, converted[f"{key}.weight"])
    # diffusers' converter swaps the (shift, scale) halves of lora_A as well as of lora_B (swap_scale_shift on
    # both), which also permutes the rank axis of A alone: its ΔW is not the swapped ΔW. Ours is.
    full = sd["final_layer.adaLN_modulation.1.lora_B.weight"].float() @ sd["final_layer.adaLN_modulation.1.lora_A.weight"].float()
    swapped = torch.cat([full[3072:], full[:3072]])
    assert not torch.allclose(their_delta(diffusers_pairs(converted)[norm_out]), swapped, atol=1e-3)
    assert_same_computed(ours.deltas[norm_out].delta_weight(), swapped)


def test_what_diffusers_drops_we_keep(tmp_path):
    # ComfyUI-style bias and norm diffs beside a kohya file (diffusers reads them as lora_unet_ names and filters
    # them out, lora_conversion_utils' "diff_b" / "Normalization diff keys … currently unsupported")
    g = torch.Generator().manual_seed(3)
    sd = state_dict("flux_lora_kohya_format", rank=1)
    extra = {"diffusion_model.double_blocks.0.img_attn.qkv.diff_b": torch.randn(9216, generator=g).bfloat16(),
             "diffusion_model.single_blocks.0.norm.key_norm.diff": torch.randn(128, generator=g).bfloat16()}
    converted = diffusers_reads(tmp_path, {**sd, **extra})
    assert not any("bias" in k or "norm_k" in k for k in converted)
    ours = load_adapter({**sd, **extra})
    assert ours.deltas["transformer.single_transformer_blocks.0.attn.norm_k"].kind == "full"
    # spelled two ways, the LoRA over qkv and the bias diff of qkv are two file modules for the same layers: the
    # second is reported, not dropped in silence; spelled one way they are one module whose rows carry the bias
    assert [(r.key, r.status) for r in ours.report.records if r.status != "mapped"] == [
        ("diffusion_model.double_blocks.0.img_attn.qkv.diff_b", "unsupported")]
    assert "already targets transformer.transformer_blocks.0.attn.to_q" in ours.report.unsupported[0].reason
    merged = load_adapter({**sd, "lora_unet_double_blocks_0_img_attn_qkv.diff_b": extra[
        "diffusion_model.double_blocks.0.img_attn.qkv.diff_b"]})
    assert merged.report.complete
    v = merged.deltas["transformer.transformer_blocks.0.attn.to_v"]
    assert v.kind == "lora" and torch.equal(v.delta_bias(), extra["diffusion_model.double_blocks.0.img_attn.qkv.diff_b"][6144:].float())


def test_onetrainer_dora_with_t5_is_refused_by_diffusers_and_read_by_us(tmp_path):
    sd = state_dict("flux_dora_onetrainer_format", rank=1)
    with pytest.raises(AssertionError, match="lora_te2_"):  # its converter knows lora_te1_ only; dora_scale dropped
        diffusers_reads(tmp_path, sd)
    ours = load_adapter(sd)
    assert ours.report.complete and ours.kinds() == {"dora": 506}
    assert any(k.startswith("text_encoder_2.encoder.block.") for k in ours.deltas)  # T5 kept


def test_aitoolkit_names_are_left_unconverted_by_diffusers(tmp_path):
    sd = state_dict("flux_lora_aitoolkit_format", rank=1)
    converted = diffusers_reads(tmp_path, sd)
    assert set(converted) == set(sd)  # diffusion_model.* names passed through: no transformer. key to load
    ours = load_adapter(sd)
    assert ours.report.complete and len(ours.deltas) == 418
