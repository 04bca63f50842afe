"""The merge chart: one row per method, each bar split by outcome in proportion, the legend on top."""

from __future__ import annotations

import numpy as np

from lorablend.evaluate.chart import BAR_W, COLOURS, merge_chart
from lorablend.evaluate.merges import MergeEval, Row


def test_bars_are_split_in_proportion_and_rows_follow_the_methods():
    rows = [Row("stripes", "cat", {"both": 3, "subject_only": 1, "style_only": 0, "neither": 0},
                np.zeros((4, 32, 32, 3), dtype=np.float32)),
            Row("stripes", "ties", {"both": 0, "subject_only": 0, "style_only": 0, "neither": 4})]
    sheet = np.asarray(merge_chart(MergeEval(rows, [0, 1, 2, 3], 20)).convert("RGB"))
    colours = [tuple(int(v) for v in px) for px in sheet.reshape(-1, 3)]
    both, subject, neither = (sum(c == COLOURS[k] for c in colours) for k in ("both", "subject_only", "neither"))
    # bar heights are equal, so pixel counts (less the legend's 13x13 swatch and a label) go as the widths
    assert both > 2.5 * subject > 0
    assert neither > both  # ties: one full-width bar of "neither"
    assert sheet.shape[1] > BAR_W
