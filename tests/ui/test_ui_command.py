"""``lorablend view``: the flags, and no page beyond this machine without a token."""

from __future__ import annotations

import pytest

from lorablend.cli import main
from lorablend.ui.command import check_exposure


def test_loopback_needs_no_token_other_addresses_do():
    for host in ("127.0.0.1", "localhost", "::1"):
        check_exposure(host, None)
    check_exposure("0.0.0.0", "t0k")
    with pytest.raises(ValueError, match="--token"):
        check_exposure("0.0.0.0", None)
    with pytest.raises(ValueError, match="--token"):
        check_exposure("my-host.example", "")


def test_view_of_a_folder_that_is_no_sweep_exits_2_with_the_reason(tmp_path, capsys):
    pytest.importorskip("fastapi")
    assert main(["view", str(tmp_path)]) == 2
    assert "no sweep here" in capsys.readouterr().err
