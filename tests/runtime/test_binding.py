"""resolve: binding adapters to a live model (all-or-nothing, with a report) and per-layer weights."""

from __future__ import annotations

import pytest
import torch

from lorablend import LoraCompatibilityError
from lorablend.adapter import Adapter, FullDelta, LoKrDelta, LowRankDelta
from lorablend.report import LoadReport
from lorablend.runtime.model_view import ModelView
from lorablend.runtime.binding import bind_adapter
from lorablend.runtime.weight_specs import layer_weights


@pytest.fixture(scope="module")
def view_sd1(tiny_pipes):
    p = tiny_pipes["sd1"]
    return ModelView.of({"unet": p.unet, "text_encoder": p.text_encoder})


@pytest.fixture(scope="module")
def view_xl(tiny_pipes):
    p = tiny_pipes["sdxl"]
    return ModelView.of({"unet": p.unet, "text_encoder": p.text_encoder, "text_encoder_2": p.text_encoder_2})


Q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # Linear 64 -> 64
TE_Q = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"  # Linear 32 -> 32


def lora(out: int, inp: int, r: int = 2) -> LowRankDelta:
    return LowRankDelta(down=torch.randn(r, inp), up=torch.randn(out, r))


def test_binds_text_encoder_keys_with_or_without_text_model_prefix(view_sd1):
    # transformers 5's CLIPTextModel has no `text_model.` level; canonical keys always carry it
    a = Adapter("a", "sd1", {Q: lora(64, 64), TE_Q: lora(32, 32),
                             "text_encoder.encoder.layers.1.self_attn.k_proj": lora(32, 32)})
    bound = bind_adapter(a, view_sd1)
    assert set(bound.layers) == {Q, TE_Q, "text_encoder.text_model.encoder.layers.1.self_attn.k_proj"}
    assert bound.components() == ["unet", "text_encoder"]
    assert bound.report.complete and len(bound.report.records) == 3


def test_strict_names_the_offending_keys_and_strict_false_reports_them(view_sd1):
    a = Adapter("a", "sd1", {Q: lora(64, 64), "unet.nope": lora(4, 4), TE_Q: lora(32, 77),
                             "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": lora(32, 32)})
    with pytest.raises(LoraCompatibilityError) as err:
        bind_adapter(a, view_sd1)
    msg = str(err.value)
    assert "3 key(s) cannot be applied" in msg and "unet.nope" in msg and "(32, 77)" in msg
    assert "no 'text_encoder_2'" in msg and "strict=False" in msg and "Nothing was changed" in msg
    bound = bind_adapter(a, view_sd1, strict=False)
    assert list(bound.layers) == [Q]
    assert bound.report.counts() == {"mapped": 1, "unsupported": 1, "unknown": 2}


def test_source_report_problems_count_in_strict_mode(view_sd1):
    report = LoadReport(source="x.safetensors", format="kohya")
    report.add("lora_unet_x.lora_down.weight", "mapped", Q)
    report.add("lora_unet_emb.weight", "unsupported", reason="an embedding")
    a = Adapter("a", "sd1", {Q: lora(64, 64)}, report=report)
    with pytest.raises(LoraCompatibilityError, match="lora_unet_emb.weight: unsupported"):
        bind_adapter(a, view_sd1)
    bound = bind_adapter(a, view_sd1, strict=False)
    assert bound.report.counts() == {"mapped": 1, "unsupported": 1, "unknown": 0}


def test_family_and_finiteness(view_sd1, view_xl):
    with pytest.raises(LoraCompatibilityError, match="sdxl LoRA but the pipeline is sd1"):
        bind_adapter(Adapter("x", "sdxl", {Q: lora(64, 64)}), view_sd1)
    with pytest.raises(LoraCompatibilityError, match="sd1 LoRA but the pipeline is sdxl"):
        bind_adapter(Adapter("x", "sd1", {Q: lora(64, 64)}), view_xl)
    bad = lora(64, 64)
    bad.down[0, 0] = float("inf")
    with pytest.raises(LoraCompatibilityError, match="NaN or Inf"):
        bind_adapter(Adapter("x", "sd1", {Q: bad}), view_sd1)


