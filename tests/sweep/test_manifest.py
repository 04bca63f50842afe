"""sweep/manifest.py: one JSON line per finished cell, appended whole; a cut line or a changed image is redone."""

from __future__ import annotations

from lorablend.sweep.manifest import append_line, done_cells, read_manifest, rewrite_manifest, sha256_file


def test_lines_append_and_read_back_the_last_per_key(tmp_path):
    m = tmp_path / "manifest.jsonl"
    append_line(m, {"key": "a", "file": "a.png", "sha256": "1"})
    append_line(m, {"key": "a", "file": "a.png", "sha256": "2"})
    assert read_manifest(m) == {"a": {"key": "a", "file": "a.png", "sha256": "2"}}
    assert read_manifest(tmp_path / "none.jsonl") == {}


def test_a_line_cut_by_a_crash_is_skipped_and_the_next_starts_on_its_own_line(tmp_path):
    m = tmp_path / "manifest.jsonl"
    append_line(m, {"key": "a"})
    with open(m, "a") as f:
        f.write('{"key": "b", "fi')  # a crash mid-write
    append_line(m, {"key": "c"})
    assert sorted(read_manifest(m)) == ["a", "c"]


def test_done_means_the_file_is_there_with_its_hash(tmp_path):
    (tmp_path / "a.png").write_bytes(b"image a")
    (tmp_path / "b.png").write_bytes(b"changed")
    records = {"a": {"file": "a.png", "sha256": sha256_file(tmp_path / "a.png")},
               "b": {"file": "b.png", "sha256": "0" * 64}, "c": {"file": "c.png", "sha256": "0"}}
    assert list(done_cells(tmp_path, records)) == ["a"]


def test_rewrite_replaces_the_manifest_with_exactly_the_records(tmp_path):
    m = tmp_path / "manifest.jsonl"
    append_line(m, {"key": "old"})
    rewrite_manifest(m, [{"key": "x"}, {"key": "y"}])
    assert m.read_text() == '{"key": "x"}\n{"key": "y"}\n'
