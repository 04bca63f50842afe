"""Writers: kohya / diffusers key layouts, metadata, sshs_model_hash, atomic writes, and read -> write -> read
round trips that give the same ΔW bit for bit (fp32) for every Delta kind a format can hold."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorablend.adapter import Adapter, DoRADelta, FullDelta, LoHaDelta, LoKrDelta, LowRankDelta
from lorablend.io import load_adapter, save_adapter
from lorablend.io import write as write_mod
from lorablend.io.safetensors import sshs_model_hash
from lorablend.io.write import OutputExistsError, adapter_state_dict

from conftest import assert_same_computed
from realdata import LORAS, requires_realdata

G = torch.Generator().manual_seed(0)


def rnd(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G) * 0.1


def sd1_adapter() -> Adapter:
    """Every Delta kind and layout on real SD1.5 layer names (standard architecture, no weights needed)."""
    u = "unet.down_blocks.0.attentions.0.transformer_blocks.0."
    deltas = {
        u + "attn2.to_k": LowRankDelta(rnd(4, 768), rnd(320, 4), alpha=8.0),  # 768-wide context: family sd1
        u + "attn2.to_out.0": LowRankDelta(rnd(4, 320), rnd(320, 4), alpha=0.1),  # alpha not exact in fp32
        u + "attn1.to_q": LoHaDelta(rnd(320, 4), rnd(4, 320), rnd(320, 4), rnd(4, 320), alpha=2.0),
        u + "attn1.to_v": LoKrDelta(w1=rnd(16, 16), w2_a=rnd(20, 4), w2_b=rnd(4, 20), alpha=4.0),
        u + "attn1.to_out.0": LoKrDelta(w1_a=rnd(20, 2), w1_b=rnd(2, 20), w2=rnd(16, 16), alpha=1.0),
        u + "ff.net.2": FullDelta(rnd(320, 1280), diff_b=rnd(320)),
        u + "attn2.to_q": DoRADelta(LowRankDelta(rnd(4, 320), rnd(320, 4), alpha=4.0), rnd(320).abs() + 1, "out"),
        u + "attn2.to_v": DoRADelta(LowRankDelta(rnd(4, 768), rnd(320, 4), alpha=2.0), rnd(1, 768).abs() + 1, "in"),
        "unet.down_blocks.0.attentions.0.proj_in": LowRankDelta(rnd(4, 320), rnd(320, 4), alpha=4.0),  # 2-D on a 1x1 conv
        "unet.down_blocks.0.resnets.0.conv1": LoHaDelta(
            rnd(4, 320), rnd(4, 320), rnd(4, 320), rnd(4, 320), alpha=4.0, t1=rnd(4, 4, 3, 3), t2=rnd(4, 4, 3, 3)
        ),
        "unet.down_blocks.0.resnets.0.conv2": LowRankDelta(rnd(8, 320, 3, 3), rnd(320, 8, 1, 1), alpha=4.0),
        "unet.down_blocks.0.resnets.1.conv1": LowRankDelta(
            rnd(4, 320, 1, 1), rnd(320, 4, 1, 1), alpha=2.0, mid=rnd(4, 4, 3, 3)
        ),
        "unet.down_blocks.0.resnets.1.conv2": LoKrDelta(w1=rnd(16, 16), w2_a=rnd(20, 4), w2_b=rnd(4, 180), alpha=8.0),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": LowRankDelta(rnd(4, 768), rnd(768, 4)),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1": LowRankDelta(rnd(2, 768), rnd(3072, 2), alpha=0.0),
    }
    meta = {"ss_network_module": "lycoris.kohya", "ss_tag_frequency": '{"d": {"cat": 3}}', "ss_seed": "42",
            "sshs_model_hash": "stale", "sshs_legacy_hash": "stale"}
    return Adapter("mix", "sd1", deltas, metadata=meta)


def sdxl_adapter() -> Adapter:
    deltas = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": LowRankDelta(rnd(4, 2048), rnd(640, 4), alpha=2.0),
        "unet.conv_in": LowRankDelta(rnd(4, 4, 3, 3), rnd(320, 4, 1, 1), alpha=4.0),
        "unet.add_embedding.linear_1": FullDelta(rnd(1280, 2816)),
        "unet.time_embedding.linear_1": LoKrDelta(w1=rnd(32, 16), w2_a=rnd(40, 2), w2_b=rnd(2, 20), alpha=1.0),
        "unet.up_blocks.0.attentions.0.proj_out": DoRADelta(LowRankDelta(rnd(4, 1280), rnd(1280, 4), alpha=4.0),
                                                            rnd(1280).abs() + 1, "out"),
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj": LowRankDelta(rnd(8, 768), rnd(768, 8), alpha=4.0),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": LoHaDelta(
            rnd(1280, 2), rnd(2, 1280), rnd(1280, 2), rnd(2, 1280), alpha=1.0),
        "text_encoder_2.text_projection": LowRankDelta(rnd(4, 1280), rnd(1280, 4), alpha=4.0),
    }
    return Adapter("xl", "sdxl", deltas)


def lowrank_only(adapter: Adapter) -> Adapter:
    return Adapter(adapter.name, adapter.family,
                   {k: d for k, d in adapter.deltas.items() if isinstance(d, LowRankDelta)}, dict(adapter.metadata))


def dense(delta, shape) -> torch.Tensor:
    if isinstance(delta, DoRADelta):
        base = torch.randn(shape, generator=torch.Generator().manual_seed(7))
        return delta.delta_weight(shape, base=base)
    return delta.delta_weight(shape)


def assert_same_deltas(a: Adapter, b: Adapter, family: str) -> None:
    from lorablend.naming import module_index

    idx = module_index(family=family)
    assert set(a.deltas) == set(b.deltas)
    for key, d in a.deltas.items():
        shape = idx.modules[key].weight_shape
        assert_same_computed(dense(d, shape), dense(b.deltas[key], shape), key)  # a product: COMPUTED_TOL
        if isinstance(d, FullDelta) and d.diff_b is not None:
            assert torch.equal(d.delta_bias(), b.deltas[key].delta_bias())


def header_of(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
@pytest.mark.parametrize("make", [sd1_adapter, sdxl_adapter], ids=["sd1", "sdxl"])
def test_round_trip_bit_exact(tmp_path, fmt, make):
    adapter = make() if fmt == "kohya" else lowrank_only(make())
    path = save_adapter(adapter, tmp_path / "a.safetensors", fmt)
    back = load_adapter(path)
    assert back.format == fmt and back.family == adapter.family
    assert back.report.complete, back.report.summary()
    assert_same_deltas(adapter, back, adapter.family)
    for key, d in adapter.deltas.items():
        assert back.deltas[key].kind == d.kind
        if isinstance(d, DoRADelta):
            assert back.deltas[key].axis == d.axis


def test_lokr_tucker_round_trip(tmp_path):
    key = "unet.down_blocks.1.resnets.0.conv2"
    d = LoKrDelta(w1=rnd(16, 16), w2_a=rnd(4, 40), w2_b=rnd(4, 40), t2=rnd(4, 4, 3, 3), alpha=2.0)
    a = Adapter("t2", "sd1", {key: d, **{k: v for k, v in sd1_adapter().deltas.items() if "attn2.to_k" in k}})
    path = save_adapter(a, tmp_path / "t2.safetensors", "kohya")
    assert "lora_unet_down_blocks_1_resnets_0_conv2.lokr_t2" in header_of(path)[1]
    e = load_adapter(path).deltas[key]
    assert e.kind == "lokr" and e.alpha == d.alpha
    assert all(torch.equal(x, y) for x, y in zip(d.tensors(), e.tensors()))
    assert_same_computed(d.delta_weight((640, 640, 3, 3)), e.delta_weight((640, 640, 3, 3)))


@pytest.mark.parametrize("axis, magnitude", [("out", (320, 1, 1, 1)), ("out", (320,)), ("in", (1, 320, 1, 1))])
def test_dora_conv_round_trip(tmp_path, axis, magnitude):
    key = "unet.down_blocks.0.downsamplers.0.conv"
    d = DoRADelta(LowRankDelta(rnd(4, 320, 3, 3), rnd(320, 4, 1, 1), alpha=4.0), rnd(*magnitude).abs() + 1, axis)
    a = Adapter("dc", "sd1", {key: d, **{k: v for k, v in sd1_adapter().deltas.items() if "attn2.to_k" in k}})
    path = save_adapter(a, tmp_path / "dc.safetensors", "kohya")
    expected_shape = (320, 1, 1, 1) if axis == "out" else (1, 320, 1, 1)
    assert header_of(path)[1]["lora_unet_down_blocks_0_downsamplers_0_conv.dora_scale"].shape == expected_shape
    e = load_adapter(path).deltas[key]
    assert e.kind == "dora" and e.axis == axis
    assert all(torch.equal(x.flatten(), y.flatten()) for x, y in zip(d.tensors(), e.tensors()))
    assert_same_computed(dense(d, (320, 320, 3, 3)), dense(e, (320, 320, 3, 3)))


def test_rewrite_of_a_written_file_is_identical(tmp_path):
    """Converting a converted file changes nothing, header included: no drift from one conversion to the next.

    (From the first file on: the reader reads alphas as fp32, so the fp64 alpha 0.1 of the original adapter
    becomes its nearest fp32 value; the ΔW is the same bit for bit either way.)"""
    first = save_adapter(sd1_adapter(), tmp_path / "a.safetensors", "kohya")
    second = save_adapter(load_adapter(first), tmp_path / "b.safetensors", "kohya")
    third = save_adapter(load_adapter(second), tmp_path / "c.safetensors", "kohya")
    assert second.read_bytes() == third.read_bytes()


@requires_realdata
@pytest.mark.parametrize("name", ["sd1x/sd1x_lycoris_lokr_smart_falcon_r4.safetensors",
                                  "sd1x/sd15_diffusers_timo_final.safetensors",
                                  "sd1x/sd15_attnprocs_catundchat.bin",
                                  "sd2x/sd21_diffusers_justin.safetensors"])
def test_real_files_round_trip(tmp_path, name):
    src = LORAS / name
    adapter = load_adapter(src)
    formats = ["kohya"] + (["diffusers"] if set(adapter.kinds()) == {"lora"} else [])
    for fmt in formats:
        back = load_adapter(save_adapter(adapter, tmp_path / f"{fmt}.safetensors", fmt))
        assert set(back.deltas) == set(adapter.deltas) and back.family == adapter.family
        for key, d in adapter.deltas.items():
            e = back.deltas[key]
            assert e.kind == d.kind and e.scale == d.scale  # alpha None is written as alpha = rank: scale 1
            # the factors are the stored tensors: bits are claimed for them; the dense ΔW (a product on
            # other buffers) of a few layers is checked within COMPUTED_TOL (350 LoKr layers take tens of seconds)
            assert all(torch.equal(x, y) for x, y in zip(d.tensors(), e.tensors())), key
        for key in list(adapter.deltas)[:4]:
            assert_same_computed(adapter.deltas[key].delta_weight(), back.deltas[key].delta_weight(), key)
    if "lokr" in name:
        with pytest.raises(ValueError, match="format='kohya'"):
            save_adapter(adapter, tmp_path / "d.safetensors", "diffusers")
        meta, _ = header_of(tmp_path / "kohya.safetensors")
        original = safe_open(str(src), "pt").metadata()
        assert meta["ss_tag_frequency"] == original["ss_tag_frequency"]
        assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_network_dim"] == "4"


# ---------------------------------------------------------------- kohya layout and metadata


def test_kohya_keys_per_kind(tmp_path):
    meta, t = header_of(save_adapter(sd1_adapter(), tmp_path / "k.safetensors", "kohya"))
    u = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_"
    assert t[u + "attn2_to_k.lora_down.weight"].shape == (4, 768)
    assert t[u + "attn2_to_k.alpha"].dim() == 0 and t[u + "attn2_to_k.alpha"].item() == 8.0
    assert t[u + "attn2_to_out_0.alpha"].dtype == torch.float64  # 0.1 is not exact in fp32
    assert {u + f"attn1_to_q.hada_w{i}_{ab}" for i in (1, 2) for ab in "ab"} <= set(t)
    assert {u + "attn1_to_v.lokr_w1", u + "attn1_to_v.lokr_w2_a", u + "attn1_to_v.lokr_w2_b"} <= set(t)
    assert {u + "attn1_to_out_0.lokr_w1_a", u + "attn1_to_out_0.lokr_w2"} <= set(t)
    assert {u + "ff_net_2.diff", u + "ff_net_2.diff_b"} <= set(t) and u + "ff_net_2.alpha" not in t
    assert t[u + "attn2_to_q.dora_scale"].shape == (320, 1)
    assert t[u + "attn2_to_v.dora_scale"].shape == (1, 768)
    assert t["lora_unet_down_blocks_0_resnets_1_conv1.lora_mid.weight"].shape == (4, 4, 3, 3)
    assert {"lora_unet_down_blocks_0_resnets_0_conv1.hada_t1", "lora_unet_down_blocks_0_resnets_0_conv1.hada_t2"} <= set(t)
    # a 2-D LoRA on a 1x1 conv is written with the conv's 4-D shapes (A1111 copies it into a Conv2d)
    assert t["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 320, 1, 1)
    assert t["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"].shape == (320, 4, 1, 1)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" not in t  # no alpha: scale 1 everywhere
    assert t["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"].item() == 2.0  # alpha 0 -> rank (ComfyUI reads 0 as off)


def test_kohya_sdxl_uses_sgm_and_te1_te2_names(tmp_path):
    _, t = header_of(save_adapter(sdxl_adapter(), tmp_path / "x.safetensors", "kohya"))
    names = {k.split(".")[0] for k in t}
    assert names == {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", "lora_unet_input_blocks_0_0",
        "lora_unet_label_emb_0_0", "lora_unet_time_embed_0", "lora_unet_output_blocks_0_1_proj_out",
        "lora_te1_text_model_encoder_layers_0_self_attn_k_proj",
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_projection",
    }


def test_kohya_metadata_filled_and_kept(tmp_path):
    meta, _ = header_of(save_adapter(sd1_adapter(), tmp_path / "k.safetensors", "kohya"))
    assert meta["ss_tag_frequency"] == '{"d": {"cat": 3}}' and meta["ss_seed"] == "42"
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) > 0
    assert "sshs_legacy_hash" not in meta  # stale hashes are dropped, never copied
    plain = Adapter("p", "sdxl", {"text_encoder_2.text_projection": LowRankDelta(rnd(8, 1280), rnd(1280, 8), alpha=4.0)})
    meta, _ = header_of(save_adapter(plain, tmp_path / "p.safetensors", "kohya"))
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("8", "4.0")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_sshs_model_hash_is_the_hash_of_the_written_data(tmp_path, fmt):
    path = save_adapter(lowrank_only(sd1_adapter()), tmp_path / "h.safetensors", fmt)
    meta, _ = header_of(path)
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(blob[8 + n:]).hexdigest() == sshs_model_hash(path)
    assert meta["sshs_model_hash"] != "stale"


@requires_realdata
def test_sshs_model_hash_matches_real_lycoris_files():
    files = [p for p in sorted(LORAS.rglob("*.safetensors")) if "lycoris" in p.name]
    assert files
    for path in files:
        stored = safe_open(str(path), "pt").metadata()["sshs_model_hash"]
        assert sshs_model_hash(path) == stored, path.name


# ---------------------------------------------------------------- diffusers layout


def test_diffusers_keys_and_adapter_metadata(tmp_path):
    a = Adapter("d", "sd1", {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": LowRankDelta(rnd(4, 768), rnd(320, 4), alpha=8.0),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v": LowRankDelta(rnd(4, 768), rnd(320, 4), alpha=8.0),
        "unet.down_blocks.0.attentions.0.proj_in": LowRankDelta(rnd(2, 320), rnd(320, 2), alpha=8.0),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": LowRankDelta(rnd(4, 768), rnd(768, 4)),
        "text_encoder.text_model.encoder.layers.1.self_attn.q_proj": LowRankDelta(rnd(4, 768), rnd(768, 4), alpha=1.0),
    }, metadata={"ss_network_module": "networks.lora", "ss_seed": "1"})
    meta, t = header_of(save_adapter(a, tmp_path / "d.safetensors", "diffusers"))
    assert t["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"].shape == (2, 320, 1, 1)
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in t
    cfg = json.loads(meta["lora_adapter_metadata"])
    assert cfg["unet.r"] == 4 and cfg["unet.lora_alpha"] == 8.0
    assert cfg["unet.rank_pattern"] == {"down_blocks.0.attentions.0.proj_in": 2}
    assert cfg["unet.alpha_pattern"] == {}
    assert cfg["text_encoder.r"] == 4
    # PEFT matches patterns as suffixes: no text_model. prefix, so both CLIP module trees match
    assert set(cfg["text_encoder.alpha_pattern"].values()) | {cfg["text_encoder.lora_alpha"]} == {4.0, 1.0}
    assert all(not p.startswith("text_model.") for p in cfg["text_encoder.target_modules"])
    assert meta["format"] == "pt" and meta["ss_seed"] == "1" and "ss_network_module" not in meta


def test_diffusers_refuses_non_lowrank_with_a_fix(tmp_path):
    with pytest.raises(ValueError, match=r"LoHa|loha") as err:
        save_adapter(sd1_adapter(), tmp_path / "d.safetensors", "diffusers")
    assert "format='kohya'" in str(err.value)
    u = "unet.down_blocks.0.attentions.0.transformer_blocks.0."
    lora = LowRankDelta(rnd(4, 768), rnd(320, 4), alpha=4.0)
    cases = {
        "per-input-column": {u + "attn2.to_k": DoRADelta(lora, rnd(1, 768).abs() + 1, "in")},
        "DoRA on lokr": {u + "attn1.to_k": DoRADelta(LoKrDelta(w1=rnd(16, 16), w2=rnd(20, 20)), rnd(320).abs(), "out")},
        "mixes DoRA and plain": {u + "attn2.to_k": lora, u + "attn2.to_v": DoRADelta(lora, rnd(320).abs() + 1, "out")},
    }
    for message, deltas in cases.items():
        with pytest.raises(ValueError, match=message) as err:
            save_adapter(Adapter("x", "sd1", deltas), tmp_path / "d.safetensors", "diffusers")
        assert "format='kohya'" in str(err.value)
    assert not list(tmp_path.iterdir())


def test_diffusers_dora_round_trip(tmp_path):
    u = "unet.down_blocks.0.attentions.0.transformer_blocks.0."
    a = Adapter("dora", "sd1", {
        u + "attn2.to_k": DoRADelta(LowRankDelta(rnd(4, 768), rnd(320, 4), alpha=2.0), rnd(320, 1).abs() + 1, "out"),
        u + "attn2.to_v": DoRADelta(LowRankDelta(rnd(4, 768), rnd(320, 4), alpha=2.0), rnd(320).abs() + 1, "out"),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": LowRankDelta(rnd(4, 768), rnd(768, 4)),
    })
    path = save_adapter(a, tmp_path / "d.safetensors", "diffusers")
    meta, t = header_of(path)
    assert t[u[5:].join(["unet.", "attn2.to_k.lora_magnitude_vector"])].shape == (320,)
    cfg = json.loads(meta["lora_adapter_metadata"])
    assert cfg["unet.use_dora"] is True and "text_encoder.use_dora" not in cfg
    back = load_adapter(path)
    assert {k: d.kind for k, d in back.deltas.items()} == {k: d.kind for k, d in a.deltas.items()}
    assert_same_deltas(a, back, "sd1")


# ---------------------------------------------------------------- file safety


def small_adapter() -> Adapter:
    return Adapter("s", "sd1", {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k":
                                LowRankDelta(rnd(4, 768), rnd(320, 4), alpha=4.0)})


def test_existing_file_needs_overwrite(tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="overwrite=True") as err:
        save_adapter(small_adapter(), out, "kohya")
    assert str(out) in str(err.value) and isinstance(err.value, ValueError)
    assert out.read_bytes() == b"keep me"
    save_adapter(small_adapter(), out, "kohya", overwrite=True)
    assert load_adapter(out).report.complete


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")

    real_write = write_mod.atomic_write

    def broken(out, chunks, **kw):  # the real atomic write, fed bytes that stop with an error halfway
        def failing():
            yield b"partial"
            raise OSError("disk full")

        return real_write(out, failing(), **kw)

    monkeypatch.setattr(write_mod, "atomic_write", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(small_adapter(), out, "kohya", overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(small_adapter(), tmp_path / "new.safetensors", "kohya")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors"]
    assert out.read_bytes() == b"keep me"


def test_never_overwrites_its_input(tmp_path):
    src = save_adapter(small_adapter(), tmp_path / "in.safetensors", "kohya")
    before = src.read_bytes()
    adapter = load_adapter(src)
    with pytest.raises(ValueError, match="read from"):
        save_adapter(adapter, src, "diffusers", overwrite=True)
    assert src.read_bytes() == before


def test_output_names_and_refusals(tmp_path):
    a = small_adapter()
    assert save_adapter(a, tmp_path, "diffusers").name == "pytorch_lora_weights.safetensors"
    assert save_adapter(a, tmp_path, "kohya").name == "s.safetensors"
    with pytest.raises(ValueError, match=r"\.safetensors files only"):
        save_adapter(a, tmp_path / "x.bin", "kohya")
    with pytest.raises(ValueError, match="format must be one of"):
        save_adapter(a, tmp_path / "x.safetensors", "ckpt")
    bad = small_adapter()
    next(iter(bad.deltas.values())).up[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        save_adapter(bad, tmp_path / "nan.safetensors", "kohya")
    assert not (tmp_path / "nan.safetensors").exists()


def test_dtype_and_metadata_arguments(tmp_path):
    meta, t = header_of(save_adapter(small_adapter(), tmp_path / "h.safetensors", "kohya", dtype="fp16",
                                     metadata={"modelspec.author": "me", "ss_epoch": 3}))
    weights = [v for k, v in t.items() if not k.endswith(".alpha")]
    assert all(v.dtype == torch.float16 for v in weights)
    assert all(v.dtype == torch.float32 for k, v in t.items() if k.endswith(".alpha"))
    assert meta["modelspec.author"] == "me" and meta["ss_epoch"] == "3"
    with pytest.raises(ValueError, match="lora_adapter_metadata"):
        adapter_state_dict(small_adapter(), "diffusers", metadata={"lora_adapter_metadata": "{}"})


def test_layer_of_another_model_needs_target(tmp_path):
    a = Adapter("t", "sd1", {"unet.down_blocks.1.attentions.0.proj_in": LowRankDelta(rnd(4, 64), rnd(64, 4))})
    with pytest.raises(ValueError, match="target="):
        save_adapter(a, tmp_path / "t.safetensors", "kohya")


def test_real_style_file_written_by_hand_is_read_the_same(tmp_path):
    """A kohya file written by safetensors directly and ours hold the same tensors under the same names."""
    a = small_adapter()
    ours, _ = adapter_state_dict(a, "kohya")
    save_file(ours, tmp_path / "by_hand.safetensors")
    assert_same_deltas(a, load_adapter(tmp_path / "by_hand.safetensors"), "sd1")
