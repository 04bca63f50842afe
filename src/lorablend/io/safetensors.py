"""The safetensors format, in one place: the header reader (every check), the writer, the dtype table, the hash.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of UTF-8 JSON (padded with
spaces), then the data section: every tensor's bytes, back to back. The JSON maps each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data section) and may hold one
``"__metadata__"`` object of strings.

Everything that reads a header goes through :func:`read_header` (LoRA loading, single-file checkpoints, bake,
hashes): its checks are the reason bake can stream a checkpoint by offsets and a load can take a view per tensor
without asking again. Every check runs before anything proportional to a number in the header is allocated, and
every refusal is a :class:`~lorablend.errors.LoraFormatError` naming the file, the rule broken and the fix.

>>> import torch
>>> header, chunks = serialize({"w": torch.ones(2, 3)}, {"title": "demo"})
>>> h = parse_header(header + b"".join(chunks), "demo.safetensors")
>>> h.by_name["w"].shape, h.by_name["w"].dtype, h.metadata["title"]
((2, 3), 'F32', 'demo')
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from ..errors import LoraFormatError

# ------------------------------------------------------------------------------------------- dtypes

# safetensors dtype name -> bytes per element: the whole-byte dtypes of the format. The sub-byte ones (F4, F6_*)
# have no per-element byte count and no torch tensor of that shape; a file holding them is refused by name.
ITEM_SIZES: Mapping[str, int] = MappingProxyType({
    "BOOL": 1, "U8": 1, "I8": 1,
    "F8_E5M2": 1, "F8_E4M3": 1, "F8_E5M2FNUZ": 1, "F8_E4M3FNUZ": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
})
_TORCH_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8",
    "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E8M0": "float8_e8m0fnu",
    "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16",
    "I32": "int32", "U32": "uint32", "F32": "float32",
    "I64": "int64", "U64": "uint64", "F64": "float64", "C64": "complex64",
}
# safetensors name -> torch dtype, for the dtypes this torch has (older ones lack float8 / unsigned widths).
DTYPES: Mapping[str, torch.dtype] = MappingProxyType({
    name: dtype for name, attr in _TORCH_NAMES.items() if isinstance(dtype := getattr(torch, attr, None), torch.dtype)
})
DTYPE_NAMES: Mapping[torch.dtype, str] = MappingProxyType({dtype: name for name, dtype in DTYPES.items()})
# The float dtypes weights are computed and cast in (fuse, --dtype). float8 is storage only: never a cast target.
FLOAT_DTYPES: tuple[str, ...] = ("F64", "F32", "F16", "BF16")

# ------------------------------------------------------------------------------------------- limits

MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit on the JSON header
MAX_JSON_DEPTH = 8  # a valid header needs 3 levels (file -> entry -> shape); deeper is damage or an attack
_REDOWNLOAD = "download the file again (the copy is damaged or was cut off)"
_NOT_SAFETENSORS = (
    "check that the file is a .safetensors file and not an HTML error page, a Git LFS pointer or a pickle"
)
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_INT = frozenset({int})
_SCAN_CHUNK = 1 << 20  # bytes of header scanned at once for nesting: bounded scratch memory for any header


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: name, dtype name (``"F16"``…), shape, byte range in the data section.

    >>> TensorEntry("w", "F16", (2, 3), 0, 12).nbytes
    12
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    """A checked safetensors header: ``entries`` lie back to back in data order and fill the data section exactly.

    ``data_start`` is the file offset of the data section, so tensor ``e`` is the file's bytes
    ``[data_start + e.start, data_start + e.end)``.

    >>> h = parse_header(serialize({"a": torch.zeros(2)}, {})[0] + bytes(8))
    >>> h.data_start, h.data_length, [e.name for e in h.entries]
    (64, 8, ['a'])
    """

    path: Path
    header_length: int
    data_length: int
    entries: tuple[TensorEntry, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)
    by_name: Mapping[str, TensorEntry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", MappingProxyType({e.name: e for e in self.entries}))

    @property
    def data_start(self) -> int:
        return 8 + self.header_length

    @property
    def file_size(self) -> int:
        return self.data_start + self.data_length

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of tensor ``name``, or None when the file has no such tensor.

        >>> parse_header(serialize({"a": torch.zeros(2, 1)}, {})[0] + bytes(8)).shape("a")
        (2, 1)
        """
        entry = self.by_name.get(name)
        return None if entry is None else entry.shape


