"""quant/gguf.py: GGML blocks through gguf-py — the type a fused tensor is written in, and a quantize / dequantize
pair that a re-quantization does not move."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

from lorablend.quant.gguf import dequantize_gguf, fused_quant_type, quantize_gguf  # noqa: E402


def test_a_fused_tensor_keeps_its_type_where_gguf_py_quantizes_it_else_q8_0():
    assert fused_quant_type(T.Q4_0) == T.Q4_0 and fused_quant_type(T.Q8_0) == T.Q8_0
    assert fused_quant_type(T.Q4_K) == T.Q8_0  # a K-quant: gguf-py reads it but cannot write it


@pytest.mark.parametrize("qtype, rel", [(T.Q8_0, 0.01), (T.Q4_0, 0.2)])
def test_quantize_then_dequantize_is_close_and_idempotent(qtype, rel):
    w = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    once = dequantize_gguf(quantize_gguf(w, qtype), qtype)
    assert once.shape == w.shape and np.linalg.norm(once - w) / np.linalg.norm(w) < rel
    again = dequantize_gguf(quantize_gguf(once, qtype), qtype)
    np.testing.assert_array_equal(again, once)  # values already on the grid stay put


def test_an_f32_gguf_layer_unfuses_to_its_own_bytes():
    """gguf-py decodes F32 "blocks" as the very array it was given: a fuse summing in place on it would overwrite
    the layer's original bytes (unfuse would put back a fused weight). The decoded array is always a copy."""
    import contextvars

    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    from lorablend.kinds import LowRankDelta
    from lorablend.runtime.layer_state import LayerTable

    layer = GGUFLinear(64, 32, bias=False, compute_dtype=torch.float32, device="meta")
    layer.weight = GGUFParameter(torch.randn(32, 64), quant_type=T.F32)
    original = torch.Tensor.as_subclass(layer.weight.detach(), torch.Tensor).clone()
    state = LayerTable(contextvars.ContextVar("s", default=1.0)).add("transformer.x", "transformer", layer)
    state.write_fused([(1.0, LowRankDelta(torch.ones(1, 64), torch.ones(32, 1)))])
    fused = torch.Tensor.as_subclass(layer.weight.detach(), torch.Tensor)
    assert torch.equal(fused, original + 1.0)
    state.write_fused([])
    assert torch.equal(torch.Tensor.as_subclass(layer.weight.detach(), torch.Tensor), original)
