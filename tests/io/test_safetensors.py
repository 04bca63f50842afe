"""The one safetensors module: every rule of the header reader, the writer, the dtype table and the data hash.

Each refusal must be a ``LoraFormatError`` that names the file and the rule broken, raised before anything the
header claims is allocated. The files are written by hand here (a header is JSON text we control byte by byte),
so the tests do not depend on what the library would write.
"""

from __future__ import annotations

import doctest
import hashlib
import importlib
import json
import random
import struct
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorablend import LoraFormatError
from lorablend.io import safetensors as st
from lorablend.io.files import read_source

F32_4 = struct.pack("<4f", 1, 2, 3, 4)


def _file(path: Path, header: str | bytes | dict, data: bytes = b"", *, length: int | None = None) -> Path:
    """A safetensors file by hand: 8-byte length (``length`` to lie about it), header text, data section."""
    text = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def _refused(path: Path, *needles: str) -> str:
    """Every reader refuses ``path`` the same way: the header reader, the LoRA reader, the hash."""
    messages = []
    for read in (st.read_header, read_source, st.sshs_model_hash):
        with pytest.raises(LoraFormatError) as e:
            read(path)
        messages.append(str(e.value))
    msg = messages[0]
    assert str(path) in msg, msg
    for needle in needles:
        assert needle in msg, msg
    assert all(m == msg for m in messages[2:]), messages
    return msg


