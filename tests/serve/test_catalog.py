"""serve/catalog.py: names -> LoRA files inside --lora-dir (by stem; a path when two stems clash), registrations,
and unknown names answered with the close ones."""

from __future__ import annotations

import pytest

from lorablend.serve.catalog import Catalog, check_name
from lorablend.serve.errors import NameTaken, UnknownLora


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "style.safetensors").write_bytes(b"x")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "ink.safetensors").write_bytes(b"x")
    (tmp_path / "b" / "ink.safetensors").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not a LoRA")
    return tmp_path


def test_files_are_served_by_stem_and_clashing_stems_by_path(folder):
    assert Catalog(folder).names() == ["a/ink", "b/ink", "style"]


def test_an_unknown_name_suggests_the_close_ones(folder):
    with pytest.raises(UnknownLora, match="unknown LoRA 'stlye'; did you mean 'style'"):
        Catalog(folder).lookup("stlye")


def test_registration_takes_a_free_valid_name_and_gives_it_back(folder):
    catalog = Catalog(folder)
    catalog.register("ink2", folder / "a" / "ink.safetensors", "registered")
    assert catalog.lookup("ink2").path == folder / "a" / "ink.safetensors"
    with pytest.raises(NameTaken):
        catalog.register("style", folder / "style.safetensors", "registered")
    catalog.unregister("ink2")
    with pytest.raises(UnknownLora):
        catalog.lookup("ink2")
    assert check_name("水墨画") == "水墨画"
    for bad in ("a:b", " lead", ".hidden", "x" * 129):
        with pytest.raises(ValueError):
            check_name(bad)


def test_a_folder_with_high_and_low_files_is_one_wan_pair(tmp_path):
    (tmp_path / "lightning").mkdir()
    (tmp_path / "lightning" / "high.safetensors").write_bytes(b"hh")
    (tmp_path / "lightning" / "low.safetensors").write_bytes(b"l")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "high.safetensors").write_bytes(b"x")  # no low: a plain file, by its stem
    (tmp_path / "lightning.safetensors").write_bytes(b"x")  # a file with the pair's name: by its path
    catalog = Catalog(tmp_path)
    assert catalog.names() == ["high", "lightning", "lightning.safetensors"]
    every = catalog.scan()
    pair = every["lightning"]
    assert pair.low == (tmp_path / "lightning" / "low.safetensors").resolve() and pair.path.name == "high.safetensors"
    assert every["high"].low is None and len(pair.stamp()) == 4  # both files' size and mtime
    before = pair.stamp()
    (tmp_path / "lightning" / "low.safetensors").write_bytes(b"changed")
    assert pair.stamp() != before  # a new low file is a new version of the pair
