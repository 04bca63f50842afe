"""``OUT/manifest.jsonl``: one JSON line per finished cell, appended as each cell's image is on disk, so an
interrupted sweep knows what it made. A line is written with one ``write`` on a file opened for appending (POSIX
appends of one call do not interleave; a crash leaves at most a cut last line, which the reader skips). At the end
of a run the manifest is rewritten atomically: one line per cell, in plan order.

>>> import tempfile, pathlib
>>> out = pathlib.Path(tempfile.mkdtemp())
>>> append_line(out / "manifest.jsonl", {"key": "k", "file": "images/a.png", "sha256": "x"})
>>> list(read_manifest(out / "manifest.jsonl"))
['k']
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from ..outputs import atomic_write


def sha256_file(path: str | os.PathLike) -> str:
    """The file's sha256, hex. >>> sha256_file(__file__) == sha256_file(__file__)
    True
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{key: record}`` of every whole line (the last line for a key wins); a missing file is an empty manifest.

    >>> read_manifest("no-such-manifest.jsonl")
    {}
    """
    records: dict[str, dict[str, Any]] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return records
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash: that cell is simply not done
            continue
        if isinstance(record, dict) and isinstance(record.get("key"), str):
            records[record["key"]] = record
    return records


def done_cells(out: str | os.PathLike, records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The records whose image is on disk with the recorded sha256 (a missing or changed file is redone).

    >>> done_cells(".", {"k": {"file": "no-such.png", "sha256": "0"}})
    {}
    """
    done = {}
    for key, record in records.items():
        file = Path(out) / str(record.get("file", ""))
        if record.get("file") and file.is_file() and sha256_file(file) == record.get("sha256"):
            done[key] = record
    return done


def append_line(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record as one line, in one write, flushed to disk before returning. >>> see the module"""
    data = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        if os.fstat(fd).st_size and _last_byte(path) != b"\n":
            data = b"\n" + data  # after a cut line: start ours on a line of its own
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _last_byte(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def rewrite_manifest(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> Path:
    """Replace the manifest, atomically, with exactly ``records`` (one line each, in the given order).

    >>> import tempfile, pathlib
    >>> rewrite_manifest(pathlib.Path(tempfile.mkdtemp()) / "m.jsonl", [{"key": "a"}]).read_text()
    '{"key": "a"}\\n'
    """
    lines = [(json.dumps(r, sort_keys=True) + "\n").encode("utf-8") for r in records]
    return atomic_write(path, lines, overwrite=True)


__all__ = ["append_line", "done_cells", "read_manifest", "rewrite_manifest", "sha256_file"]
