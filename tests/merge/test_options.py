"""merge/options.py: a merge's settings checked once, when built, with the fix in each refusal."""

from __future__ import annotations

import pytest

from lorablend.merge.options import MergeSettings, check_weights


def test_defaults_and_what_a_method_needs():
    assert MergeSettings().method == "svd"
    assert MergeSettings(method="ties", density=0.5).needs_sign


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="average"), "is not a merge method"),
    (dict(rank=0), "positive integer"),
    (dict(energy=1.5), r"must lie in \(0, 1\]"),
    (dict(clamp=0.0), r"must lie in \(0, 1\]"),
    (dict(method="cat", rank=8), "rank"),
])
def test_a_bad_setting_is_refused_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MergeSettings(**kwargs)


def test_weights_default_to_one_each_and_must_match_the_adapters():
    assert check_weights(None, 2) == [1.0, 1.0]
    assert check_weights([0.5, 2], 2) == [0.5, 2.0]
    with pytest.raises(ValueError):
        check_weights([1.0], 2)