def _entry(dtype="F32", shape=(4,), offsets=(0, 16)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


# ------------------------------------------------------------------------------------------- round trip


def test_what_we_write_the_library_reads_and_what_it_writes_we_read(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.f16": torch.randn(3, 5, generator=g).half(), "b.bf16": torch.randn(7, generator=g).bfloat16(),
        "c.f32": torch.randn(2, 2, 2, generator=g), "d.f64": torch.randn(3, generator=g).double(),
        "e.i64": torch.arange(5), "f.u8": torch.arange(3, dtype=torch.uint8), "g.bool": torch.tensor([True, False]),
        "h.f8": torch.randn(9, generator=g).to(torch.float8_e4m3fn), "i.scalar": torch.tensor(8.0),
        "j.empty": torch.zeros(0, 4), "k.u16": torch.tensor([1, 2, 3], dtype=torch.uint16),
    }
    header, chunks = st.serialize(tensors, {"title": "t"})
    ours = tmp_path / "ours.safetensors"
    ours.write_bytes(header + b"".join(chunks))
    theirs = tmp_path / "theirs.safetensors"
    save_file(tensors, theirs, metadata={"title": "t"})
    for path in (ours, theirs):
        for got in (load_file(path), read_source(path).tensors):
            assert set(got) == set(tensors)
            for k, t in tensors.items():
                assert got[k].dtype == t.dtype and got[k].shape == t.shape, k
                assert torch.equal(got[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k
    h = st.read_header(ours)
    assert h.metadata == {"title": "t"} and h.data_start % 8 == 0
    # laid out by decreasing element size, so every tensor starts aligned for its dtype
    assert all((h.data_start + e.start) % st.ITEM_SIZES[e.dtype] == 0 for e in h.entries)


def test_the_dtype_table_is_one_table():
    assert set(st.DTYPES) <= set(st.ITEM_SIZES)
    for name, dtype in st.DTYPES.items():
        assert st.ITEM_SIZES[name] == dtype.itemsize and st.DTYPE_NAMES[dtype] == name
    assert set(st.FLOAT_DTYPES) <= set(st.DTYPES)


def test_zero_size_tensors_are_legal_anywhere(tmp_path):
    path = _file(tmp_path / "z.safetensors", {
        "empty1": _entry("F32", (0, 3), (0, 0)), "a": _entry("F32", (4,), (0, 16)),
        "empty2": _entry("F16", (2, 0), (16, 16)), "b": _entry("F32", (4,), (16, 32)), "empty3": _entry("I8", (0,), (32, 32)),
    }, F32_4 + F32_4)
    raw = read_source(path)
    assert raw.tensors["empty2"].shape == (2, 0) and raw.tensors["empty3"].numel() == 0
    assert raw.tensors["b"].tolist() == [1, 2, 3, 4]
    only_empty = _file(tmp_path / "only_empty.safetensors", {"e": _entry("F32", (0,), (0, 0))})
    assert read_source(only_empty).tensors["e"].shape == (0,)


def test_an_empty_header_is_a_file_with_no_tensors(tmp_path):
    h = st.read_header(_file(tmp_path / "e.safetensors", "{}"))
    assert h.entries == () and h.metadata == {} and h.data_length == 0
    with pytest.raises(LoraFormatError, match="holds no tensors"):
        read_source(tmp_path / "e.safetensors")


# ------------------------------------------------------------------------------------------- header length


@pytest.mark.parametrize("blob, needle", [
    (b"", "shorter than the 8-byte header length"),
    (b"\x02\x00\x00", "shorter than the 8-byte header length"),
    (struct.pack("<Q", 0) + b"{}", "less than the 2"),
    (struct.pack("<Q", 1) + b"{}", "less than the 2"),
    (struct.pack("<Q", 2**63) + b"{}", "over the 100 MiB"),
    (struct.pack("<Q", 2**64 - 1) + b"{}", "over the 100 MiB"),
    (struct.pack("<Q", 100 * 2**20 + 1) + b"{}", "over the 100 MiB"),
    (struct.pack("<Q", 64) + b"{}", "truncated"),
])
def test_header_length_rules(tmp_path, blob, needle):
    path = tmp_path / "len.safetensors"
    path.write_bytes(blob)
    with pytest.raises(LoraFormatError) as e:
        st.read_header(path)
    assert str(path) in str(e.value) and needle in str(e.value), str(e.value)
    with pytest.raises(LoraFormatError, match=str(path)):  # a LoRA load says it too (maybe as "not a weight file")
        read_source(path)


def test_a_huge_header_length_allocates_nothing(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b'{"a":' + b" " * 100)
    tracemalloc.start()
    try:
        with pytest.raises(LoraFormatError):
            st.read_header(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


# ------------------------------------------------------------------------------------------- JSON text


def test_header_not_utf8(tmp_path):
    _refused(_file(tmp_path / "u.safetensors", b'{"\xff\xfe":1}'), "not UTF-8")


def test_header_with_control_bytes_is_refused_before_decoding(tmp_path):
    """A run of zeros (a hole in a sparse or cut-off file) is not JSON: refused by the byte scan."""
    _refused(_file(tmp_path / "hole.safetensors", b'{"__metadata__":{"x":"' + bytes(4096) + b'"}}'),
             "control byte 0x00")


@pytest.mark.parametrize("text, needle", [
    ('{"a": ', "not valid JSON"),
    ("[1, 2]", "is a list, not an object"),
    ('"text"', "is a str, not an object"),
    ('{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,' + "9" * 5000 + "]}}", "thousands of digits"),
])
def test_header_not_a_json_object(tmp_path, text, needle):
    _refused(_file(tmp_path / "j.safetensors", text), "corrupt safetensors header", needle)


@pytest.mark.parametrize("opener, closer", [("[", "]"), ('{"a":', "}")])
def test_deep_json_is_refused_without_recursing(tmp_path, opener, closer):
    """10⁵ levels: refused by the scan, even under a recursion limit high enough for json to smash the C stack."""
    path = _file(tmp_path / "deep.safetensors", opener * 100_000 + "1" + closer * 100_000)
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(1_000_000)
    try:
        _refused(path, "nested more than 8 levels deep")
    finally:
        sys.setrecursionlimit(old)


def test_nesting_up_to_the_limit_reaches_the_entry_checks(tmp_path):
    text = '{"__metadata__":{"x":"' + "[" * 50 + '"},"a":' + "[" * 7 + "]" * 7 + "}"  # brackets in a string: no depth
    _refused(_file(tmp_path / "d.safetensors", text), "entry for 'a' must hold exactly")


def _reference_depth_over(raw: bytes, limit: int) -> bool:
    """Byte-by-byte: does json (which stops at the first invalid byte) ever get deeper than ``limit``?"""
    depth, in_string, escaped = 0, False, False
    for c in raw:
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:
                escaped = True
            elif c == 0x22:
                in_string = False
        elif c == 0x5C:
            return False  # invalid outside a string: json stops here
        elif c == 0x22:
            in_string = True
        elif c in b"[{":
            depth += 1
            if depth > limit:
                return True
        elif c in b"]}":
            depth -= 1
            if depth < 0:
                return False
    return False


@pytest.mark.parametrize("chunk", [3, 7, 1 << 20])
def test_the_depth_scan_never_misses_what_json_would_reach(monkeypatch, chunk):
    """Random bracket/quote/backslash soup, scanned in chunks of every size: whenever json would nest deeper than
    the limit, the scan refuses first (it may also refuse some invalid JSON that json would refuse anyway)."""
    monkeypatch.setattr(st, "_SCAN_CHUNK", chunk)
    rng = random.Random(chunk)
    for _ in range(3000):
        raw = bytes(rng.choice(b'[]{}"\\ a') for _ in range(rng.randint(0, 60)))
        try:
            st._scan_json(raw, Path("x"))
            refused = False
        except LoraFormatError:
            refused = True
        assert refused or not _reference_depth_over(raw, st.MAX_JSON_DEPTH), raw


# ------------------------------------------------------------------------------------------- names and metadata


def test_duplicate_tensor_names_are_refused(tmp_path):
    text = '{"a":%s,"a":%s}' % (json.dumps(_entry(offsets=(0, 16))), json.dumps(_entry(offsets=(16, 32))))
    _refused(_file(tmp_path / "dup.safetensors", text, F32_4 + F32_4), "'a' appears twice")


def test_duplicate_keys_anywhere_are_refused(tmp_path):
    twice_meta = '{"__metadata__":{},"__metadata__":{"x":"y"}}'
    _refused(_file(tmp_path / "m.safetensors", twice_meta), "'__metadata__' appears twice")
    twice_field = '{"a":{"dtype":"F32","dtype":"F16","shape":[4],"data_offsets":[0,16]}}'
    _refused(_file(tmp_path / "f.safetensors", twice_field, F32_4), "'dtype' appears twice")


def test_names_that_are_not_utf8_are_refused(tmp_path):
    """A JSON escape of a lone surrogate decodes to a str that has no UTF-8 spelling."""
    text = '{"lora_\\udcff":%s}' % json.dumps(_entry())
    _refused(_file(tmp_path / "s.safetensors", text, F32_4), "not valid UTF-8")
    meta = '{"__metadata__":{"k":"\\ud800"},"a":%s}' % json.dumps(_entry())
    _refused(_file(tmp_path / "sm.safetensors", meta, F32_4), "not valid UTF-8")


def test_a_surrogate_pair_is_a_valid_name(tmp_path):
    text = '{"\\ud83d\\ude00":%s}' % json.dumps(_entry())
    assert list(read_source(_file(tmp_path / "emoji.safetensors", text, F32_4)).tensors) == ["\U0001F600"]


@pytest.mark.parametrize("meta, needle", [
    ([], "'__metadata__' is a list"),
    ({"a": 1}, "metadata value of 'a' is a int"),
    ({"a": {"b": "c"}}, "metadata value of 'a' is a dict"),
])
def test_metadata_is_strings_to_strings(tmp_path, meta, needle):
    _refused(_file(tmp_path / "m.safetensors", {"__metadata__": meta, "a": _entry()}, F32_4), needle)


# ------------------------------------------------------------------------------------------- entries


@pytest.mark.parametrize("entry, needle", [
    ([1, 2], "must hold exactly dtype, shape and data_offsets"),
    ({"dtype": "F32", "shape": [4]}, "must hold exactly dtype, shape and data_offsets"),
    ({**_entry(), "extra": 1}, "must hold exactly dtype, shape and data_offsets"),
    (_entry(dtype="F4"), "dtype 'F4', which lorablend does not read (known: BOOL"),
    (_entry(dtype="float32"), "dtype 'float32'"),
    (_entry(dtype=4), "dtype 4"),
    ({**_entry(), "shape": [True, 4]}, "shape [True, 4]"),
    ({**_entry(), "shape": [-4]}, "shape [-4]"),
    ({**_entry(), "shape": [4.0]}, "shape [4.0]"),
    ({**_entry(), "shape": ["4"]}, "shape ['4']"),
    ({**_entry(), "shape": 4}, "shape 4"),
    ({**_entry(), "data_offsets": [0, 16, 32]}, "data_offsets [0, 16, 32]"),
    ({**_entry(), "data_offsets": [False, 16]}, "data_offsets [False, 16]"),
    ({**_entry(), "data_offsets": [-16, 0]}, "data_offsets [-16, 0]"),
    ({**_entry(), "data_offsets": [16, 0]}, "data_offsets [16, 0]"),
    ({**_entry(), "data_offsets": "0-16"}, "data_offsets '0-16'"),
    (_entry(shape=(5,)), "spans 16 bytes but its dtype and shape need more (F32 x [5])"),
    (_entry(dtype="F16"), "spans 16 bytes but its dtype and shape need 8"),
    (_entry(shape=(10**18, 10**18)), "spans 16 bytes but its dtype and shape need more"),
    (_entry(shape=[1] * 1000 + [10**30]), "spans 16 bytes but its dtype and shape need more"),
])
def test_entry_rules(tmp_path, entry, needle):
    _refused(_file(tmp_path / "e.safetensors", {"a": entry}, F32_4), "corrupt safetensors header", needle)


def test_absurd_shapes_cost_nothing(tmp_path):
    path = _file(tmp_path / "absurd.safetensors", {"a": _entry(shape=[2**62] * 10_000)}, F32_4)
    tracemalloc.start()
    try:
        _refused(path, "need more")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * path.stat().st_size  # the parsed JSON, nothing proportional to the claimed size


# ------------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("offsets_b, data, needle", [
    ((8, 24), F32_4 + F32_4, "it overlaps"),
    ((0, 16), F32_4 + F32_4, "it overlaps"),  # two names, one storage
    ((20, 36), F32_4 + bytes(4) + F32_4, "a gap of 4 bytes hides data"),
    ((16, 32), F32_4 + F32_4 + b"junk", "4 bytes after the last tensor belong to none"),
    ((16, 32), F32_4 + F32_4[:10], "truncated"),
    ((2**62, 2**62 + 16), F32_4 + F32_4, "truncated"),
])
def test_layout_rules(tmp_path, offsets_b, data, needle):
    header = {"a": _entry(offsets=(0, 16)), "b": _entry(offsets=offsets_b)}
    _refused(_file(tmp_path / "l.safetensors", header, data), needle)


def test_the_first_tensor_starts_at_byte_zero(tmp_path):
    _refused(_file(tmp_path / "s.safetensors", {"a": _entry(offsets=(4, 20))}, bytes(4) + F32_4),
             "at the start of the data section")


def test_a_file_changed_after_its_header_was_read_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    save_file({"a": torch.ones(4)}, path)
    real = st.read_header

    def read_then_grow(p):
        header = real(p)
        with open(p, "ab") as f:
            f.write(b"more")
        return header

    monkeypatch.setattr("lorablend.io.files.read_header", read_then_grow)
    with pytest.raises(LoraFormatError, match="changed while it was read"):
        read_source(path)


def test_not_a_regular_file(tmp_path):
    with pytest.raises(LoraFormatError, match="not a regular file"):
        st.read_header(tmp_path)


# ------------------------------------------------------------------------------------------- writer and hash


def test_writer_refuses_what_the_reader_would(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        st.encode_header([("__metadata__", "F32", (1,))])
    with pytest.raises(ValueError, match="twice"):
        st.encode_header([("a", "F32", (1,)), ("a", "F32", (1,))])
    with pytest.raises(ValueError, match="not a safetensors dtype"):
        st.encode_header([("a", "F4", (1,))])
    with pytest.raises(ValueError, match="strings to strings"):
        st.encode_header([("a", "F32", (1,))], {"k": 1})
    with pytest.raises(ValueError, match="not valid UTF-8"):
        st.serialize({"a\udcff": torch.ones(1)})
    with pytest.raises(ValueError, match="cannot store"):
        st.serialize({"a": torch.ones(1, dtype=torch.complex128)})


def test_writing_the_same_tensors_gives_the_same_bytes():
    t = {"b": torch.ones(3), "a": torch.arange(4)}
    first = st.serialize(t, {"z": "1", "a": "2"})
    second = st.serialize(dict(reversed(t.items())), {"a": "2", "z": "1"})
    assert first[0] == second[0] and [bytes(c) for c in first[1]] == [bytes(c) for c in second[1]]


def test_data_section_hash_of_file_and_bytes(tmp_path):
    header, chunks = st.serialize({"x": torch.arange(6.0)}, {"k": "v"}, data_hash_key="sshs_model_hash")
    data = b"".join(chunks)
    path = tmp_path / "h.safetensors"
    path.write_bytes(header + data)
    expected = hashlib.sha256(data).hexdigest()
    assert st.read_header(path).metadata["sshs_model_hash"] == expected
    assert st.data_section_hash(header + data) == st.sshs_model_hash(path) == expected
    with pytest.raises(LoraFormatError, match="truncated"):
        st.data_section_hash(header + data[:-1])


def test_one_header_parser():
    """No module but io/safetensors.py unpacks a header length or parses a header's JSON."""
    src = Path(st.__file__).resolve().parents[1]
    offenders = []
    for path in src.rglob("*.py"):
        if path.name == "safetensors.py" and path.parent.name == "io":
            continue
        text = path.read_text()
        # a u64 length unpacked outside io/safetensors.py is a second safetensors header parser, unless the module
        # reads another format's header: GGUF's (offline/quantized_files.py pre-scans it, magic b"GGUF")
        unpacks_u64 = '"<Q"' in text and 'b"GGUF"' not in text
        if unpacks_u64 or "from safetensors import safe_open" in text or "data_offsets" in text:
            offenders.append(str(path.relative_to(src)))
    assert not offenders, offenders


@pytest.mark.parametrize("name", ["lorablend.io.safetensors", "lorablend.outputs"])
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
