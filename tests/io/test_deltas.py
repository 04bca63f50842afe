"""io/deltas.py: one module's tensors, sorted into roles by a reader, become a Delta of the kind the roles make."""

from __future__ import annotations

import torch

from lorablend.io.deltas import ModuleGroup, build_delta, delta_shape, shape_problem
from lorablend.kinds import DoRADelta, FullDelta, LoHaDelta, LowRankDelta


def test_down_up_alpha_make_a_lora_with_its_alpha():
    t = {"m.d": torch.ones(2, 3), "m.u": torch.ones(4, 2), "m.a": torch.tensor(1.0)}
    d = build_delta(ModuleGroup("m", {"down": "m.d", "up": "m.u", "alpha": "m.a"}), t)
    assert isinstance(d, LowRankDelta) and d.alpha == 1.0 and delta_shape(d) == (4, 3)
    assert torch.equal(d.down, t["m.d"]) and torch.equal(d.up, t["m.u"])


def test_the_roles_choose_the_kind():
    loha = {k: torch.ones(4, 2) if k.endswith("a") else torch.ones(2, 3) for k in ("w1a", "w1b", "w2a", "w2b")}
    d = build_delta(ModuleGroup("m", {"hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a",
                                      "hada_w2_b": "w2b"}), loha)
    assert isinstance(d, LoHaDelta) and d.shape == (4, 3)
    full = build_delta(ModuleGroup("m", {"diff": "x"}), {"x": torch.ones(4, 3)})
    assert isinstance(full, FullDelta)


def test_a_magnitude_wraps_the_inner_delta_in_dora():
    t = {"d": torch.ones(2, 3), "u": torch.ones(4, 2), "m": torch.ones(4)}
    d = build_delta(ModuleGroup("m", {"down": "d", "up": "u", "magnitude": "m"}), t)
    assert isinstance(d, DoRADelta) and isinstance(d.inner, LowRankDelta)


def test_a_shape_problem_names_both_shapes():
    d = LowRankDelta(torch.ones(2, 3), torch.ones(4, 2))
    assert shape_problem(d, (4, 3)) is None
    problem = shape_problem(d, (5, 3))
    assert "(4, 3)" in problem and "(5, 3)" in problem
