"""K-LoRA (arXiv 2502.18461): per layer and step, the LoRA whose top-K |ΔW| dominates — scores, γ, the
selection's move from subject to style over the steps, and the adapter of one step."""

from __future__ import annotations

import pytest
import torch

from lorablend.adapter import Adapter, LowRankDelta
from lorablend.merge.klora import klora_merge, klora_plan, top_k_sum

K1 = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
K2 = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
ONLY_STYLE = "unet.up_blocks.0.attentions.0.proj_out"


def _lora(scale: float, seed: int) -> LowRankDelta:
    g = torch.Generator().manual_seed(seed)
    return LowRankDelta(down=torch.randn(2, 16, generator=g), up=scale * torch.randn(16, 2, generator=g), alpha=2.0)


def test_top_k_sum_is_the_sum_of_the_k_largest_magnitudes():
    dw = torch.tensor([[3.0, -7.0, 1.0], [0.5, -2.0, 6.0]])
    assert top_k_sum(dw, k=3) == 16.0
    assert top_k_sum(dw, k=100) == float(dw.abs().sum())  # k capped at the size


def test_gamma_is_the_mean_l1_ratio_and_the_selection_moves_to_style_with_progress():
    content = Adapter("sks", "sd1", {K1: _lora(1.0, 1), K2: _lora(1.0, 2)})
    style = Adapter("stripes", "sd1", {K1: _lora(1.0, 3), K2: _lora(1.0, 4), ONLY_STYLE: _lora(1.0, 5)})
    plan = klora_plan(content, style, top_k=8)
    ratios = [float(content.deltas[k].delta_weight().abs().double().sum() / style.deltas[k].delta_weight().abs().double().sum())
              for k in (K1, K2)]
    assert plan.gamma == pytest.approx(sum(ratios) / 2)
    assert set(plan.scores) == {K1, K2}
    # content wins where S_c/γ > S_s·(1.5 p + 0.5): at p=0 the bar is half of p=1's quarter
    for key, (s_c, s_s) in plan.scores.items():
        assert plan.choose(0.0)[key] == ("content" if s_c / plan.gamma > 0.5 * s_s else "style")
        assert plan.choose(1.0)[key] == ("content" if s_c / plan.gamma > 2.0 * s_s else "style")
    assert plan.content_share(0.0) >= plan.content_share(1.0)


def test_the_subject_wins_early_and_the_style_late():
    # L1: content 4, style 12 -> γ = 1/3; top-4: 4 and 12 -> S_c/γ = 12 against S_s·0.5 = 6 (p=0), ·2 = 24 (p=1)
    up_c, up_s = torch.zeros(16, 16), torch.zeros(16, 16)
    up_c[0, :4], up_s[0, :4] = 1.0, 3.0
    content = Adapter("c", "sd1", {K1: LowRankDelta(down=torch.eye(16), up=up_c, alpha=16.0)})
    style = Adapter("s", "sd1", {K1: LowRankDelta(down=torch.eye(16), up=up_s, alpha=16.0)})
    plan = klora_plan(content, style, top_k=4)
    assert plan.gamma == pytest.approx(1 / 3)
    assert plan.choose(0.0) == {K1: "content"} and plan.choose(1.0) == {K1: "style"}
    assert plan.choose(0.3) == {K1: "content"} and plan.choose(0.4) == {K1: "style"}  # 1.5p + 0.5 = 1 at p = 1/3
    assert plan.adapter(0.0).deltas[K1] is content.deltas[K1]
    assert plan.adapter(1.0).deltas[K1] is style.deltas[K1]


def test_the_step_adapter_keeps_layers_only_one_lora_has_and_the_merge_names_itself():
    content = Adapter("sks", "sd1", {K1: _lora(1.0, 1)})
    style = Adapter("stripes", "sd1", {K1: _lora(1.0, 3), ONLY_STYLE: _lora(1.0, 5)})
    merged = klora_merge(content, style, progress=0.5)
    assert set(merged.deltas) == {K1, ONLY_STYLE}
    assert merged.deltas[ONLY_STYLE] is style.deltas[ONLY_STYLE]
    assert merged.name == "sks+stripes-klora"


def test_loras_with_no_shared_layer_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="share no layer.*cat"):
        klora_plan(Adapter("a", "sd1", {K1: _lora(1.0, 1)}), Adapter("b", "sd1", {K2: _lora(1.0, 2)}))
