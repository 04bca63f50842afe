"""Every real third-party file is read or refused as ../shared/research/real_material.md §1 says."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from lorablend import LoraFormatError
from lorablend.io import load_adapter
from lorablend.io.deltas import delta_shape, shape_problem
from lorablend.naming import standard_index
from conftest import assert_same_computed
from realdata import LORAS, requires_realdata

pytestmark = requires_realdata

SD1_PAIR_FILES = [
    "sd1x/sd15_attnprocs_catundchat.safetensors",
    "sd1x/sd15_attnprocs_catundchat.bin",
    "sd1x/sd14_attnprocs_pokemon.safetensors",
    "sd1x/sd15_diffusers_timo_step2100.safetensors",
    "sd1x/sd15_diffusers_timo_final.safetensors",
    "sd1x/sd15inpaint_diffusers_krishna.safetensors",
]


@pytest.mark.parametrize("name", SD1_PAIR_FILES)
def test_sd1_diffusers_and_attention_processor_files_map_128_pairs(name):
    adapter = load_adapter(LORAS / name)
    idx = standard_index("sd1")
    assert adapter.family == "sd1" and adapter.format == "diffusers"
    assert adapter.report.counts() == {"mapped": 256, "unsupported": 0, "unknown": 0}
    assert len(adapter.deltas) == 128 and adapter.kinds() == {"lora": 128}
    for key, delta in adapter.deltas.items():
        shape = idx.modules[key].weight_shape
        assert (delta.up.shape[0], delta.down.shape[1]) == shape
        assert delta.alpha is None and delta.scale == 1.0  # no alpha in these files: scale 1
    assert {r.target.rsplit(".", 1)[-1] for r in adapter.report.mapped} == {"to_q", "to_k", "to_v", "0"}


def test_catundchat_bin_and_safetensors_have_the_same_keys_and_targets():
    st = load_adapter(LORAS / "sd1x/sd15_attnprocs_catundchat.safetensors")
    pt = load_adapter(LORAS / "sd1x/sd15_attnprocs_catundchat.bin")
    assert sorted((r.key, r.target) for r in st.report.records) == sorted((r.key, r.target) for r in pt.report.records)
    assert set(st.deltas) == set(pt.deltas)
    assert st.name == pt.name == "sd15_attnprocs_catundchat"
    assert st.metadata == {"format": "pt"} and pt.metadata == {}


@pytest.mark.parametrize("rank", [4, 8])
def test_lycoris_lokr_maps_350_modules_with_96_flattened_convs(rank):
    adapter = load_adapter(LORAS / f"sd1x/sd1x_lycoris_lokr_smart_falcon_r{rank}.safetensors")
    idx = standard_index("sd1")
    assert adapter.family == "sd1" and adapter.format == "kohya"
    assert adapter.report.complete and len(adapter.report.records) == 1750
    assert len(adapter.deltas) == 350 and adapter.kinds() == {"lokr": 350}
    assert sum(k.startswith("text_encoder.") for k in adapter.deltas) == 72
    reshaped = 0
    for key, delta in adapter.deltas.items():
        shape = idx.modules[key].weight_shape
        assert shape_problem(delta, shape) is None
        if len(shape) == 4:
            assert len(delta_shape(delta)) == 2  # stored flattened (out, in·kh·kw)
            reshaped += 1
        if math.prod(shape) <= 300_000:  # the dense ΔW of the big layers costs seconds: the small ones show it
            dw = delta.delta_weight(shape)
            assert dw.shape == shape and dw.dtype == torch.float32
        assert delta.scale == 1.0  # alpha == dim
    assert reshaped == 96
    assert adapter.metadata["ss_network_dim"] == str(rank)
    assert adapter.metadata["ss_network_module"] == "lycoris.kohya"


def test_lokr_conv_matches_the_kron_of_its_factors():
    path = LORAS / "sd1x/sd1x_lycoris_lokr_smart_falcon_r4.safetensors"
    raw = load_file(path)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    w1 = raw[f"{name}.lokr_w1_a"].float() @ raw[f"{name}.lokr_w1_b"].float()
    w2 = raw[f"{name}.lokr_w2_a"].float() @ raw[f"{name}.lokr_w2_b"].float()
    alpha, dim = float(raw[f"{name}.alpha"]), raw[f"{name}.lokr_w2_b"].shape[0]
    expected = (torch.kron(w1, w2) * alpha / dim).reshape(320, 320, 3, 3)
    got = load_adapter(path).deltas["unet.down_blocks.0.resnets.0.conv1"].delta_weight((320, 320, 3, 3))
    assert_same_computed(got, expected)  # both are products of the file's factors: COMPUTED_TOL


def test_sd2_file_is_family_sd2_and_does_not_fit_sd1():
    path = LORAS / "sd2x/sd21_diffusers_justin.safetensors"
    adapter = load_adapter(path)
    assert adapter.family == "sd2" and adapter.report.complete and len(adapter.deltas) == 128
    # resolved against an SD1.5 model: 96 pairs fit, 32 (attn2 to_k / to_v, 1024-wide) are refused with the shape
    sd1 = {"unet": _meta_sd1_unet()}
    on_sd1 = load_adapter(path, target=sd1)
    assert on_sd1.family == "sd1"
    assert len(on_sd1.deltas) == 96
    bad = on_sd1.report.unsupported
    assert len(bad) == 64 and all("attn2.to_k" in r.reason or "attn2.to_v" in r.reason for r in bad)
    assert all("1024" in r.reason and "768" in r.reason for r in bad)


def _meta_sd1_unet():
    from diffusers import UNet2DConditionModel

    from lorablend.naming.configs import SD1_UNET

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(SD1_UNET)


def test_malformed_kohyaish_file_is_refused_and_says_why():
    path = LORAS / "sd1x/sd15_MALFORMED_kohyaish_timo_new.safetensors"
    with pytest.raises(LoraFormatError) as e:
        load_adapter(path)
    msg = str(e.value)
    assert str(path) in msg and "lora_unet_unet_" in msg and "none of its 256 keys" in msg


def test_truncated_sdxl_file_is_refused():
    path = LORAS / "sdxl/sdxl_attnprocs_TRUNCATED_srikanth.safetensors"
    with pytest.raises(LoraFormatError, match="truncated") as e:
        load_adapter(path)
    assert str(path) in str(e.value) and "23,224,320" in str(e.value) and "1,133,976" in str(e.value)


@pytest.mark.parametrize("name", ["sd1x/sd15_cloneofsimo_lora_disney_r1.safetensors",
                                  "sd1x/sd15_cloneofsimo_analog_svd_r4.safetensors"])
def test_cloneofsimo_files_are_refused_by_name(name):
    with pytest.raises(LoraFormatError, match="cloneofsimo") as e:
        load_adapter(LORAS / name)
    assert str(LORAS / name) in str(e.value) and "positional" in str(e.value)


def test_pickled_tensor_list_is_refused():
    path = LORAS / "sd2x/sd2_cloneofsimo_lora_disney_unet.pt"
    with pytest.raises(LoraFormatError, match="bare list of 256 tensors") as e:
        load_adapter(path)
    assert str(path) in str(e.value)


def test_malformed_file_holds_the_same_tensors_as_its_diffusers_original():
    # a sanity check on the material itself: the refusal above is about names, not data
    a = load_file(LORAS / "sd1x/sd15_MALFORMED_kohyaish_timo_new.safetensors")
    b = load_file(LORAS / "sd1x/sd15_diffusers_timo_step2100.safetensors")
    assert sorted(t.sum().item() for t in a.values()) == sorted(t.sum().item() for t in b.values())
