"""The one-example docstrings of the small pure modules run as written."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["lorablend.adapter", "lorablend.report", "lorablend.errors", "lorablend.merge", "lorablend.naming.blocks", "lorablend.naming.ldm"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
