"""serve/security.py: what a client may not do — escape the LoRA folder (403), call without the token (401)."""

from __future__ import annotations

import pytest

from lorablend.serve.errors import Forbidden
from lorablend.serve.security import inside, resolve_inside, token_ok


def test_names_resolve_inside_the_folder_and_escapes_are_refused(tmp_path):
    (tmp_path / "ink.safetensors").write_bytes(b"x")
    assert resolve_inside(tmp_path, "ink.safetensors") == (tmp_path / "ink.safetensors").resolve()
    for escape in ("../etc/passwd", "/etc/passwd", "a/../../x.safetensors"):
        with pytest.raises((Forbidden, PermissionError)):
            resolve_inside(tmp_path, escape)


def test_a_symlink_out_of_the_folder_is_not_inside(tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"x")
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "link.safetensors").symlink_to(outside)
    assert inside(folder.resolve(), (folder / "a.safetensors").resolve())
    assert not inside(folder.resolve(), (folder / "link.safetensors").resolve())


def test_the_token_is_checked_as_bearer_or_basic_password():
    import base64

    assert token_ok("s3cret", "Bearer s3cret") and not token_ok("s3cret", "Bearer nope")
    assert not token_ok("s3cret", None) and token_ok(None, None)
    basic = "Basic " + base64.b64encode(b"user:s3cret").decode()
    assert token_ok("s3cret", basic)
