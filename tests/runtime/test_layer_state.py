"""LayerState owns the fused weight: write_fused from the pristine copy, restore bit for bit, reuse a spare."""

import contextvars

import torch

from lorablend.kinds import LowRankDelta
from lorablend.runtime.fusion import fused_weight
from lorablend.runtime.layer_state import LayerTable


def _layer(seed: int = 0):
    torch.manual_seed(seed)
    table = LayerTable(contextvars.ContextVar("scale", default=1.0))
    module = torch.nn.Linear(6, 5).half()
    delta = LowRankDelta(down=torch.randn(2, 6), up=torch.randn(5, 2))
    return table.add("unet.proj", "unet", module), [(0.7, delta)]


def test_write_fused_keeps_the_original_tensor_and_restores_it_bit_for_bit():
    layer, entries = _layer()
    weight = layer.module.weight
    original = weight.data.clone()
    original_ptr = weight.data_ptr()
    assert layer.write_fused(entries) is None
    assert layer.pristine_weight.data_ptr() == original_ptr and weight.data_ptr() != original_ptr
    assert torch.equal(weight.data, fused_weight(original, entries, out_dtype=weight.dtype))
    freed = layer.write_fused([])  # unfuse: the backup is rebound, the fused tensor handed back
    assert weight.data_ptr() == original_ptr and torch.equal(weight.data, original)
    assert freed is not None and freed.data_ptr() != original_ptr
    layer.release_pristine()
    spares = {layer.key: freed}
    layer.write_fused(entries, spares=spares)  # the next fuse writes into the spare
    assert weight.data_ptr() == freed.data_ptr() and not spares
    assert torch.equal(weight.data, fused_weight(original, entries, out_dtype=weight.dtype))


def test_undo_first_fuse_puts_the_pristine_weight_back_and_forgets_it():
    layer, entries = _layer(seed=1)
    weight = layer.module.weight
    original, original_ptr = weight.data.clone(), weight.data_ptr()
    layer.write_fused(entries)
    assert not torch.equal(weight.data, original)
    layer.undo_first_fuse()
    assert layer.pristine_weight is None and weight.data_ptr() == original_ptr and torch.equal(weight.data, original)
