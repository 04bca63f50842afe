"""Merging real third-party files (skipped without ../shared/realdata or before lorablend.io can read them).

LoKr + LoRA from real files is covered end to end in test_merge_cli.py."""

from __future__ import annotations

import importlib

import pytest
import torch

from lorablend.errors import LoraCompatibilityError
from lorablend.merge import merge_with_report

from realdata import LORAS, requires_realdata

pytestmark = requires_realdata

TIMO_A = LORAS / "sd1x" / "sd15_diffusers_timo_step2100.safetensors"
TIMO_B = LORAS / "sd1x" / "sd15_diffusers_timo_final.safetensors"
SD2 = LORAS / "sd2x" / "sd21_diffusers_justin.safetensors"


def load(path):
    try:
        io = importlib.import_module("lorablend.io")
        return io.load_adapter(path)
    except (ImportError, AttributeError):
        pytest.skip("lorablend.io.load_adapter is not available yet")


def flat(delta) -> torch.Tensor:
    d = delta.delta_weight().double()
    return d.reshape(d.shape[0], -1)


def test_two_timo_files_cat_is_exact_and_svd_reports_its_error():
    a, b = load(TIMO_A), load(TIMO_B)
    cat, _ = merge_with_report([a, b], [0.7, 0.8], method="cat")
    key = next(iter(a.deltas))
    exact = 0.7 * flat(a.deltas[key]) + 0.8 * flat(b.deltas[key])
    assert float((flat(cat.deltas[key]) - exact).norm() / exact.norm()) < 1e-6
    assert cat.deltas[key].rank == a.deltas[key].rank + b.deltas[key].rank

    svd, report = merge_with_report([a, b], [0.7, 0.8], method="svd", rank=4)
    assert set(svd.deltas) == set(a.deltas) | set(b.deltas)
    layer = report.layers[[l.key for l in report.layers].index(key)]
    u, s, vh = torch.linalg.svd(exact, full_matrices=False)
    dense_err = float(s[4:].norm() / s.norm())
    assert abs(layer.rel_error - dense_err) < 1e-5
    assert svd.metadata["modelspec.merged_from"] == f"{a.name}, {b.name}"


def test_sd15_with_sd2_is_refused():
    a, b = load(TIMO_A), load(SD2)
    with pytest.raises(LoraCompatibilityError, match=r"sd1.*sd2"):
        merge_with_report([a, b], [1.0, 1.0])
