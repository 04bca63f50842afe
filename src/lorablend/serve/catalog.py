"""What the server can serve, by name: every LoRA file under ``--lora-dir`` (by file stem) plus the LoRAs
registered at run time (``POST /v1/loras``: a path inside the folder under another name, or an upload). A folder
holding ``high.safetensors`` and ``low.safetensors`` is one Wan 2.2 A14B pair, named by the folder.

The folder is rescanned when a name is not known and when the list is asked for, so a file copied in is served
without a restart. A file whose symlinks lead out of the folder is not served. Two files with one stem are
listed by their path inside the folder without suffix (``sdxl/style``) so that no name means two files.

>>> catalog = Catalog("loras/")                                              # doctest: +SKIP
>>> catalog.lookup("style").path                                            # doctest: +SKIP
PosixPath('/srv/loras/style.safetensors')
"""

from __future__ import annotations

import difflib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .security import LORA_SUFFIXES, inside
from .errors import NameTaken, UnknownLora

# Names a client may give: what a file stem in --lora-dir can be (unicode letters too), less what an A1111
# <lora:NAME:W> token or a URL path segment cannot carry: ':' '<' '>' '/' '\\', control characters, a leading dot.
NAME_RULE = re.compile(r"^[^\x00-\x1f\x7f:<>/\\.\s][^\x00-\x1f\x7f:<>/\\]{0,127}$")


@dataclass(frozen=True)
class LoraSource:
    """One servable LoRA: its name, the file, and where it came from (``dir``, ``registered``, ``upload``).
    ``low``: a Wan 2.2 A14B pair's low-noise file (``path`` is then the high-noise one): one adapter, each file on
    its expert.

    >>> LoraSource("ink", Path("loras/ink.safetensors"), "dir").origin
    'dir'
    """

    name: str
    path: Path
    origin: str
    low: Path | None = None

    def stamp(self) -> tuple[int, ...]:
        """(size, mtime in ns) of the file now (of both files of a pair): a parsed adapter is reused only while
        this is unchanged.

        >>> catalog.lookup("ink").stamp()                                      # doctest: +SKIP
        (584216, 1764500000000000000)
        """
        stamp: tuple[int, ...] = ()
        for path in (self.path,) if self.low is None else (self.path, self.low):
            info = path.stat()
            stamp += (info.st_size, info.st_mtime_ns)
        return stamp


def check_name(name: str) -> str:
    """``name`` if a client may register it, else ``ValueError`` saying what is allowed.

    >>> check_name("ink v2"), check_name("水墨画")
    ('ink v2', '水墨画')
    >>> check_name("a:b")
    Traceback (most recent call last):
    ...
    ValueError: LoRA name 'a:b': use 1-128 characters, not starting with '.' or a space, without ':' '<' '>' '/' '\\' or control characters, e.g. ink_v2
    """
    if not isinstance(name, str) or not NAME_RULE.match(name) or name.strip() != name:
        raise ValueError(f"LoRA name {name!r}: use 1-128 characters, not starting with '.' or a space, without "
                         "':' '<' '>' '/' '\\' or control characters, e.g. ink_v2")
    return name


