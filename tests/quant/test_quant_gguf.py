"""quant/gguf.py: GGML blocks through gguf-py — the type a fused tensor is written in, and a quantize / dequantize
pair that a re-quantization does not move."""

from __future__ import annotations

import numpy as np
import pytest

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