# ------------------------------------------------------------------------------------------- reader


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read and check the header of a safetensors file; no tensor is read. Bad files raise ``LoraFormatError``.

    Only the 8-byte length and the JSON are read; the length is checked against the file's size before the
    JSON is read, so a length of 2**63 costs nothing.

    >>> read_header("missing.safetensors")                                    # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lorablend.errors.LoraFormatError: missing.safetensors: no such file...
    """
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise LoraFormatError(f"{path}: no such file; pass the path of a .safetensors file") from None
    except OSError as e:
        raise LoraFormatError(f"{path}: cannot read the file ({e.strerror}); check the path and its permissions") from None
    if not stat.S_ISREG(info.st_mode):
        raise LoraFormatError(f"{path}: not a regular file (a folder, device or pipe); pass a .safetensors file")
    try:
        with open(path, "rb") as f:
            length = _header_length(f.read(8), info.st_size, path)
            # decoded straight from the read: the bytes are freed before json parses (a header may be 100 MiB)
            text = _header_text(f.read(length), length, path)
    except OSError as e:
        raise LoraFormatError(f"{path}: cannot read the file ({e.strerror}); check the path and its permissions") from None
    return _parse(path, length, text, info.st_size)


def parse_header(blob: bytes | bytearray | memoryview, label: str = "<bytes>") -> SafetensorsHeader:
    """Check the header of a whole safetensors serialization held in memory (``label`` names it in errors).

    >>> parse_header(b"\\x02" + bytes(7) + b"{}").entries
    ()
    >>> parse_header(b"\\xff" * 8 + b"{}", "x.safetensors")                    # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lorablend.errors.LoraFormatError: x.safetensors: the header length is 18446744073709551615 bytes...
    """
    view = memoryview(blob).cast("B")
    length = _header_length(bytes(view[:8]), len(view), Path(label))
    return _parse(Path(label), length, _header_text(bytes(view[8:8 + length]), length, Path(label)), len(view))


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """True when a file of ``size`` bytes starting with ``head`` (its first 9 bytes or more) is plausibly
    safetensors: a header length that fits the file, then the ``{`` of a JSON object. A sniff, not a check.

    >>> looks_like_safetensors(b"\\x02" + bytes(7) + b"{}", 10), looks_like_safetensors(b"PK\\x03\\x04" + bytes(8), 12)
    (True, False)
    """
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= min(MAX_HEADER_BYTES, size - 8) and head[8:9] == b"{"


def _header_length(prefix: bytes, size: int, path: Path) -> int:
    """The header length ``n`` from the first 8 bytes, refused unless 2 <= n <= 100 MiB and 8 + n <= file size."""
    if len(prefix) < 8:
        raise LoraFormatError(
            f"{path}: the file is {size} bytes, shorter than the 8-byte header length every safetensors file starts "
            f"with; {_REDOWNLOAD}"
        )
    (n,) = struct.unpack("<Q", prefix)
    if n < 2:
        raise LoraFormatError(f"{path}: the header length is {n} bytes, less than the 2 of an empty header '{{}}'; "
                              f"{_NOT_SAFETENSORS}")
    if n > MAX_HEADER_BYTES:
        raise LoraFormatError(
            f"{path}: the header length is {n} bytes, over the 100 MiB that safetensors allows; the file is damaged "
            f"or not safetensors: {_NOT_SAFETENSORS}"
        )
    if 8 + n > size:
        raise LoraFormatError(
            f"{path}: truncated safetensors file: the header says it is {n} bytes long but the file has only "
            f"{size} bytes; {_REDOWNLOAD}"
        )
    return n


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing repeated keys (``json`` would keep the last one and hide the others)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def _scan_json(raw: bytes, path: Path) -> None:
    """Refuse, before any text is decoded or parsed, bytes that JSON never holds and nesting deeper than
    ``MAX_JSON_DEPTH``.

    Control bytes (other than tab, newline, carriage return) are invalid anywhere in JSON: a header of zeros (a
    hole in a sparse or cut-off file) is refused here, without building a 100 MiB string first. ``json`` recurses
    once per level: 10⁵ levels end in RecursionError, and under a raised recursion limit in a stack overflow that
    kills the process. The scan counts brackets outside strings (a quote after an odd run of backslashes does not
    end a string), vectorised a chunk at a time: linear, about 1 ms for a 1000-tensor header. It is exact up to the
    first place where the JSON is invalid, which is as far as ``json`` ever gets.
    """
    depth, in_string, backslashes = 0, False, 0  # carried from chunk to chunk
    for at in range(0, len(raw), _SCAN_CHUNK):
        chunk = raw[at:at + _SCAN_CHUNK]
        codes = np.frombuffer(chunk, dtype=np.uint8)
        control = codes < 0x20
        if control.any():
            control &= (codes != 0x09) & (codes != 0x0A) & (codes != 0x0D)
            if control.any():
                where = at + int(np.argmax(control))
                raise LoraFormatError(
                    f"{path}: corrupt safetensors header: byte {where} of the header is the control byte "
                    f"0x{raw[where]:02x}, which JSON text never holds (zeros: a hole or a cut-off copy); {_REDOWNLOAD}"
                )
        quotes = np.flatnonzero(codes == 0x22)
        if backslashes or b'\\"' in chunk:  # some quote may be escaped: count the backslashes just before each
            plain = np.flatnonzero(codes != 0x5C)
            before = np.searchsorted(plain, quotes) - 1  # the last byte before each quote that is no backslash
            run_start = np.where(before >= 0, plain[np.maximum(before, 0)] if len(plain) else 0, -1 - backslashes)
            quotes = quotes[(quotes - run_start - 1) % 2 == 0]
        trailing = len(chunk) - len(chunk.rstrip(b"\\"))
        backslashes = trailing if trailing < len(chunk) else backslashes + trailing
        is_open = (codes == 0x5B) | (codes == 0x7B)
        brackets = np.flatnonzero(is_open | (codes == 0x5D) | (codes == 0x7D))
        if len(brackets):
            outside = (np.searchsorted(quotes, brackets) + in_string) % 2 == 0
            brackets = brackets[outside]
            levels = depth + np.cumsum(np.where(is_open[brackets], 1, -1))
            closed_too_often = np.flatnonzero(levels < 0)
            if len(closed_too_often):  # invalid JSON: json stops there, nothing after it is ever parsed
                levels = levels[: closed_too_often[0]]
            if len(levels) and int(levels.max()) > MAX_JSON_DEPTH:
                raise LoraFormatError(
                    f"{path}: corrupt safetensors header: its JSON is nested more than {MAX_JSON_DEPTH} levels deep "
                    f"(a header needs 3); {_REDOWNLOAD}"
                )
            if len(closed_too_often):
                return
            depth = int(levels[-1]) if len(levels) else depth
        in_string ^= bool(len(quotes) % 2)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a "\\udcff" escape: no UTF-8 spelling, no safetensors name
        return False
    return True


def _header_text(raw: bytes, length: int, path: Path) -> str:
    """The header's bytes as text, once they are known to be JSON-safe bytes of bounded nesting and UTF-8."""
    if len(raw) != length:  # the file shrank after stat(): someone is writing it
        raise LoraFormatError(f"{path}: the file changed while its header was read; try again when it is complete")
    _scan_json(raw, path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LoraFormatError(
            f"{path}: corrupt safetensors header: byte {e.start} of the header is not UTF-8 text; {_REDOWNLOAD}"
        ) from None


def _parse(path: Path, length: int, text: str, size: int) -> SafetensorsHeader:
    def corrupt(problem: str, fix: str = _REDOWNLOAD) -> LoraFormatError:
        return LoraFormatError(f"{path}: corrupt safetensors header: {problem}; {fix}")

    try:
        parsed = json.loads(text, object_pairs_hook=_unique_object)
    except _DuplicateKey as e:
        raise corrupt(f"the name {e.key!r} appears twice (a reader would silently keep only one)") from None
    except RecursionError:  # unreachable after _scan_json; kept so a deep header can never crash a caller
        raise corrupt("its JSON is nested too deeply") from None
    except json.JSONDecodeError as e:
        raise corrupt(f"not valid JSON ({e})") from None
    except ValueError:  # an integer of thousands of digits, more than Python converts
        raise corrupt("a number in it has thousands of digits") from None
    if not isinstance(parsed, dict):
        raise corrupt(f"the JSON is a {type(parsed).__name__}, not an object of tensor names")
    metadata = _metadata(parsed.pop("__metadata__", {}), corrupt)
    data_length = size - 8 - length
    entries = [_entry(name, info, data_length, corrupt) for name, info in parsed.items()]
    entries.sort(key=lambda e: (e.start, e.end))
    declared = max((e.end for e in entries), default=0)
    if declared > data_length:
        raise LoraFormatError(
            f"{path}: truncated safetensors file: the header declares {declared:,} data bytes but only "
            f"{data_length:,} are present (the download or upload was cut off); {_REDOWNLOAD}"
        )
    _check_layout(path, entries, data_length)
    return SafetensorsHeader(path, length, data_length, tuple(entries), MappingProxyType(metadata))


def _metadata(raw: Any, corrupt) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise corrupt(f"'__metadata__' is a {type(raw).__name__}, not an object of strings")
    for key, value in raw.items():
        if not isinstance(value, str):
            raise corrupt(f"metadata value of {key!r} is a {type(value).__name__}, not a string")
        if not (_utf8(key) and _utf8(value)):
            raise corrupt(f"metadata entry {key.encode('utf-8', 'backslashreplace').decode()!r} is not valid UTF-8")
    return raw


def _entry(name: str, info: Any, data_length: int, corrupt) -> TensorEntry:
    if not _utf8(name):
        shown = name.encode("utf-8", "backslashreplace").decode()
        raise corrupt(f"tensor name {shown!r} is not valid UTF-8 (a lone surrogate escape)")
    if not isinstance(info, dict) or info.keys() != _ENTRY_KEYS:
        got = sorted(info) if isinstance(info, dict) else type(info).__name__
        raise corrupt(f"entry for {name!r} must hold exactly dtype, shape and data_offsets, it holds {got}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEM_SIZES:
        raise corrupt(
            f"tensor {name!r} has dtype {dtype!r}, which lorablend does not read (known: {', '.join(ITEM_SIZES)})",
            "convert the file to one of those dtypes, or download it again if it is damaged",
        )
    # type(x) is int, not isinstance: JSON true/false arrive as bools, which are ints to Python
    if type(shape) is not list or not _INT.issuperset(map(type, shape)) or min(shape, default=0) < 0:
        raise corrupt(f"tensor {name!r} has shape {_short(shape)}; a shape is a list of non-negative integers")
    if not (type(offsets) is list and len(offsets) == 2 and type(begin := offsets[0]) is int
            and type(end := offsets[1]) is int and 0 <= begin <= end):
        raise corrupt(f"tensor {name!r} has data_offsets {_short(offsets)}; they must be two integers 0 <= begin <= end")
    # The element count, multiplied only while it fits the span the entry claims: an absurd shape (dims of
    # 10**18, or 10**5 of them) is refused after a few multiplications instead of building a huge integer.
    span, itemsize = end - begin, ITEM_SIZES[dtype]
    limit = span // itemsize
    count = 0 if 0 in shape else 1
    for d in shape if count else ():
        count *= d
        if count > limit:
            raise corrupt(f"tensor {name!r} spans {span} bytes but its dtype and shape need more ({dtype} x {_short(shape)})")
    if count * itemsize != span:
        raise corrupt(f"tensor {name!r} spans {span} bytes but its dtype and shape need {count * itemsize} "
                      f"({dtype} x {list(shape)})")
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_layout(path: Path, entries: list[TensorEntry], data_length: int) -> None:
    """Tensors lie back to back from byte 0 to the end of the file: no overlap (two names, one storage), no gap
    (bytes no tensor owns can hide data), nothing after the last tensor. ``entries`` are sorted by offsets."""
    at, previous = 0, None
    for e in entries:
        if e.start != at:
            where = f"after {previous!r}" if previous is not None else "at the start of the data section"
            problem = (f"{e.name!r} starts at byte {e.start} where byte {at} was expected ({where}): "
                       f"{'it overlaps' if e.start < at else 'a gap of ' + str(e.start - at) + ' bytes hides data'}")
            raise LoraFormatError(
                f"{path}: corrupt safetensors header: {problem} (tensors overlap or leave gaps); {_REDOWNLOAD}"
            )
        at, previous = e.end, e.name
    if at != data_length:
        raise LoraFormatError(
            f"{path}: corrupt safetensors file: its tensors end at byte {at:,} of a {data_length:,}-byte data "
            f"section ({data_length - at:,} bytes after the last tensor belong to none); {_REDOWNLOAD}"
        )


def read_tensor(file: Any, header: SafetensorsHeader, entry: TensorEntry) -> torch.Tensor:
    """Tensor ``entry`` of an open file (``header`` was read from it), read alone by its offsets into fresh memory.

    >>> import io
    >>> header, chunks = serialize({"w": torch.arange(3.0)}, {})
    >>> blob = header + b"".join(chunks)
    >>> h = parse_header(blob)
    >>> read_tensor(io.BytesIO(blob), h, h.by_name["w"])
    tensor([0., 1., 2.])
    """
    dtype = DTYPES.get(entry.dtype)
    if dtype is None:
        raise LoraFormatError(f"{header.path}: tensor {entry.name!r} is {entry.dtype}, which this torch cannot hold; "
                              f"upgrade torch")
    if not entry.nbytes:
        return torch.empty(entry.shape, dtype=dtype)
    buffer = bytearray(entry.nbytes)
    file.seek(header.data_start + entry.start)
    if file.readinto(buffer) != entry.nbytes:
        raise LoraFormatError(f"{header.path}: the file ended inside tensor {entry.name!r}; it changed while being "
                              f"read, or {_REDOWNLOAD}")
    flat = torch.frombuffer(buffer, dtype=torch.uint8)
    if sys.byteorder != "little" and dtype.itemsize > 1:  # the file is little-endian
        flat = _swap_bytes(flat, dtype.itemsize)
    return flat.view(dtype).view(entry.shape)


def _swap_bytes(flat: torch.Tensor, width: int) -> torch.Tensor:
    return flat.view(-1, width).flip(1).reshape(-1)


# ------------------------------------------------------------------------------------------- writer


def encode_header(layout: Iterable[tuple[str, str, Sequence[int]]], metadata: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte length + JSON header of tensors ``(name, dtype name, shape)`` laid back to back in that order.

    The JSON is padded with spaces to a multiple of 8 bytes, as the safetensors library does, so the data section
    starts 8-aligned. Metadata is sorted: the same tensors and metadata always give the same bytes.

    >>> blob = encode_header([("w", "F16", (2,))], {"a": "b"})
    >>> len(blob) % 8, blob[8:].decode().rstrip()
    (0, '{"__metadata__":{"a":"b"},"w":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}')
    """
    header: dict[str, Any] = {}
    if metadata:
        bad = next(((k, v) for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))), None)
        if bad is not None:
            raise ValueError(f"safetensors metadata maps strings to strings; {bad[0]!r} -> {type(bad[1]).__name__}")
        header["__metadata__"] = dict(sorted(metadata.items()))
    at = 0
    for name, dtype, shape in layout:
        if name == "__metadata__" or name in header:
            raise ValueError(f"tensor name {name!r} is used twice or is reserved; every tensor needs its own name")
        if dtype not in ITEM_SIZES:
            raise ValueError(f"dtype {dtype!r} is not a safetensors dtype (known: {', '.join(ITEM_SIZES)})")
        count = 1
        for d in shape:
            count *= int(d)
        size = count * ITEM_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [at, at + size]}
        at += size
    try:
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"a tensor name or metadata string is not valid UTF-8 ({e.reason} at {e.start}); "
                         f"rename it") from None
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def serialize(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *, data_hash_key: str | None = None
) -> tuple[bytes, list[memoryview]]:
    """``(header, data chunks)`` of a safetensors file holding ``tensors``; their concatenation is the file.

    Tensors are laid out by decreasing element size, then name (the library's order), so every tensor starts
    aligned for its dtype. The chunks are views of the tensors' own memory (no copy): keep the tensors alive and
    unchanged until the chunks are written. ``data_hash_key`` stores :func:`data_section_hash` of the data in the
    metadata under that key (kohya's ``sshs_model_hash``, which A1111 shows): the data does not depend on the
    header, so a file can carry the hash of its own data.

    >>> header, chunks = serialize({"b": torch.ones(1), "a": torch.zeros(1, dtype=torch.float64)}, {})
    >>> [e.name for e in parse_header(header + b"".join(chunks)).entries]
    ['a', 'b']
    """
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    chunks = [_little_endian_bytes(tensors[k], k) for k in order]
    meta = dict(metadata or {})
    if data_hash_key is not None:
        digest = hashlib.sha256()
        for chunk in chunks:
            digest.update(chunk)
        meta[data_hash_key] = digest.hexdigest()
    layout = [(k, _dtype_name(tensors[k], k), tuple(tensors[k].shape)) for k in order]
    return encode_header(layout, meta), [c for c in chunks if c.nbytes]


def _dtype_name(t: torch.Tensor, key: str) -> str:
    name = DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise ValueError(f"tensor {key!r} is {t.dtype}, which safetensors cannot store; cast it first")
    return name


def _little_endian_bytes(t: torch.Tensor, key: str) -> memoryview:
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
        raise ValueError(f"value of {key!r} is not a dense tensor; safetensors stores dense tensors only")
    flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    if sys.byteorder != "little" and t.element_size() > 1:
        flat = _swap_bytes(flat, t.element_size())
    return memoryview(flat.numpy()).cast("B")


# ------------------------------------------------------------------------------------------- hash

_HASH_CHUNK = 1 << 20


def data_section_hash(source: str | os.PathLike | bytes | bytearray | memoryview) -> str:
    """sha256 hex digest of the data section (every byte after the header) of a safetensors file or blob.

    This is kohya's ``sshs_model_hash`` ("safetensors hash"), which A1111 shows as a LoRA's hash: it skips the
    header, so editing metadata does not change it. A file is streamed, never read whole; its header is checked
    first (a damaged file raises ``LoraFormatError``).

    >>> data_section_hash(serialize({"x": torch.zeros(2)})[0] + bytes(8)) == hashlib.sha256(bytes(8)).hexdigest()
    True
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source).cast("B")
        return hashlib.sha256(view[parse_header(view).data_start:]).hexdigest()
    header = read_header(source)
    digest = hashlib.sha256()
    with open(header.path, "rb") as f:
        f.seek(header.data_start)
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sshs_model_hash(path: str | os.PathLike) -> str:
    """The kohya / A1111 ``sshs_model_hash`` of a safetensors file: :func:`data_section_hash`, streamed.

    >>> sshs_model_hash("style.safetensors")                                  # doctest: +SKIP
    '7a1c…'
    """
    return data_section_hash(Path(path))


__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "FLOAT_DTYPES",
    "ITEM_SIZES",
    "MAX_HEADER_BYTES",
    "MAX_JSON_DEPTH",
    "SafetensorsHeader",
    "TensorEntry",
    "data_section_hash",
    "encode_header",
    "looks_like_safetensors",
    "parse_header",
    "read_header",
    "read_tensor",
    "serialize",
    "sshs_model_hash",
]
