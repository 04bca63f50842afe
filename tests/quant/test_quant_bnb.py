"""quant/bnb.py: bitsandbytes NF4 and int8 linears under the QuantFormat contract (logical size of packed 4-bit
storage, dequantize, requantize within the stated rounding, restore bit for bit)."""

from __future__ import annotations

import pytest

pytest.importorskip("bitsandbytes")
from quant_roundtrip import check_format_contract  # noqa: E402


@pytest.mark.parametrize("method, label, tol", [("nf4", "bnb-nf4", 0.15), ("int8", "bnb-int8", 0.02)])
def test_bitsandbytes_layers_keep_the_format_contract(method, label, tol):
    check_format_contract(method, label, rel_tol=tol)
