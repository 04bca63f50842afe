"""merge/report.py: what a merge did, layer by layer."""

from __future__ import annotations

import torch

from lorablend import merge_with_report
from lorablend.adapter import Adapter, LowRankDelta
from lorablend.merge.report import LayerMerge, MergeReport


def test_the_report_keeps_the_largest_error_of_its_layers():
    r = MergeReport(method="svd", adapters=["a", "b"], weights=[0.7, 0.8])
    r.layers.append(LayerMerge("unet.x", 4, 1e-3, ("a", "b"), "factors"))
    r.layers.append(LayerMerge("unet.y", 2, 5e-2, ("a",), "dense"))
    assert r.max_rel_error == 5e-2


def test_a_merge_reports_every_layer_it_wrote():
    g = torch.Generator().manual_seed(0)
    def lora(name, keys):
        return Adapter(name, "sd1", {k: LowRankDelta(torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g))
                                     for k in keys})
    merged, report = merge_with_report([lora("a", ["unet.p", "unet.q"]), lora("b", ["unet.q"])], [1.0, 0.5],
                                       method="cat")
    assert sorted(layer.key for layer in report.layers) == ["unet.p", "unet.q"] == sorted(merged.deltas)
    assert report.max_rel_error == 0.0  # cat is exact
