"""naming/standard.py: the standard architectures read from shipped data (no diffusers), or built on the meta
device; module_index picks a live target's index or a family's."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lorablend.naming.standard import STANDARD_FAMILIES, module_index, standard_index


def test_each_standard_family_reads_as_its_own_index_and_is_cached():
    for family in ("sd1", "sdxl", "flux", "sd3"):
        index = standard_index(family)
        assert index.family == family and index.modules
        assert standard_index(family) is index
    assert len(standard_index("sd1").modules) == 354


def test_module_index_takes_an_index_a_family_or_refuses_with_the_families():
    index = standard_index("sdxl")
    assert module_index(index) is index and module_index(family="sdxl") is index
    with pytest.raises(ValueError, match="needs a target"):
        module_index()
    with pytest.raises(ValueError, match="unknown family 'sd9'"):
        standard_index("sd9")
    assert "sd35-medium" in STANDARD_FAMILIES


def test_reading_the_data_imports_neither_diffusers_nor_transformers():
    code = ("import sys; from lorablend.naming import standard_index; standard_index('flux'); "
            "print([m for m in ('diffusers', 'transformers') if m in sys.modules])")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
