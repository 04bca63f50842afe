"""Wan 2.2 A14B LoRA pairs: one call loads a high / low pair as ONE adapter, each file on its expert; one weight or
one per expert; a single file on one expert; parity with diffusers' load_into_transformer_2; bit-exact unfuse."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import lorablend
from lorablend.errors import LoraCompatibilityError
from lorablend.fixtures.tiny_2026 import CALL_KW, tiny_2026_pipeline

KW = dict(prompt="a cat", num_inference_steps=4, output_type="np", **CALL_KW["wan22-a14b"])  # 4 steps: both experts run
TOL = dict(rtol=0.0, atol=2e-4)


@pytest.fixture(scope="module")
def wan22():
    return tiny_2026_pipeline("wan22-a14b")


def _seed():
    return np.random.Generator(np.random.PCG64(0))


def _pair_file(path, transformer, seed: int) -> str:
    """A diffusers-format Wan LoRA (``transformer.blocks.N…``): a pair's two files have the same keys."""
    g, sd = torch.Generator().manual_seed(seed), {}
    for name, m in transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("blocks."):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(4, m.in_features, generator=g) * 0.3
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.3
    save_file(sd, str(path))
    return str(path)


def _frames(pipe, **kw):
    return torch.as_tensor(np.asarray(pipe(generator=_seed(), **KW, **kw).frames, dtype=np.float64))


@pytest.fixture
def pair(tmp_path, wan22):
    return (_pair_file(tmp_path / "high.safetensors", wan22.transformer, 1),
            _pair_file(tmp_path / "low.safetensors", wan22.transformer, 2))


def test_a_pair_is_one_adapter_each_file_on_its_expert(wan22, pair):
    ours = lorablend.DiffusionPipeline(copy.deepcopy(wan22))
    report = ours.load_lora_weights(high=pair[0], low=pair[1], adapter_name="lightning")
    assert not report.unknown and not report.unsupported and len(report.mapped) == 2 * 40
    assert ours.get_list_adapters() == {"transformer": ["lightning"], "transformer_2": ["lightning"]}

    theirs = copy.deepcopy(wan22)  # diffusers: two adapters, the second with load_into_transformer_2
    theirs.load_lora_weights(pair[0], adapter_name="high")
    theirs.load_lora_weights(pair[1], adapter_name="low", load_into_transformer_2=True)
    from lorablend.pipeline import _host_noise_in_prepare_latents

    def their_frames():
        with _host_noise_in_prepare_latents(theirs, _seed()):
            return torch.as_tensor(np.asarray(theirs(**KW).frames, dtype=np.float64))

    theirs.set_adapters(["high", "low"], [1.0, 1.0])
    torch.testing.assert_close(_frames(ours), their_frames(), **TOL)
    ours.set_adapters("lightning", {"transformer": 1.0, "transformer_2": 0.5})  # one weight per expert
    theirs.set_adapters(["high", "low"], [1.0, 0.5])
    torch.testing.assert_close(_frames(ours), their_frames(), **TOL)


def test_one_file_on_one_expert_and_the_experts_apart(wan22, pair):
    base = lorablend.DiffusionPipeline(copy.deepcopy(wan22))
    plain = _frames(base)
    ours = lorablend.DiffusionPipeline(copy.deepcopy(wan22))
    ours.load_lora_weights(low=pair[1], adapter_name="low_only")
    assert ours.get_list_adapters() == {"transformer_2": ["low_only"]}
    low_only = _frames(ours)
    ours.delete_adapters("low_only")
    ours.load_lora_weights(high=pair[0], low=pair[1], adapter_name="both")
    ours.set_adapters("both", {"transformer": 0.0})  # the high expert off: only the low file acts
    torch.testing.assert_close(_frames(ours), low_only, **TOL)
    assert (low_only - plain).abs().max() > 1e-3


def test_fuse_a_pair_and_unfuse_bit_exact(wan22, pair):
    ours = lorablend.DiffusionPipeline(copy.deepcopy(wan22))
    before = {c: {k: v.clone() for k, v in getattr(ours, c).state_dict().items()} for c in ("transformer", "transformer_2")}
    ours.load_lora_weights(high=pair[0], low=pair[1], adapter_name="pair")
    ours.set_adapters("pair", {"transformer": 0.8, "transformer_2": 0.6})
    unfused = _frames(ours)
    ours.fuse_lora()
    torch.testing.assert_close(_frames(ours), unfused, **TOL)
    ours.unfuse_lora()
    for c, weights in before.items():
        now = getattr(ours, c).state_dict()
        assert all(torch.equal(weights[k], now[k]) for k in weights), c


def test_pairs_are_refused_where_they_cannot_go(tmp_path, wan22, pair):
    one_expert = lorablend.DiffusionPipeline(tiny_2026_pipeline("wan"))
    with pytest.raises(LoraCompatibilityError, match="one denoiser"):
        one_expert.load_lora_weights(high=pair[0], low=pair[1], adapter_name="x")
    assert one_expert.get_list_adapters() == {}
    ours = lorablend.DiffusionPipeline(copy.deepcopy(wan22))
    with pytest.raises(ValueError, match="not both"):
        ours.load_lora_weights(pair[0], high=pair[0], adapter_name="x")
    text = {"text_encoder.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": torch.zeros(2, 32),
            "text_encoder.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight": torch.zeros(32, 2)}
    with pytest.raises(LoraCompatibilityError, match="belongs to no expert"):
        ours.load_lora_weights(high=pair[0], low=text, adapter_name="x")
    assert ours.get_list_adapters() == {}


def test_the_expert_split_as_a_schedule_equals_one_weight_per_expert(wan22, pair):
    from lorablend.runtime.schedule import expert_keyframes, weight_at

    ours = lorablend.DiffusionPipeline(copy.deepcopy(wan22))
    ours.load_lora_weights(high=pair[0], low=pair[1], adapter_name="lightning")
    steps = KW["num_inference_steps"]
    split = expert_keyframes(ours, steps, high=1.0, low=0.25)
    assert [weight_at(split, i, steps) for i in range(steps)][0] == 1.0 and weight_at(split, steps - 1, steps) == 0.25
    ours.set_adapters("lightning", {"transformer": 1.0, "transformer_2": 0.25})
    per_expert = _frames(ours)
    ours.set_adapters(["lightning"], [1.0])
    scheduled = _frames(ours, lora_schedule={"lightning": split})
    torch.testing.assert_close(scheduled, per_expert, **TOL)
    assert float((scheduled - _frames(ours)).abs().max()) > 10 * TOL["atol"]  # the low expert's weight moved
    assert expert_keyframes(lorablend.DiffusionPipeline(tiny_2026_pipeline("wan")), steps, 0.5) == ((0.0, 0.5),)
