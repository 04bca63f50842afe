"""lorablend/__init__.py: the public names; the heavy ones (diffusers, the readers) load on first use."""

from __future__ import annotations

import subprocess
import sys

import pytest

import lorablend


def test_every_public_name_resolves():
    for name in lorablend.__all__:
        assert getattr(lorablend, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        lorablend.nothing_here


def test_merge_is_callable_and_its_package_importable():
    import lorablend.merge as merge_package

    assert callable(lorablend.merge) and callable(lorablend.merge_with_report)
    assert merge_package.__name__ == "lorablend.merge"


def test_import_loads_neither_diffusers_nor_the_readers():
    code = ("import sys, lorablend; print(sorted(m for m in ('diffusers', 'transformers', 'lorablend.io.load') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
