"""io/load.py: any LoRA source -> one Adapter whose report accounts for every key; the source left unchanged.

On small hand-made dicts: the per-key report, alpha rules, DoRA axes, family detection from shapes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from lorablend.errors import LoraFormatError
from lorablend.io.load import load_adapter
from lorablend.kinds import DoRADelta, LowRankDelta

KEY = "lora_unet_mid_block_attentions_0_proj_in"


def _kohya(rank=4, extra=None):
    g = torch.Generator().manual_seed(0)
    sd = {f"{KEY}.lora_down.weight": torch.randn(rank, 1280, 1, 1, generator=g),
          f"{KEY}.lora_up.weight": torch.randn(1280, rank, 1, 1, generator=g), f"{KEY}.alpha": torch.tensor(2.0)}
    return {**sd, **(extra or {})}


def test_a_kohya_file_becomes_an_adapter_named_after_it_with_every_key_mapped(tmp_path):
    save_file(_kohya(), str(tmp_path / "style.safetensors"))
    adapter = load_adapter(str(tmp_path / "style.safetensors"))
    assert adapter.name == "style" and adapter.family == "sd1" and adapter.format == "kohya"
    delta = adapter.deltas["unet.mid_block.attentions.0.proj_in"]
    assert isinstance(delta, LowRankDelta) and delta.alpha == 2.0 and delta.rank == 4
    assert adapter.report.counts() == {"mapped": 3, "unsupported": 0, "unknown": 0} and adapter.report.complete


def test_a_dict_source_is_read_and_left_unchanged_and_strays_are_reported():
    sd = _kohya(extra={"lora_unet_no_such_layer.lora_down.weight": torch.zeros(4, 3)})
    before = dict(sd)
    adapter = load_adapter(sd, name="d")
    assert sd.keys() == before.keys() and all(sd[k] is before[k] for k in sd)
    assert [r.key for r in adapter.report.unknown] == ["lora_unet_no_such_layer.lora_down.weight"]
    assert not adapter.report.complete


def test_a_file_with_no_lora_key_is_refused_by_name(tmp_path):
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(tmp_path / "ckpt.safetensors"))
    with pytest.raises(LoraFormatError, match="ckpt.safetensors"):
        load_adapter(str(tmp_path / "ckpt.safetensors"))


# SD1.5 / SDXL layers by their standard shapes (resolved against the standard architectures, no model needed)
SD1_ATTN2_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # (320, 768)
SDXL_ATTN2_K = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"  # (640, 2048): block 1 has 2 TBs
SD1_PROJ_IN = "mid_block.attentions.0.proj_in"  # SD1: 1x1 conv (1280, 1280, 1, 1)


def pair(prefix: str, out: int, fan_in: int, r: int = 2, style: str = "peft", seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    down, up = torch.randn(r, fan_in, generator=g), torch.randn(out, r, generator=g)
    names = {"peft": ("lora_A.weight", "lora_B.weight"), "kohya": ("lora_down.weight", "lora_up.weight")}[style]
    return {f"{prefix}.{names[0]}": down, f"{prefix}.{names[1]}": up}


def kohya(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def test_report_accounts_for_every_key_of_a_mixed_lycoris_file():
    sd = {
        **pair(kohya(SD1_ATTN2_K), 320, 768, style="kohya"),
        f"{kohya(SD1_ATTN2_K)}.alpha": torch.tensor(1.0),
        # LoHa on a 1x1 conv
        **{f"{kohya(SD1_PROJ_IN)}.hada_w{i}_{ab}": torch.randn(*((1280, 2) if ab == "a" else (2, 1280)))
           for i in (1, 2) for ab in "ab"},
        # an algorithm we do not apply, an IA3 module, a textual-inversion embedding, unknown things
        "lora_unet_mid_block_attentions_0_proj_out.oft_blocks": torch.zeros(4, 320, 320),
        "lora_unet_mid_block_attentions_0_proj_out.alpha": torch.tensor(4.0),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.weight": torch.zeros(3072),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.on_input": torch.tensor(False),
        "bundle_emb.mychar.string_to_param.*": torch.zeros(2, 768),
        f"{kohya(SD1_ATTN2_K)}.lora_scale": torch.tensor(1.0),
        "lora_unet_no_such_block_proj.lora_down.weight": torch.zeros(2, 8),
        "lora_unet_no_such_block_proj.lora_up.weight": torch.zeros(8, 2),
        # half a module
        "lora_te_text_model_encoder_layers_1_mlp_fc2.lora_down.weight": torch.zeros(2, 3072),
    }
    before = {k: v.clone() for k, v in sd.items()}
    keys_before = list(sd)
    adapter = load_adapter(sd)
    assert list(sd) == keys_before and all(torch.equal(sd[k], before[k]) for k in sd)  # caller's dict unchanged
    report = adapter.report
    assert [r.key for r in report.records] == keys_before  # every key, in input order
    by_key = {r.key: r for r in report.records}
    assert adapter.family == "sd1" and adapter.kinds() == {"lora": 1, "loha": 1}
    assert by_key[f"{kohya(SD1_ATTN2_K)}.alpha"].target == f"unet.{SD1_ATTN2_K}"
    assert by_key[f"{kohya(SD1_PROJ_IN)}.hada_w1_a"].status == "mapped"
    assert "OFT" in by_key["lora_unet_mid_block_attentions_0_proj_out.oft_blocks"].reason
    assert by_key["lora_unet_mid_block_attentions_0_proj_out.alpha"].status == "unsupported"
    assert "IA3" in by_key["lora_te_text_model_encoder_layers_0_mlp_fc1.on_input"].reason
    assert "IA3" in by_key["lora_te_text_model_encoder_layers_0_mlp_fc1.weight"].reason
    assert "textual-inversion" in by_key["bundle_emb.mychar.string_to_param.*"].reason
    assert by_key[f"{kohya(SD1_ATTN2_K)}.lora_scale"].status == "unknown"
    assert by_key["lora_unet_no_such_block_proj.lora_down.weight"].status == "unknown"
    half = by_key["lora_te_text_model_encoder_layers_1_mlp_fc2.lora_down.weight"]
    assert half.status == "unsupported" and "no ['up']" in half.reason
    assert report.counts() == {"mapped": 7, "unsupported": 6, "unknown": 3}


def test_alpha_rules():
    sd = {**pair(kohya(SD1_ATTN2_K), 320, 768, r=4, style="kohya"),
          f"{kohya(SD1_ATTN2_K)}.alpha": torch.tensor(0.0),
          **pair(kohya(SD1_ATTN2_K.replace("to_k", "to_v")), 320, 768, r=4, style="kohya"),
          **pair(kohya(SD1_ATTN2_K.replace("attn2.to_k", "attn1.to_q")), 320, 320, r=4, style="kohya"),
          kohya(SD1_ATTN2_K.replace("attn2.to_k", "attn1.to_q")) + ".alpha": torch.tensor(2.0, dtype=torch.float16)}
    d = load_adapter(sd).deltas
    assert d[f"unet.{SD1_ATTN2_K}"].scale == 1.0  # alpha 0 -> scale 1 (kohya), never 0
    assert d[f"unet.{SD1_ATTN2_K.replace('to_k', 'to_v')}"].alpha is None  # missing -> scale 1
    assert d[f"unet.{SD1_ATTN2_K.replace('attn2.to_k', 'attn1.to_q')}"].scale == 0.5


def test_diffusers_alpha_keys_and_metadata(tmp_path):
    base = f"unet.{SD1_ATTN2_K}"
    other = base.replace("to_k", "to_v")
    sd = {**pair(base, 320, 768, r=4), f"{base}.alpha": torch.tensor(8.0), **pair(other, 320, 768, r=4)}
    d = load_adapter(sd).deltas
    assert d[base].scale == 2.0 and d[other].scale == 1.0
    # rsLoRA through diffusers' lora_adapter_metadata: scale alpha / sqrt(r)
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 6, "unet.use_rslora": True}),
            "format": "pt"}
    path = tmp_path / "rs.safetensors"
    save_file(pair(other, 320, 768, r=4), path, metadata=meta)
    adapter = load_adapter(path)
    assert adapter.deltas[other].scale == pytest.approx(6 / math.sqrt(4))
    assert adapter.metadata == meta and adapter.name == "rs"


def test_dora_axis_detection():
    kohya_out = {**pair(kohya(SD1_ATTN2_K), 320, 768, style="kohya"), f"{kohya(SD1_ATTN2_K)}.dora_scale": torch.ones(320, 1)}
    kohya_in = {**pair(kohya(SD1_ATTN2_K), 320, 768, style="kohya"), f"{kohya(SD1_ATTN2_K)}.dora_scale": torch.ones(1, 768)}
    peft = {**pair(f"unet.{SD1_ATTN2_K}", 320, 768), f"unet.{SD1_ATTN2_K}.lora_magnitude_vector": torch.ones(320)}
    for sd, axis in ((kohya_out, "out"), (kohya_in, "in"), (peft, "out")):
        delta = load_adapter(sd).deltas[f"unet.{SD1_ATTN2_K}"]
        assert isinstance(delta, DoRADelta) and delta.axis == axis
    wrong = {**pair(kohya(SD1_ATTN2_K), 320, 768, style="kohya"), f"{kohya(SD1_ATTN2_K)}.dora_scale": torch.ones(1, 77)}
    with pytest.raises(LoraFormatError):  # the only module does not fit: nothing to load
        load_adapter(wrong)


@pytest.mark.parametrize("sd,family", [
    (pair(f"unet.{SD1_ATTN2_K}", 320, 768), "sd1"),
    (pair(f"unet.{SD1_ATTN2_K}", 320, 1024), "sd2"),
    (pair(f"unet.{SDXL_ATTN2_K}", 640, 2048), "sdxl"),
    (pair("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", 640, 2048, style="kohya"), "sdxl"),
    (pair("text_encoder.text_model.encoder.layers.0.mlp.fc1", 3072, 768), "sd1"),
    (pair("lora_te1_text_model_encoder_layers_0_mlp_fc1", 3072, 768, style="kohya"), "sdxl"),
    (pair("text_encoder_2.text_model.encoder.layers.0.mlp.fc1", 5120, 1280), "sdxl"),
    (pair("lora_te_text_model_encoder_layers_22_mlp_fc1", 4096, 1024, style="kohya"), "sd2"),
])
def test_family_from_shapes(sd, family):
    adapter = load_adapter(sd)
    assert adapter.family == family and adapter.report.complete


def test_conv_given_linear_factors_and_the_reverse():
    # SD1 proj_in is a 1x1 conv: 2-D factors fit it; SDXL's is a Linear: 4-D 1x1 factors fit it
    sd1 = load_adapter(pair(f"unet.{SD1_PROJ_IN}", 1280, 1280))
    assert sd1.deltas[f"unet.{SD1_PROJ_IN}"].delta_weight((1280, 1280, 1, 1)).shape == (1280, 1280, 1, 1)
    g = torch.Generator().manual_seed(0)
    sdxl_key = "down_blocks.1.attentions.0.proj_in"
    sd = {f"{kohya(sdxl_key)}.lora_down.weight": torch.randn(2, 640, 1, 1, generator=g),
          f"{kohya(sdxl_key)}.lora_up.weight": torch.randn(640, 2, 1, 1, generator=g),
          "lora_te2_text_projection.lora_down.weight": torch.randn(2, 1280, generator=g),
          "lora_te2_text_projection.lora_up.weight": torch.randn(1280, 2, generator=g)}
    adapter = load_adapter(sd)
    assert adapter.family == "sdxl" and adapter.report.complete
    assert "text_encoder_2.text_projection" in adapter.deltas


def test_target_lacking_a_module_is_reported_not_raised(tiny_pipes):
    pipe = tiny_pipes["sd1"]
    sd = {**pair("lora_unet_down_blocks_2_attentions_0_proj_in", 640, 640, style="kohya"),  # SD1.5 has it, tiny not
          **pair("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", 640, 640, style="kohya")}
    adapter = load_adapter(sd, target=pipe)
    status = {r.key.split(".")[0]: (r.status, r.reason) for r in adapter.report.records}
    assert status["lora_unet_down_blocks_2_attentions_0_proj_in"][0] == "unsupported"
    assert "target has no such layer" in status["lora_unet_down_blocks_2_attentions_0_proj_in"][1]
    bad = status["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert bad[0] == "unsupported" and "made for another model" in bad[1]
    assert adapter.deltas == {} and adapter.family == "sd1"


def test_duplicate_spellings_of_one_module():
    sd = {**pair(f"unet.{SD1_ATTN2_K}", 320, 768), **pair(kohya(SD1_ATTN2_K), 320, 768, style="kohya", seed=1)}
    adapter = load_adapter(sd)
    assert len(adapter.deltas) == 1
    assert sum(r.status == "unsupported" and "already targets" in r.reason for r in adapter.report.records) == 2


def test_simpletuner_lycoris_prefix_and_name_override():
    sd = pair("lycoris_" + SD1_ATTN2_K.replace(".", "_"), 320, 768, style="kohya")
    adapter = load_adapter(sd, name="style")
    assert adapter.name == "style" and list(adapter.deltas) == [f"unet.{SD1_ATTN2_K}"]


def test_format_override():
    sd = pair(f"unet.{SD1_ATTN2_K}", 320, 768)
    assert load_adapter(sd, format="diffusers").report.complete
    with pytest.raises(LoraFormatError, match="none of its 2 keys"):
        load_adapter(sd, format="kohya")


def test_peft_adapter_named_keys_and_base_model_prefix():
    sd = {f"base_model.model.{SD1_ATTN2_K}.lora_A.default.weight": torch.randn(2, 768),
          f"base_model.model.{SD1_ATTN2_K}.lora_B.default.weight": torch.randn(320, 2)}
    assert list(load_adapter(sd).deltas) == [f"unet.{SD1_ATTN2_K}"]
