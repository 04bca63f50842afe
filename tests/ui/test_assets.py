"""The pages' shipped files: exactly the files in ui/static, served by name only, with a policy that runs no
inline or foreign code."""

from __future__ import annotations

import re

import pytest

from lorablend.ui.assets import CONTENT_SECURITY_POLICY, PAGE_HEADERS, asset, asset_names


def test_every_shipped_file_is_served_with_its_media_type_and_nothing_else_is():
    names = asset_names()
    assert {"playground.html", "playground.js", "png_text.js", "viewer.html", "viewer.js", "page.css"} <= set(names)
    for name in names:
        data, media_type = asset(name)
        assert data and media_type.split(";")[0] in ("text/html", "text/javascript", "text/css")
    for bad in ("../assets.py", "static/page.css", "", "PAGE.CSS", "page.css\x00"):
        with pytest.raises(KeyError):
            asset(bad)


def test_the_pages_load_only_their_own_files_and_have_no_inline_code():
    for page in ("playground.html", "viewer.html"):
        html = asset(page)[0].decode()
        assert not re.search(r"<script>|\son\w+=|style=", html), page  # the policy would block them: none exist
        for ref in re.findall(r'(?:src|href)="([^"]+)"', html):
            assert ref.startswith("/ui/") and ref[4:] in asset_names(), ref
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY and "unsafe-inline" not in CONTENT_SECURITY_POLICY
    assert PAGE_HEADERS["X-Frame-Options"] == "DENY" and PAGE_HEADERS["Referrer-Policy"] == "no-referrer"


def test_the_token_is_kept_in_session_storage_and_sent_as_a_header_only():
    js = asset("playground.js")[0].decode()
    assert "sessionStorage" in js and "localStorage" not in js
    assert "Authorization" in js and not re.search(r"[?&]token=", js)
