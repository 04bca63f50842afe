"""Every file or folder lorablend writes goes through here: atomically, never over an input, never over an
existing output unless asked.

The rules, decided once:

* **Atomic**: a file is written to a temp file in the output's own folder (same file system, so the rename is
  atomic), flushed to disk (fsync), then renamed into place; on any failure the temp file is removed and nothing
  appears. A folder is built under a temp name beside the output and swapped in by renames.
* **Inputs are never written over**, even with ``overwrite=True``: not the same path, not a hard link to an input
  (same device and inode), not a symlink that resolves to one, not a folder holding one. A crash halfway
  through a rewrite of its own input would lose the user's only copy.
* **An existing output is kept** unless ``overwrite=True`` (CLI: ``--overwrite``): :class:`OutputExistsError`.
  Without overwrite the final step is a hard link, which fails if the output appeared meanwhile (no race).

This module sits at the top of the package, not in ``io/``, because its callers are not only the file formats:
the CLI's reports, generated PNGs and baked pipeline folders use it too.

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> atomic_write(folder / "note.txt", [b"hello"]).read_bytes()
b'hello'
>>> sorted(p.name for p in folder.iterdir())  # no temp file left behind
['note.txt']
"""

from __future__ import annotations

import os
import secrets
import shutil
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterable, Iterator

from .errors import InputOverwriteError, OutputExistsError


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name one file: the same path once symlinks are resolved, or (both existing)
    the same device and inode, which also catches a hard link.

    >>> same_file("a.safetensors", "./a.safetensors")
    True
    """
    try:
        if os.path.realpath(a) == os.path.realpath(b):
            return True
        sa, sb = os.stat(a), os.stat(b)
    except (OSError, ValueError):  # one does not exist (or cannot be looked at): not the same existing file
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    try:
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))
    except (OSError, ValueError):
        return False


def refuse_input(
    output: str | os.PathLike, inputs: Iterable[str | os.PathLike], *, what: str = "an input"
) -> None:
    """Raise :class:`InputOverwriteError` when writing ``output`` would change one of ``inputs``.

    An output that is an input (path, hard link, symlink), a folder output that holds an input, or an output
    inside an input folder are all refused; ``what`` says what the input is, for the message.

    >>> refuse_input("style.safetensors", ["./style.safetensors"])                 # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lorablend.errors.InputOverwriteError: style.safetensors: that is an input (./style.safetensors); lorablend never...
    """
    out = Path(output)
    for src in inputs:
        if same_file(src, out):
            raise InputOverwriteError(
                f"{out}: that is {what} ({src}); lorablend never overwrites an input, even with --overwrite "
                f"(overwrite=True): write to a new path"
            )
        if out.is_dir() and _inside(src, out):
            raise InputOverwriteError(
                f"{out}: this folder holds {what} ({src}); lorablend never overwrites an input: write to a new folder"
            )
        if Path(src).is_dir() and _inside(out, src):
            raise InputOverwriteError(
                f"{out}: that is inside {what} folder ({src}); lorablend never writes into an input: write elsewhere"
            )


def refuse_existing(output: str | os.PathLike, overwrite: bool) -> None:
    """Raise :class:`OutputExistsError` when ``output`` exists and ``overwrite`` is false.

    >>> refuse_existing(".", overwrite=False)
    Traceback (most recent call last):
    ...
    lorablend.errors.OutputExistsError: . exists; pass --overwrite (overwrite=True) to replace it
    """
    if not overwrite and os.path.lexists(output):
        raise OutputExistsError(f"{output} exists; pass --overwrite (overwrite=True) to replace it")


def check_output(
    output: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False
) -> Path:
    """Both refusals, for a caller to run before any expensive work; returns ``Path(output)``.

    >>> check_output("new.safetensors", inputs=["old.safetensors"])
    PosixPath('new.safetensors')
    """
    refuse_input(output, inputs)
    refuse_existing(output, overwrite)
    return Path(output)


def _temp_name(out: Path, suffix: str) -> Path:
    # hidden, beside the output (same file system: the rename is atomic), unique per call
    return out.parent / f".{out.name}.{secrets.token_hex(6)}.{suffix}"


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable; some systems cannot open a folder for this, which is harmless."""
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_file(
    output: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yield a temp path to write; when the block ends without error it becomes ``output``, else it is removed.

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "report.json"
    >>> with atomic_file(out) as tmp:
    ...     _ = tmp.write_text("{}")
    >>> out.read_text()
    '{}'
    """
    inputs = list(inputs)
    out = check_output(output, inputs=inputs, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(out, "tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask decides, as for any new file
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the bytes are on disk before the name points at them: a crash leaves old or new
        finally:
            os.close(fd)
        refuse_input(out, inputs)  # cheap, and the inputs may have moved while we wrote
        if overwrite:
            os.replace(tmp, out)
        else:
            _link_new(tmp, out)
        _fsync_folder(out.parent)
    finally:
        with suppress(FileNotFoundError):
            os.unlink(tmp)


def _link_new(tmp: Path, out: Path) -> None:
    """Give ``tmp`` the name ``out`` only if ``out`` does not exist (a hard link fails atomically if it does)."""
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise OutputExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it") from None
    except OSError:  # a file system without hard links: check, then rename (a narrow race, the best there is)
        refuse_existing(out, overwrite=False)
        os.replace(tmp, out)


def atomic_write(
    output: str | os.PathLike,
    chunks: Iterable[bytes | memoryview],
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write ``chunks`` to ``output`` atomically (see :func:`atomic_file`); returns ``Path(output)``.

    ``chunks`` may be a generator: an exception it raises midway leaves no file behind.

    >>> import tempfile, pathlib
    >>> atomic_write(pathlib.Path(tempfile.mkdtemp()) / "a.bin", [b"ab", b"cd"]).read_bytes()
    b'abcd'
    """
    with atomic_file(output, overwrite=overwrite, inputs=inputs) as tmp, open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
    return Path(output)


@contextmanager
def atomic_folder(
    output: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yield an empty temp folder to fill; when the block ends without error it becomes ``output``.

    An existing ``output`` (with ``overwrite=True``) is renamed aside, the new folder renamed in, then the old one
    deleted: at every moment ``output`` is a whole folder, old or new. On failure the temp folder is removed.

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "baked"
    >>> with atomic_folder(out) as tmp:
    ...     _ = (tmp / "model_index.json").write_text("{}")
    >>> [p.name for p in out.iterdir()]
    ['model_index.json']
    """
    inputs = list(inputs)
    out = check_output(output, inputs=inputs, overwrite=overwrite)
    if out.exists() and not out.is_dir():  # --overwrite would not help: a file never becomes a folder here
        raise NotADirectoryError(f"{out}: a file is there, and this writes a folder; name a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(out, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        refuse_input(out, inputs)
        _swap_in_folder(tmp, out, overwrite)
        _fsync_folder(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in_folder(tmp: Path, out: Path, overwrite: bool) -> None:
    try:
        os.rename(tmp, out)  # fails if ``out`` exists (as a non-empty folder or a file)
        return
    except OSError:
        if not out.exists() and not out.is_symlink():
            raise
    refuse_existing(out, overwrite)  # it appeared while we were writing
    old = _temp_name(out, "old")
    os.rename(out, old)  # two renames: the output is never a half-written folder
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


__all__ = [
    "InputOverwriteError",
    "OutputExistsError",
    "atomic_file",
    "atomic_folder",
    "atomic_write",
    "check_output",
    "refuse_existing",
    "refuse_input",
    "same_file",
]
