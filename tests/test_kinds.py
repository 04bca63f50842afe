"""Every Delta kind answers the same questions (lorablend.kinds): its shape and ΔW agree, its factors multiply to
its ΔW, it fits the weights it was made for and names the ones it does not, and what it writes in a kohya file
reads back as the same kind with the same tensors."""

from __future__ import annotations

import pytest
import torch

from lorablend.io.deltas import ModuleGroup, build_delta
from lorablend.kinds import KINDS, DoRADelta, FullDelta, LoHaDelta, LoKrDelta, LowRankDelta

from conftest import assert_same_computed


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)))


SAMPLES = {
    "lora linear": lambda: LowRankDelta(rnd(4, 12), rnd(10, 4), alpha=2.0),
    "lora conv": lambda: LowRankDelta(rnd(4, 6, 3, 3), rnd(8, 4, 1, 1), alpha=8.0),
    "lora tucker": lambda: LowRankDelta(rnd(4, 6, 1, 1), rnd(8, 4, 1, 1), mid=rnd(4, 4, 3, 3), alpha=4.0),
    "loha": lambda: LoHaDelta(rnd(10, 2), rnd(2, 12), rnd(10, 2, seed=1), rnd(2, 12, seed=1), alpha=1.0),
    "loha tucker": lambda: LoHaDelta(rnd(2, 8), rnd(2, 6), rnd(2, 8, seed=1), rnd(2, 6, seed=1), alpha=2.0,
                                     t1=rnd(2, 2, 3, 3), t2=rnd(2, 2, 3, 3, seed=1)),
    "lokr full w1": lambda: LoKrDelta(w1=rnd(2, 3), w2_a=rnd(5, 2), w2_b=rnd(2, 4), alpha=1.0),
    "lokr both low rank": lambda: LoKrDelta(w1_a=rnd(4, 2), w1_b=rnd(2, 6), w2_a=rnd(5, 2), w2_b=rnd(2, 7), alpha=1.0),
    "lokr conv": lambda: LoKrDelta(w1=rnd(3, 2), w2=rnd(6, 4, 3, 3)),
    "full": lambda: FullDelta(rnd(6, 5), diff_b=rnd(6)),
    "dora out": lambda: DoRADelta(LowRankDelta(rnd(4, 12), rnd(10, 4), alpha=2.0), rnd(10).abs() + 1, "out"),
    "dora in": lambda: DoRADelta(LowRankDelta(rnd(4, 12), rnd(10, 4), alpha=2.0), rnd(1, 12).abs() + 1, "in"),
}


def weight_for(delta) -> torch.Tensor:
    return rnd(*delta.shape, seed=5)


@pytest.mark.parametrize("name", SAMPLES)
def test_shape_out_features_and_delta_weight_agree(name):
    d = SAMPLES[name]()
    base = weight_for(d) if d.needs_base else None
    dense = d.delta_weight(base=base)
    assert tuple(dense.shape) == d.shape and dense.dtype == torch.float32
    assert d.out_features == d.shape[0]
    assert d.fit_problem(d.shape) is None
    wrong = (d.shape[0] + 1, *d.shape[1:])
    assert str(d.shape) in d.fit_problem(wrong) and str(wrong) in d.fit_problem(wrong)


@pytest.mark.parametrize("name", SAMPLES)
def test_factors_multiply_to_the_delta(name):
    d = SAMPLES[name]()
    dense = d.delta_weight(base=weight_for(d) if d.needs_base else None).reshape(d.shape[0], -1)
    low = d.low_rank_factors()
    assert (low is not None) == (d.kind == "lora")  # only a plain LoRA is one cheap low-rank pair
    exact = d.exact_factors()
    if exact is not None:
        assert_same_computed(exact[0] @ exact[1], dense)
        assert exact[0].shape[1] < min(dense.shape)  # factors are offered only where they are smaller
    if low is not None:
        assert_same_computed(low[0] @ low[1], dense)


@pytest.mark.parametrize("name", SAMPLES)
def test_bias_base_and_offline_view(name):
    d = SAMPLES[name]()
    assert d.changes_bias == (name == "full")
    assert (d.delta_bias() is not None) == d.changes_bias
    assert d.needs_base == name.startswith("dora")
    free = d.base_free()
    assert not free.needs_base and (free is d) == (not d.needs_base)
    if d.needs_base:
        with pytest.raises(ValueError, match="base"):
            d.delta_weight()


# kohya suffix -> the role readers sort it into
_ROLE = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "dora_scale": "dora_scale"}


@pytest.mark.parametrize("name", SAMPLES)
def test_kohya_names_read_back_as_the_same_kind_and_tensors(name):
    d = SAMPLES[name]()
    written = dict(d.kohya_tensors(d.shape))
    group = ModuleGroup("m", {_ROLE.get(suffix, suffix): f"m.{suffix}" for suffix in written})
    back = build_delta(group, {f"m.{suffix}": t for suffix, t in written.items()})
    assert type(back) is type(d) and back.kind == d.kind and back.scale == d.scale
    if isinstance(d, DoRADelta):
        assert back.axis == d.axis and type(back.inner) is type(d.inner)
    for x, y in zip(d.tensors(), back.tensors()):  # tensors we write: bit for bit (module-shaped views allowed)
        assert torch.equal(x.flatten(), y.flatten())


def test_which_kinds_a_peft_file_holds():
    problems = {name: SAMPLES[name]().peft_problem() for name in SAMPLES}
    assert problems["lora linear"] is None and problems["lora tucker"] is None and problems["dora out"] is None
    assert problems["loha"] == "loha" and problems["lokr conv"] == "lokr" and problems["full"] == "full"
    assert problems["dora in"] == "DoRA with per-input-column magnitudes"
    assert DoRADelta(SAMPLES["loha"](), rnd(10).abs()).peft_problem() == "DoRA on loha"
    tensors = SAMPLES["dora out"]().peft_tensors((10, 12))
    assert set(tensors) == {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}


def test_scale_is_alpha_over_rank_and_one_without_alpha():
    assert LowRankDelta(rnd(4, 3), rnd(2, 4), alpha=2.0).scale == 0.5
    assert LowRankDelta(rnd(4, 3), rnd(2, 4)).scale == 1.0
    assert LowRankDelta(rnd(4, 3), rnd(2, 4), alpha=0.0).scale == 1.0  # kohya's rule, not ComfyUI's zero
    assert FullDelta(rnd(2, 2)).scale == 1.0 and FullDelta(rnd(2, 2)).rank is None


def test_the_registry_tells_kinds_apart_by_their_roles():
    for i, a in enumerate(KINDS):
        for b in KINDS[i + 1:]:
            assert not (a.roles & b.roles), (a.kind, b.kind)
        assert not (a.roles & DoRADelta.roles)
    assert {k.kind for k in KINDS} == {"lora", "loha", "lokr", "full"}
