"""The sweep viewer's data: planned and made cells, finished or running, images only from the sweep's images/."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lorablend.ui.viewer import create_viewer_app, image_path, sweep_view  # noqa: E402


def _sweep(tmp_path, cells, made, plan=True):
    (tmp_path / "images").mkdir()
    marker = {"settings": {"loras": [["/x/ink.safetensors", "ink"]], "steps": 2}}
    if plan:
        marker["plan"] = {"cells": cells}
    (tmp_path / "sweep.json").write_text(json.dumps(marker))
    lines = []
    for cell in cells[:made]:
        (tmp_path / cell["file"]).write_bytes(b"\x89PNG fake")
        lines.append(json.dumps({**cell, "sha256": "0" * 64}))
    (tmp_path / "manifest.jsonl").write_text("".join(line + "\n" for line in lines))
    return tmp_path


CELLS = [{"key": f"k{i}", "prompt": "a cat", "prompt_index": 0, "seed": i, "loras": {"ink": 0.5},
          "file": f"images/c{i}.png"} for i in range(3)]


def test_a_running_sweep_shows_planned_cells_and_which_are_made(tmp_path):
    view = sweep_view(_sweep(tmp_path, CELLS, made=2))
    assert view["total"] == 3 and [c["done"] for c in view["cells"]] == [True, True, False]
    assert view["names"] == ["ink"] and not view["finished"]
    assert view["cells"][0]["line"]["sha256"] == "0" * 64


def test_a_sweep_without_a_plan_is_read_from_its_manifest(tmp_path):
    view = sweep_view(_sweep(tmp_path, CELLS, made=3, plan=False))
    assert view["total"] == 3 and all(c["done"] for c in view["cells"])
    assert not view["finished"]  # no grid.png yet: the run has not ended
    (tmp_path / "grid.png").write_bytes(b"png")
    assert sweep_view(tmp_path)["finished"]


def test_images_come_only_from_the_sweeps_images_folder(tmp_path):
    folder = _sweep(tmp_path, CELLS, made=1)
    assert image_path(folder, "images/c0.png") == (folder / "images/c0.png").resolve()
    (folder / "secret.png").write_bytes(b"x")
    for bad in ("images/c1.png", "secret.png", "images/../secret.png", "sweep.json", "/etc/passwd"):
        with pytest.raises(FileNotFoundError):
            image_path(folder, bad)


def test_the_viewer_app_wants_its_token_for_the_data_not_for_the_page(tmp_path):
    client = TestClient(create_viewer_app(_sweep(tmp_path, CELLS, made=1), token="t0k"))
    assert client.get("/").status_code == 200
    assert client.get("/api/sweep").status_code == 401
    auth = {"Authorization": "Bearer t0k"}
    assert client.get("/api/sweep", headers=auth).json()["total"] == 3
    assert client.get("/api/image/images/c0.png", headers=auth).content == b"\x89PNG fake"
    assert client.get("/api/image/sweep.json", headers=auth).status_code == 404


def test_a_folder_that_is_no_sweep_is_refused_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass the -o folder of a lorablend sweep"):
        create_viewer_app(tmp_path)
