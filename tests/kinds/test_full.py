"""kinds/full.py: a full weight difference (LyCORIS ``diff``) with an optional bias difference."""

from __future__ import annotations

import torch

from lorablend.kinds import FullDelta

g = torch.Generator().manual_seed(3)


def test_the_delta_is_the_diff_itself_and_its_bias_the_diff_b():
    diff, diff_b = torch.randn(6, 5, generator=g), torch.randn(6, generator=g)
    d = FullDelta(diff, diff_b=diff_b)
    assert d.shape == (6, 5) and d.rank is None
    assert torch.equal(d.delta_weight(), diff)
    assert d.changes_bias and torch.equal(d.delta_bias(), diff_b)
    assert not FullDelta(diff).changes_bias


def test_rows_take_the_diff_and_its_bias_alike():
    diff, diff_b = torch.randn(6, 5, generator=g), torch.randn(6, generator=g)
    rows = FullDelta(diff, diff_b=diff_b).take_rows(((4, 6), (0, 1)))
    assert torch.equal(rows.delta_weight(), torch.cat([diff[4:6], diff[0:1]]))
    assert torch.equal(rows.delta_bias(), torch.cat([diff_b[4:6], diff_b[0:1]]))


def test_kohya_writes_diff_and_diff_b():
    d = FullDelta(torch.ones(2, 3), diff_b=torch.zeros(2))
    assert {name for name, _ in d.kohya_tensors((2, 3))} == {"diff", "diff_b"}


def test_a_matrix_has_a_lora_form_a_vector_or_a_bias_alone_has_none():
    # merge (merge/sums.py) sums what has no LoRA form in its own kind: a norm's scale vector, a bias alone
    assert FullDelta(torch.ones(2, 3)).has_lora_form and FullDelta(torch.ones(2, 3)).changes_weight
    norm = FullDelta(torch.ones(3))
    assert not norm.has_lora_form and norm.changes_weight
    bias_only = FullDelta(None, diff_b=torch.ones(3))
    assert not bias_only.has_lora_form and not bias_only.changes_weight
    total, bias = torch.randn(3, generator=g), torch.randn(3, generator=g)
    summed = norm.with_sum(total, bias)
    assert torch.equal(summed.diff, total) and torch.equal(summed.diff_b, bias)
    alone = bias_only.with_sum(None, bias)
    assert alone.diff is None and torch.equal(alone.delta_bias(), bias)
