"""Writing Flux / SD3 LoRAs in their original names (io/write_original.py): kohya sd-scripts (``lora_unet_double_blocks_0_
img_attn_qkv``) and ai-toolkit / ComfyUI (``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``), the q / k / v
(/ mlp) modules of a fused layer written as one LoRA over its rows. The oracle for kohya-Flux is diffusers' own
converter (``FluxLoraLoaderMixin.lora_state_dict``), which hard-codes the real 3072 / 12288 widths: these tests use
the real widths, a small rank, and only block 0 of each kind plus the layers outside the blocks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lorablend import Adapter, LowRankDelta
from lorablend.io import load_adapter, save_adapter
from lorablend.io.write import adapter_state_dict

from conftest import assert_same_computed
from flux_keylists import few_blocks, probe, requires_keylists, state_dict

pytestmark = requires_keylists
diffusers_loaders = pytest.importorskip("diffusers.loaders")


def diffusers_deltas(path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """diffusers' reading of a kohya-Flux file: {our target key: (lora_B, lora_A)} (alpha baked into them)."""
    converted = diffusers_loaders.FluxLoraLoaderMixin.lora_state_dict(str(path))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in converted.items():
        module, _, role = key.rpartition(".lora_")
        pairs.setdefault(module, {})[role] = t
    return {m: (p["B.weight"], p["A.weight"]) for m, p in pairs.items()}


def assert_diffusers_reads_same(adapter: Adapter, path) -> None:
    theirs = diffusers_deltas(path)
    assert set(adapter.deltas) <= set(theirs)
    for key in set(theirs) - set(adapter.deltas):  # a module the fused layer has and the adapter lacks: zero rows
        assert not theirs[key][0].any(), key
    for key, (b, a) in theirs.items():
        if key not in adapter.deltas:
            continue
        x = torch.randn(a.shape[1], 3, generator=torch.Generator().manual_seed(1))
        assert_same_computed(probe(adapter.deltas[key], x.shape[0]), b.float() @ (a.float() @ x), msg=key)


def test_kohya_flux_round_trip_is_bit_for_bit():
    sd = few_blocks(state_dict("flux_lora_kohya_with_te1_format", rank=2))
    adapter = load_adapter(sd)
    written, meta = adapter_state_dict(adapter, "kohya")
    assert set(written) == set(sd)
    for key, t in sd.items():
        assert written[key].dtype == t.dtype and torch.equal(written[key], t), key
    assert meta["ss_network_module"] == "networks.lora_flux" and meta["modelspec.architecture"] == "flux-1-dev/lora"


@pytest.mark.parametrize("layout", ["flux_lora_diffusers_format", "flux_lora_diffusers_no_proj_mlp_format",
                                    "flux_lora_kohya_format"])
def test_diffusers_reads_our_kohya_flux_to_the_same_delta(tmp_path, layout):
    adapter = load_adapter(few_blocks(state_dict(layout, rank=2)))
    path = save_adapter(adapter, tmp_path / "ours.safetensors", format="kohya", target="flux")
    keys = load_file(str(path))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert not any(k.startswith("lora_transformer_") for k in keys)
    assert_diffusers_reads_same(adapter, path)
    again = load_adapter(path)
    for key, delta in adapter.deltas.items():
        assert_same_computed(probe(again.deltas[key], delta.shape[1]), probe(delta, delta.shape[1]), msg=key)
    assert not any(again.deltas[k].up.any() for k in set(again.deltas) - set(adapter.deltas))


def test_separate_q_k_v_become_one_block_diagonal_lora():
    down = [torch.randn(r, 3072) for r in (2, 3)]
    up = [torch.randn(3072, r) for r in (2, 3)]
    t = "transformer.transformer_blocks.0.attn."
    adapter = Adapter("x", "flux", {t + "to_q": LowRankDelta(down[0], up[0], alpha=1.0),
                                    t + "to_v": LowRankDelta(down[1], up[1], alpha=1.5)})  # same scale 0.5, no to_k
    sd, _ = adapter_state_dict(adapter, "kohya")
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    fused_up, fused_down = sd[name + ".lora_up.weight"], sd[name + ".lora_down.weight"]
    assert fused_down.shape == (5, 3072) and torch.equal(fused_down, torch.cat(down))
    assert torch.equal(fused_up[:3072, :2], up[0]) and torch.equal(fused_up[6144:, 2:], up[1])
    assert not fused_up[3072:6144].any() and not fused_up[:3072, 2:].any() and not fused_up[6144:, :2].any()
    assert float(sd[name + ".alpha"]) == 2.5
    again = load_adapter(sd, family="flux")  # (block 0's attention alone: Flux.2 klein 4B and Chroma have it too)
    assert set(again.deltas) == {t + "to_q", t + "to_k", t + "to_v"}
    assert not again.deltas[t + "to_k"].delta_weight().any()
    for key, delta in adapter.deltas.items():
        assert_same_computed(again.deltas[key].delta_weight(), delta.delta_weight(), msg=key)


