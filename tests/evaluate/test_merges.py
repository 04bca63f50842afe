"""``lorablend eval merges``, a 2-seed smoke on the shipped drawing model: every method gives one outcome per
image and the exact merge (cat) draws the blend's images."""

from __future__ import annotations

import numpy as np
import pytest

from lorablend.evaluate.merges import METHODS, OUTCOMES, evaluate_merges

SEEDS = [0, 1]
STEPS = 6  # a smoke: the benchmark itself runs the model's 20 steps


@pytest.fixture(scope="module")
def result():
    return evaluate_merges(seeds=SEEDS, methods=METHODS, styles=["stripes"], steps=STEPS)


def test_every_method_judges_every_image(result):
    assert [r.method for r in result.rows] == list(METHODS)
    for row in result.rows:
        assert set(row.counts) == set(OUTCOMES) and row.n == len(SEEDS), row
        assert row.images.shape == (len(SEEDS), 32, 32, 3)


def test_cat_is_exact_so_it_draws_the_blend(result):
    rows = {r.method: r for r in result.rows}
    assert np.abs(rows["cat"].images - rows["blend"].images).max() < 1e-3
    assert rows["cat"].counts == rows["blend"].counts
    # and a lossy merge is not the blend
    assert np.abs(rows["svd_r1"].images - rows["blend"].images).max() > 1e-3


def test_the_table_has_a_line_per_method(result):
    lines = result.table().splitlines()
    assert len(lines) == 2 + len(METHODS)
    assert lines[2].startswith("| base |")


def test_an_unknown_method_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown merge method.*nope"):
        evaluate_merges(seeds=[0], methods=["nope"])
