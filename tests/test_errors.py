"""errors.py: the library's exceptions, and old public names that still import with a deprecation warning."""

import importlib

import pytest

# (module, old name, new name): settings classes all end in ...Settings; the old names go in 0.3
RENAMED = [
    ("lorablend.merge", "MergeOptions", "MergeSettings"),
    ("lorablend.merge.options", "MergeOptions", "MergeSettings"),
    ("lorablend.serve", "ServeConfig", "ServeSettings"),
    ("lorablend.serve.config", "ServeConfig", "ServeSettings"),
    ("lorablend.serve.ray_app", "RayServeOptions", "RayServeSettings"),
    ("lorablend.sweep", "SweepSpec", "SweepSettings"),
    ("lorablend.sweep", "SweepRun", "SweepRunSettings"),
    ("lorablend.sweep.plan", "SweepSpec", "SweepSettings"),
    ("lorablend.sweep.run", "SweepRun", "SweepRunSettings"),
    ("lorablend.sweep.engines", "RayOptions", "RaySweepSettings"),
]


@pytest.mark.parametrize("module, old, new", RENAMED)
def test_an_old_settings_name_still_imports_with_a_deprecation_warning(module, old, new):
    mod = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=rf"{old} is deprecated and will be removed in lorablend 0\.3: use .*{new}"):
        got = getattr(mod, old)
    assert got is getattr(mod, new)
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        getattr(mod, "NoSuchName")
