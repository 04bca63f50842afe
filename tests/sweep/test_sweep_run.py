"""sweep/run.py: what is checked before any model loads (inputs, sizes, the output folder) and how to run."""

from __future__ import annotations

import pytest

from lorablend.sweep.plan import SweepSettings
from lorablend.sweep.run import SweepRunSettings, check_spec


def _spec(tmp_path, **kw):
    (tmp_path / "model").mkdir(exist_ok=True)
    lora = tmp_path / "a.safetensors"
    lora.write_bytes(b"x")
    return SweepSettings(str(tmp_path / "model"), [(str(lora), "a")], [1.0], ["a cat"], [0], **kw)


@pytest.mark.parametrize("kw, error", [(dict(steps=0), "--steps 0"), (dict(width=30), "--width 30")])
def test_bad_sizes_are_refused_by_flag(tmp_path, kw, error):
    with pytest.raises(ValueError, match=error):
        check_spec(_spec(tmp_path, **kw), tmp_path / "out")


def test_a_missing_lora_and_an_output_over_an_input_are_refused(tmp_path):
    spec = _spec(tmp_path)
    check_spec(spec, tmp_path / "out")  # fine
    missing = SweepSettings(spec.model, [(str(tmp_path / "none.safetensors"), "n")], [1.0], ["p"], [0])
    with pytest.raises(FileNotFoundError, match="--lora"):
        check_spec(missing, tmp_path / "out")
    with pytest.raises(Exception, match="input"):
        check_spec(spec, tmp_path / "a.safetensors")
    with pytest.raises(Exception, match="inside an input"):
        check_spec(spec, tmp_path / "model" / "out")


@pytest.mark.parametrize("settings, error", [(dict(engine="spark"), "--engine spark"), (dict(workers=2), "--engine ray"),
                                             (dict(address="auto"), "--engine ray")])
def test_run_settings_refuse_what_the_engine_cannot_do(settings, error):
    with pytest.raises(ValueError, match=error):
        SweepRunSettings(**settings).check()
    assert SweepRunSettings(engine="ray", workers=2).check().workers == 2