def test_other_kinds_are_shape_checked_without_a_dense_product(view_sd1):
    ok = Adapter("k", "sd1", {Q: LoKrDelta(w1=torch.ones(8, 8), w2=torch.ones(8, 8)),
                              TE_Q: FullDelta(diff=torch.zeros(32, 32), diff_b=torch.zeros(32))})
    assert len(bind_adapter(ok, view_sd1).layers) == 2
    bad = Adapter("k", "sd1", {Q: LoKrDelta(w1=torch.ones(4, 4), w2=torch.ones(8, 8))})
    with pytest.raises(LoraCompatibilityError, match="made for another model"):
        bind_adapter(bad, view_sd1)


def test_layer_weights_forms(view_sd1, make_adapter):
    bound = bind_adapter(make_adapter("sd1", "a", seed=0), view_sd1)
    keys = list(bound.layers)
    assert set(layer_weights(None, bound, view_sd1).values()) == {1.0}
    assert set(layer_weights(0.25, bound, view_sd1).values()) == {0.25}

    w = layer_weights({"unet": 0.5, "text_encoder": 0.0}, bound, view_sd1)
    assert all(w[k] == (0.5 if k.startswith("unet.") else 0.0) for k in keys)

    w = layer_weights({"unet": {"down": {"block_1": [0.1, 0.2]}, "mid": 0.3}}, bound, view_sd1)
    assert w["unet.down_blocks.1.attentions.0.proj_in"] == 0.1
    assert w["unet.down_blocks.1.resnets.0.conv1"] == 0.1  # resnets follow their layer
    assert w["unet.down_blocks.1.attentions.1.proj_in"] == 0.2
    assert w["unet.mid_block.resnets.1.conv2"] == 0.3
    assert w["unet.down_blocks.0.downsamplers.0.conv"] == 1.0 and w["unet.conv_in"] == 1.0

    # A1111 LoRA-Block-Weight labels, the same vocabulary for SD1.x and SDXL
    w = layer_weights({"IN03": 0.0, "M00": 0.5, "BASE": 0.2}, bound, view_sd1)
    assert w["unet.down_blocks.0.downsamplers.0.conv"] == 0.0  # IN03 is that sampler in this tiny UNet
    assert w["unet.mid_block.attentions.0.proj_in"] == 0.5
    assert w[TE_Q] == 0.2 and w["unet.conv_in"] == 1.0


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"vae": 1.0}, "unknown weight key 'vae'"),
        ({"unet": {"left": 1.0}}, "unknown block label"),
        ({"unet": {"down": {"block_2": 1.0}}}, r"block_2.*\['block_0', 'block_1'\]"),
        ({"unet": {"down": {"block_1": [1.0, 2.0, 3.0]}}}, "lists 3 values but that block has 2 layers"),
        ({"text_encoder": "high"}, "expected a number"),
        (float("nan"), "finite"),
        ({"OUT99": 1.0}, "OUT99"),
    ],
)
def test_layer_weights_errors_name_the_key_and_the_valid_ones(view_sd1, make_adapter, spec, match):
    bound = bind_adapter(make_adapter("sd1", "a", seed=0), view_sd1)
    with pytest.raises(ValueError, match=match):
        layer_weights(spec, bound, view_sd1)


def test_view_finds_every_indexed_module_once_and_without_lookups(view_sd1, monkeypatch):
    # the view holds each adaptable module from one walk of the tree: binding never calls get_submodule
    for key, info in view_sd1.index.modules.items():
        assert view_sd1.modules[key] is view_sd1.components[info.component].get_submodule(info.live_path)

    def no_lookup(self, path):
        raise AssertionError(f"get_submodule({path!r}) on a bind")

    monkeypatch.setattr(torch.nn.Module, "get_submodule", no_lookup)
    bound = bind_adapter(Adapter("a", "sd1", {Q: lora(64, 64), TE_Q: lora(32, 32)}), view_sd1)
    assert bound.layers[Q].module is view_sd1.modules[Q]


def test_shared_accelerator_reads_the_adaptable_layers(tiny_pipes):
    p = tiny_pipes["sd1"]
    view = ModelView.of({"unet": p.unet, "text_encoder": p.text_encoder})
    assert view.shared_accelerator() is None  # a host model: LoRAs are read as private host copies
    meta = torch.nn.Sequential(torch.nn.Linear(2, 2, device="meta"))
    assert ModelView.of({"unet": meta}).shared_accelerator() is None
