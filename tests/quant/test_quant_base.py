"""The format interface every quantized format builds on (quant/base.py): a snapshot holds the stored objects
themselves, restore rebinds them, and the defaults describe a plain weight."""

from __future__ import annotations

import pytest
import torch

from lorablend.quant.base import QuantFormat, Snapshot, type_name
from lorablend.quant.formats import formats


def test_snapshot_and_restore_rebind_the_very_objects():
    layer = torch.nn.Linear(4, 3)
    fmt = QuantFormat()
    snap = fmt.snapshot(layer)
    original = layer.weight
    layer.weight = torch.nn.Parameter(torch.zeros(3, 4))
    fmt.restore(layer, snap)
    assert layer.weight is original and isinstance(snap, Snapshot)
    assert fmt.shape(layer) == (3, 4) and fmt.fused_rounding(layer) == 0.0
    assert torch.equal(fmt.stored_state(layer)["weight"], original.detach())


def test_a_format_must_say_how_it_decodes_and_every_known_format_builds_on_the_base():
    with pytest.raises(NotImplementedError):
        QuantFormat().dequantize(torch.nn.Linear(2, 2), Snapshot(torch.zeros(2, 2)))
    assert all(isinstance(f, QuantFormat) for f in formats())
    assert type_name(torch.nn.Parameter(torch.zeros(1))) == "Parameter"
