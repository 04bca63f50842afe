"""The playground's routes on a server with a token: the page and its files are public, the API is not."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from lorablend.serve.security import TokenCheck  # noqa: E402
from lorablend.ui.page import add_page_routes, is_public_path  # noqa: E402


@pytest.fixture
def client():
    app = FastAPI()
    add_page_routes(app)

    @app.get("/v1/secret")
    async def secret() -> dict:
        return {"ok": True}

    app.add_middleware(TokenCheck, token="s3cret", public=is_public_path)
    return TestClient(app)


def test_page_and_files_need_no_token_the_api_does(client):
    home = client.get("/")
    assert home.status_code == 200 and home.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in home.headers["content-security-policy"]
    assert client.get("/ui/playground.js").status_code == 200
    assert client.get("/favicon.ico").status_code == 204
    assert client.get("/v1/secret").status_code == 401
    assert client.get("/v1/secret", headers={"Authorization": "Bearer s3cret"}).json() == {"ok": True}


def test_only_shipped_files_are_served(client):
    assert client.get("/ui/nope.js").status_code == 404
    assert client.get("/ui/..%2Fpage.py").status_code == 404
    assert not is_public_path("/uix/page.css") and not is_public_path("/v1/images")