def test_different_scales_are_folded_into_the_ups(tmp_path):
    t = "transformer.single_transformer_blocks.0."
    g = torch.Generator().manual_seed(3)
    deltas = {t + "attn.to_q": LowRankDelta(torch.randn(2, 3072, generator=g), torch.randn(3072, 2, generator=g), 8.0),
              t + "proj_mlp": LowRankDelta(torch.randn(4, 3072, generator=g), torch.randn(12288, 4, generator=g), 1.0)}
    adapter = Adapter("x", "flux", deltas)
    path = save_adapter(adapter, tmp_path / "ours.safetensors", format="kohya")
    sd = load_file(str(path))
    assert "lora_unet_single_blocks_0_linear1.alpha" not in sd  # scale 1: the scales live in the ups
    again = load_adapter(path)
    for key, delta in deltas.items():
        assert_same_computed(again.deltas[key].delta_weight(), delta.delta_weight(), msg=key)
    theirs = diffusers_deltas(path)
    for key, delta in deltas.items():
        b, a = theirs[key]
        assert_same_computed(b.float() @ a.float(), delta.delta_weight(), msg=key)


def test_ai_toolkit_round_trip_is_bit_for_bit():
    sd = few_blocks(state_dict("flux_lora_aitoolkit_format", rank=2))
    adapter = load_adapter(sd)
    written, _ = adapter_state_dict(adapter, "ai-toolkit")
    assert set(written) == set(sd)
    for key, t in sd.items():
        assert torch.equal(written[key], t), key


def test_control_lora_bias_goes_to_ai_toolkit_and_is_refused_by_kohya():
    sd = few_blocks(state_dict("flux_control_lora_format", rank=2))
    adapter = load_adapter(sd)
    with pytest.raises(ValueError, match="lora_B.bias.*format='ai-toolkit'"):
        adapter_state_dict(adapter, "kohya")
    written, _ = adapter_state_dict(adapter, "ai-toolkit")
    again = load_adapter(written)
    assert set(again.deltas) == set(adapter.deltas) and again.widened_inputs == adapter.widened_inputs
    for key, delta in adapter.deltas.items():
        if delta.needs_base:
            assert torch.equal(next(again.deltas[key].tensors()), next(delta.tensors())), key
            continue
        assert_same_computed(probe(again.deltas[key], delta.shape[1]), probe(delta, delta.shape[1]), msg=key)
        if delta.changes_bias:
            assert torch.equal(again.deltas[key].delta_bias(), delta.delta_bias()), key


def _lokr_qkv(w1_shape, w2_shape):
    g = torch.Generator().manual_seed(5)
    name = "diffusion_model.double_blocks.2.img_attn.qkv"
    return {f"{name}.lokr_w1": torch.randn(*w1_shape, generator=g).bfloat16(),
            f"{name}.lokr_w2": torch.randn(*w2_shape, generator=g).bfloat16(), f"{name}.alpha": torch.tensor(1.0)}


def test_lokr_whole_layers_round_trip_and_lokr_on_parts_of_a_fused_layer_is_refused():
    sd = _lokr_qkv((96, 48), (96, 64))  # q / k / v each a LoKr on w1's rows: no LoKr spelling of the three at once
    sd.update({"diffusion_model.double_blocks.2.img_attn.proj." + k.rsplit(".", 1)[1]: v
               for k, v in _lokr_qkv((48, 48), (64, 64)).items() if "alpha" not in k})
    adapter = load_adapter(sd, family="flux")  # (one block's attention: Flux.2 klein 4B has it too)
    with pytest.raises(ValueError, match=r"double_blocks\.2\.img_attn\.qkv.*lokr.*merge"):
        adapter_state_dict(adapter, "kohya")
    proj = Adapter("p", "flux", {k: d for k, d in adapter.deltas.items() if k.endswith("to_out.0")})
    written, meta = adapter_state_dict(proj, "ai-toolkit")
    assert {k: torch.equal(v, sd[k]) for k, v in written.items()} == dict.fromkeys(written, True)