class Catalog:
    """Names -> LoRA files, for one folder; thread-safe (request handlers run in a thread pool).

    >>> Catalog("loras/").names()                                          # doctest: +SKIP
    ['ink', 'paper']
    """

    def __init__(self, lora_dir: str | os.PathLike, uploads: str | os.PathLike | None = None) -> None:
        self.root = Path(lora_dir).resolve()
        self.uploads = Path(uploads).resolve() if uploads is not None else None  # kept uploads: <name><suffix>
        self._lock = threading.Lock()
        self._registered: dict[str, LoraSource] = {}
        self._files: dict[str, LoraSource] = {}
        self._headers: dict[tuple, dict[str, Any]] = {}  # (path, size, mtime) -> header_info: listing re-reads none

    def info(self, source: LoraSource) -> dict[str, Any]:
        """``header_info`` of a source, read once per version of its file (a listing of many files stays cheap).

        >>> catalog.info(catalog.lookup("ink"))["format"]                      # doctest: +SKIP
        'kohya'
        """
        key = (source.path, *source.stamp())
        with self._lock:
            known = self._headers.get(key)
        if known is None:
            known = header_info(source.path)
            with self._lock:
                self._headers = {k: v for k, v in self._headers.items() if k[0] != source.path}
                self._headers[key] = known
        return dict(known)

    def scan(self) -> dict[str, LoraSource]:
        """Read the folder again; returns every servable name (registered names win over nothing: they never
        share a name with a file, registration refuses that).

        >>> sorted(Catalog("loras/").scan())                                 # doctest: +SKIP
        ['ink', 'paper']
        """
        found: list[Path] = []
        for folder, dirs, files in os.walk(self.root):  # links to folders are not followed
            dirs.sort()
            for f in sorted(files):
                path = Path(folder) / f
                if path.suffix.lower() in LORA_SUFFIXES and inside(self.root, path):
                    found.append(path)
        files, found = self._pairs(found)
        stems: dict[str, int] = {}
        for path in found:
            stems[path.stem] = stems.get(path.stem, 0) + 1
        for path in found:
            rel = path.relative_to(self.root)
            name = path.stem if stems[path.stem] == 1 else rel.with_suffix("").as_posix()
            name = rel.as_posix() if name in files else name  # (a pair folder of that name: the file keeps its suffix)
            files[name] = LoraSource(name, path, "dir")
        with self._lock:
            self._files = {**files, **self._uploaded()}
            return {**self._files, **self._registered}

    def _pairs(self, found: list[Path]) -> tuple[dict[str, LoraSource], list[Path]]:
        """Wan 2.2 A14B pairs: a folder holding ``high.<suffix>`` and ``low.<suffix>`` is ONE LoRA named by the
        folder's path in ``--lora-dir`` (``lightning/high.safetensors`` + ``lightning/low.safetensors`` ->
        ``lightning``); the other files are returned as they were."""
        by_folder: dict[Path, dict[str, Path]] = {}
        for path in found:
            if path.parent != self.root and path.stem.lower() in ("high", "low"):
                by_folder.setdefault(path.parent, {})[path.stem.lower()] = path
        pairs, paired = {}, set()
        for folder, sides in by_folder.items():
            if len(sides) == 2:
                name = folder.relative_to(self.root).as_posix()
                pairs[name] = LoraSource(name, sides["high"], "dir", low=sides["low"])
                paired.update(sides.values())
        return pairs, [p for p in found if p not in paired]

    def _uploaded(self) -> dict[str, LoraSource]:
        """The uploads kept in the upload folder (one file per name; a partial upload starts with '.')."""
        if self.uploads is None or not self.uploads.is_dir():
            return {}
        return {p.stem: LoraSource(p.stem, p, "upload") for p in sorted(self.uploads.iterdir())
                if p.is_file() and p.suffix.lower() in LORA_SUFFIXES and not p.name.startswith(".")}

    def names(self) -> list[str]:
        """Every servable name, sorted. >>> Catalog("loras/").names()  # doctest: +SKIP"""
        return sorted(self.scan())

    def lookup(self, name: str) -> LoraSource:
        """The source of ``name``; raises :class:`UnknownLora` naming close matches.

        >>> Catalog("loras/").lookup("stlye")                               # doctest: +SKIP
        Traceback (most recent call last):
        lorablend.serve.errors.UnknownLora: unknown LoRA 'stlye'; did you mean 'style'? ...
        """
        with self._lock:
            known = self._registered.get(name) or self._files.get(name)
        if known is not None and known.path.exists():
            return known
        every = self.scan()
        if name in every:
            return every[name]
        close = difflib.get_close_matches(name, list(every), n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise UnknownLora(f"unknown LoRA {name!r}; {hint}GET /v1/loras lists the {len(every)} LoRAs served")

    def register(self, name: str, path: Path, origin: str) -> LoraSource:
        """Serve ``path`` as ``name``; raises :class:`NameTaken` when the name is in use.

        >>> Catalog("loras/").register("ink2", Path("loras/ink.safetensors"), "registered")  # doctest: +SKIP
        """
        check_name(name)
        every = self.scan()
        with self._lock:
            if name in every:
                raise NameTaken(f"LoRA name {name!r} is taken ({every[name].origin}); pick another name, or "
                                f"DELETE /v1/loras/{name} first if it was registered")
            source = self._registered[name] = LoraSource(name, Path(path), origin)
            return source

    def unregister(self, name: str) -> LoraSource:
        """Stop serving a registered name; a file of the folder cannot be unregistered (it is served while it
        exists): ``NameTaken`` says so, ``UnknownLora`` when the name means nothing.

        >>> catalog.unregister("ink2").origin                                  # doctest: +SKIP
        'registered'
        """
        with self._lock:
            source = self._registered.pop(name, None)
        if source is not None:
            return source
        every = self.scan()
        if name in every and every[name].origin == "upload":  # an upload kept from before a restart
            return every[name]
        if name in every:
            raise NameTaken(f"LoRA {name!r} is a file in --lora-dir: it is served while the file exists; "
                            "remove the file to stop serving it")
        raise UnknownLora(f"unknown LoRA {name!r}; GET /v1/loras lists the LoRAs served")


def header_info(path: Path) -> dict[str, Any]:
    """Format, family and rank of a LoRA file from its header alone (no tensor read): what ``GET /v1/loras``
    shows for a file not parsed yet. ``None`` where the header cannot tell (a pickle; a file no family places, or one
    that fits several models alike).

    >>> header_info(Path("style.safetensors"))                              # doctest: +SKIP
    {'format': 'kohya', 'family': 'sd1', 'rank': 16}
    """
    from ..io.detect import detect_format
    from ..io.load import family_from_header
    from ..io.safetensors import read_header

    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] != b"{":
        return {"format": "pickle", "family": None, "rank": None}
    header = read_header(path)
    names = [e.name for e in header.entries]
    downs = [e for e in header.entries if e.name.endswith(("lora_down.weight", "lora_A.weight", "lora.down.weight"))]
    # load_adapter's own rule on the names and shapes (every family: Qwen-Image, Wan … too), no tensor read
    family = family_from_header({e.name: tuple(e.shape) for e in header.entries}, dict(header.metadata))
    return {"format": detect_format(names), "family": family,
            "rank": max((e.shape[0] for e in downs if e.shape), default=None)}


__all__ = ["Catalog", "LoraSource", "check_name", "header_info"]
