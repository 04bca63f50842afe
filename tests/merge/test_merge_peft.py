"""lorablend.merge against PEFT's ``add_weighted_adapter`` on the same factors, weights and seeds.

Each case builds a one-layer torch model (a Linear or a 3×3 Conv2d), wraps it with peft holding two LoRAs
whose A/B we set by hand (alpha ≠ rank), merges with PEFT and with us, and compares ΔW. One layer per model
so that PEFT's global RNG and our per-layer generator draw the same DARE masks: we re-seed the global RNG
with our per-layer seed right after PEFT creates the merged adapter's layers (their init draws random
numbers too); nothing of PEFT's math is touched.

Where PEFT differs from the exact math on purpose we test the math instead (test_merge.py): the svd family's
double-applied scale reported for older peft is not present in peft 0.21.2, so `svd` is compared here too.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora.model import LoraModel  # noqa: E402

from lorablend.adapter import Adapter, LowRankDelta  # noqa: E402
from lorablend.merge import layer_seed, merge  # noqa: E402

KEY = "unet.mid_block.attentions.0.proj_in"
SEED = 1234


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(20, 14)


class OneConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Conv2d(6, 10, 3)


def make_factors(conv: bool, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if conv:
        return torch.randn(rank, 6, 3, 3, generator=g), torch.randn(10, rank, 1, 1, generator=g)
    return torch.randn(rank, 20, generator=g), torch.randn(14, rank, generator=g)


def peft_delta(conv, factors, alphas, weights, combination_type, monkeypatch, **kwargs) -> torch.Tensor:
    model = OneConv() if conv else OneLinear()
    names = ["p0", "p1"]
    configs = [LoraConfig(r=f[0].shape[0], lora_alpha=al, target_modules=["layer"]) for f, al in zip(factors, alphas)]
    pm = get_peft_model(model, configs[0], adapter_name=names[0])
    pm.add_adapter(names[1], configs[1])
    layer = pm.base_model.model.layer
    for name, (down, up) in zip(names, factors):
        layer.lora_A[name].weight.data = down.clone()
        layer.lora_B[name].weight.data = up.clone()

    original = LoraModel.inject_adapter

    def inject_then_seed(self, *args, **kw):
        out = original(self, *args, **kw)
        torch.manual_seed(layer_seed(SEED, KEY))
        return out

    monkeypatch.setattr(LoraModel, "inject_adapter", inject_then_seed)
    pm.base_model.add_weighted_adapter(names, weights, "merged", combination_type=combination_type, **kwargs)
    monkeypatch.setattr(LoraModel, "inject_adapter", original)
    return layer.get_delta_weight("merged").detach()


def ours(factors, alphas, weights, method, **kwargs) -> torch.Tensor:
    adapters = [
        Adapter(f"p{i}", "sd1", {KEY: LowRankDelta(down=down, up=up, alpha=al)})
        for i, ((down, up), al) in enumerate(zip(factors, alphas))
    ]
    return merge(adapters, weights, method, seed=SEED, **kwargs).deltas[KEY].delta_weight()


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


CASES = [
    ("cat", {}, {}),
    ("svd", {"svd_rank": 3}, {"rank": 3}),
    ("svd", {"svd_rank": 8}, {"rank": 8}),
    ("linear", {}, {}),
    ("ties", {"density": 0.5}, {"density": 0.5}),
    ("ties", {"density": 0.6, "majority_sign_method": "frequency"}, {"density": 0.6, "majority_sign": "frequency"}),
    ("dare_linear", {"density": 0.5}, {"density": 0.5}),
    ("dare_ties", {"density": 0.7}, {"density": 0.7}),
    ("magnitude_prune", {"density": 0.4}, {"density": 0.4}),
    ("ties_svd", {"density": 0.5, "svd_rank": 4}, {"density": 0.5, "rank": 4}),
    ("dare_linear_svd", {"density": 0.5, "svd_rank": 4}, {"density": 0.5, "rank": 4}),
    ("dare_ties_svd", {"density": 0.6, "svd_rank": 4}, {"density": 0.6, "rank": 4}),
    ("magnitude_prune_svd", {"density": 0.3, "svd_rank": 4}, {"density": 0.3, "rank": 4}),
]


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv3x3"])
@pytest.mark.parametrize("method, peft_kwargs, our_kwargs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_matches_peft_add_weighted_adapter(conv, method, peft_kwargs, our_kwargs, monkeypatch):
    factors = [make_factors(conv, 4, 1), make_factors(conv, 4, 2)]
    alphas = [1.0, 8.0]  # scales 0.25 and 2.0
    weights = [0.7, -0.4]
    expected = peft_delta(conv, factors, alphas, weights, method, monkeypatch, **peft_kwargs)
    got = ours(factors, alphas, weights, method, **our_kwargs)
    assert got.shape == expected.shape
    assert rel(got, expected) < 1e-5, method


def test_cat_and_svd_match_peft_with_different_ranks(monkeypatch):
    factors = [make_factors(False, 3, 5), make_factors(False, 6, 6)]
    alphas = [3.0, 1.0]
    for method, pk, ok in (("cat", {}, {}), ("svd", {"svd_rank": 5}, {"rank": 5})):
        expected = peft_delta(False, factors, alphas, [0.5, 1.2], method, monkeypatch, **pk)
        got = ours(factors, alphas, [0.5, 1.2], method, **ok)
        assert rel(got, expected) < 1e-5, method