def test_full_differences_of_a_fused_layer_are_stacked_exactly():
    g = torch.Generator().manual_seed(8)
    sd = {"lora_unet_double_blocks_0_img_attn_qkv.diff": torch.randn(9216, 3072, generator=g).bfloat16(),
          "lora_unet_double_blocks_0_img_attn_qkv.diff_b": torch.randn(9216, generator=g).bfloat16(),
          "lora_unet_double_blocks_0_img_attn_norm_key_norm.diff": torch.randn(128, generator=g).bfloat16(),
          "lora_unet_single_blocks_3_linear2.diff_b": torch.randn(3072, generator=g).bfloat16()}
    written, _ = adapter_state_dict(load_adapter(sd, family="flux"), "kohya")
    assert set(written) == set(sd)
    for key, t in sd.items():
        assert written[key].dtype == t.dtype and torch.equal(written[key], t), key
    lokr = load_adapter(_lokr_qkv((32, 96), (288, 32)), family="flux")  # rows that do not split as LoKr: dense rows
    again = load_adapter(adapter_state_dict(lokr, "kohya")[0], family="flux")
    for key, delta in lokr.deltas.items():
        assert torch.equal(again.deltas[key].delta_weight(), delta.delta_weight()), key  # fp32 rows kept


def test_dora_on_part_of_a_fused_layer_is_refused_with_the_way_out():
    sd = {k: v for k, v in state_dict("flux_dora_onetrainer_format", rank=2).items()
          if "single_transformer_blocks_0_attn_to_" in k}
    adapter = load_adapter(sd)
    with pytest.raises(ValueError, match=r"single_blocks\.0\.linear1.*dora.*format='onetrainer'"):
        adapter_state_dict(adapter, "kohya")


def test_diffusers_format_keeps_the_transformer_prefix():
    adapter = load_adapter(few_blocks(state_dict("flux_lora_kohya_format", rank=2)))
    written, meta = adapter_state_dict(adapter, "diffusers")
    assert all(k.startswith(("transformer.", "text_encoder.")) for k in written)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in written


def test_sd3_kohya_uses_sai_names_and_round_trips():
    g = torch.Generator().manual_seed(0)
    t = "transformer.transformer_blocks.0."
    down = torch.randn(2, 1536, generator=g)
    deltas = {t + "attn." + n: LowRankDelta(down, torch.randn(1536, 2, generator=g), alpha=1.0)
              for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0")}
    adapter = Adapter("x", "sd3", deltas)
    sd, meta = adapter_state_dict(adapter, "kohya")
    assert {k.rsplit(".", 2)[0] if "weight" in k else k.rsplit(".", 1)[0] for k in sd} == {
        "lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_0_context_block_attn_qkv",
        "lora_unet_joint_blocks_0_x_block_attn_proj"}
    assert sd["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"].shape == (4608, 2)
    assert meta["ss_network_module"] == "networks.lora_sd3"
    again = load_adapter(sd)
    assert again.family == "sd3"
    for key, delta in deltas.items():
        assert torch.equal(again.deltas[key].up, delta.up) and torch.equal(again.deltas[key].down, down), key
    aitk, _ = adapter_state_dict(adapter, "ai-toolkit")
    assert "diffusion_model.joint_blocks.0.context_block.attn.qkv.lora_A.weight" in aitk


def test_ai_toolkit_refuses_a_unet_family():
    adapter = Adapter("x", "sd1", {"unet.mid_block.attentions.0.proj_in": LowRankDelta(torch.ones(2, 1280),
                                                                                       torch.ones(1280, 2))})
    with pytest.raises(ValueError, match="names a transformer .*Flux, SD3.*format='kohya'"):
        adapter_state_dict(adapter, "ai-toolkit")


def test_onetrainer_dora_flux_file_round_trips_through_format_onetrainer():
    sd = few_blocks(state_dict("flux_dora_onetrainer_format", rank=2))
    adapter = load_adapter(sd)
    written, meta = adapter_state_dict(adapter, "onetrainer")
    assert set(written) == set(sd)
    for key, t in sd.items():
        assert written[key].dtype == t.dtype and torch.equal(written[key], t), key
    assert meta["ss_network_module"] == "lycoris.kohya"
