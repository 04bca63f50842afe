"""quant/torchao.py: torchao's int8 weight-only linear under the QuantFormat contract (size, dequantize,
requantize within the stated rounding, restore bit for bit)."""

from __future__ import annotations

import pytest

pytest.importorskip("torchao")
from quant_roundtrip import check_format_contract  # noqa: E402


def test_torchao_int8_keeps_the_format_contract():
    check_format_contract("torchao-int8", "torchao-Int8", rel_tol=0.02)
