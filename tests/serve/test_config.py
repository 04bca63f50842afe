"""serve/config.py: the server's settings, checked once at start-up (before the model loads), and its limit flags."""

from __future__ import annotations

import argparse

import pytest

from lorablend.serve.config import LIMIT_FLAGS, ServeSettings, add_limit_flags, limits_given


def test_good_settings_pass_and_bad_ones_name_their_flag(tmp_path):
    assert ServeSettings(lora_dir=tmp_path).check().max_batch == 4
    for kw, flag in [(dict(cache_bytes=0), "--cache-bytes"), (dict(max_batch=-1), "--max-batch"),
                     (dict(drain_seconds=-1), "--drain-seconds"), (dict(token="  "), "--token")]:
        with pytest.raises(ValueError, match=flag):
            ServeSettings(lora_dir=tmp_path, **kw).check()
    with pytest.raises(ValueError, match="--lora-dir"):
        ServeSettings(lora_dir=tmp_path / "none").check()


def test_each_limit_is_a_flag_and_only_the_given_ones_are_passed_on():
    p = argparse.ArgumentParser()
    add_limit_flags(p)
    args = p.parse_args(["--max-steps", "9"])
    assert args.max_steps == 9
    assert limits_given(args) == {"max_steps": 9}
    assert set(LIMIT_FLAGS) <= set(ServeSettings.__dataclass_fields__)
