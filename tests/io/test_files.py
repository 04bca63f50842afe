"""The safetensors reader (one private map, a view per tensor) and the finite check (bit patterns, runs)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorablend import LoraFormatError
from lorablend.io.files import all_finite, check_finite, read_source


def _raw_file(path, entries: list[tuple[str, str, list[int], bytes]], *, pad_header_to: int = 8, tail: bytes = b""):
    """Write a safetensors file by hand: entries are (key, dtype, shape, bytes), laid out in order."""
    header, at = {}, 0
    for key, dtype, shape, blob in entries:
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + len(blob)]}
        at += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % pad_header_to)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(e[3] for e in entries) + tail)
    return path


def test_every_dtype_reads_exactly_what_the_library_reads(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {
        "a.f16": torch.randn(3, 5, generator=g).half(),
        "b.bf16": torch.randn(7, generator=g).bfloat16(),
        "c.f32": torch.randn(2, 2, 2, generator=g),
        "d.f64": torch.randn(3, generator=g).double(),
        "e.i64": torch.arange(5),
        "f.u8": torch.arange(3, dtype=torch.uint8),
        "g.f8": torch.randn(9, generator=g).to(torch.float8_e4m3fn),
        "h.scalar": torch.tensor(8.0),
        "i.empty": torch.zeros(0, 4),
    }
    path = tmp_path / "mixed.safetensors"
    save_file(sd, path, metadata={"ss_network_alpha": "8"})
    raw = read_source(path)
    expected = load_file(path)
    assert set(raw.tensors) == set(expected)
    for key, t in expected.items():
        got = raw.tensors[key]
        assert got.dtype == t.dtype and got.shape == t.shape, key
        assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), key
    assert raw.metadata == {"ss_network_alpha": "8"}


def test_writing_into_a_read_tensor_never_changes_the_file(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"x": torch.ones(4, 4)}, path)
    before = path.read_bytes()
    t = read_source(path).tensors["x"]
    t.mul_(3.0)
    assert path.read_bytes() == before
    assert torch.equal(read_source(path).tensors["x"], torch.ones(4, 4))


def test_a_file_rewritten_in_place_does_not_change_a_loaded_adapter(tmp_path):
    """A trainer that saves over the same path (truncate + write) must not reach tensors already read."""
    path = tmp_path / "last.safetensors"
    save_file({"x": torch.ones(1024, 64)}, path)
    t = read_source(path).tensors["x"]
    with open(path, "r+b") as f:  # in place: same inode, truncated, then rewritten with other values
        f.truncate(0)
        f.seek(0)
    save_file({"x": torch.full((1024, 64), 7.0)}, tmp_path / "other.safetensors")
    with open(path, "r+b") as f:
        f.write((tmp_path / "other.safetensors").read_bytes())
    assert torch.equal(t, torch.ones(1024, 64))


def test_unaligned_offsets_are_copied_not_misread(tmp_path):
    f32 = torch.arange(4, dtype=torch.float32)
    path = _raw_file(tmp_path / "odd.safetensors", [
        ("byte", "U8", [3], bytes([1, 2, 3])),  # the float32 tensor after it starts at an odd offset
        ("w", "F32", [4], f32.numpy().tobytes()),
    ], pad_header_to=1)
    raw = read_source(path)
    assert torch.equal(raw.tensors["w"], f32)
    assert raw.tensors["byte"].tolist() == [1, 2, 3]


@pytest.mark.parametrize("layout, needle", [
    ("overlap", "overlap or leave gaps"),
    ("gap", "overlap or leave gaps"),
    ("trailing", "tensors end at byte"),
])
def test_layouts_the_library_refuses_are_refused_with_the_file_named(tmp_path, layout, needle):
    blob = torch.ones(4).numpy().tobytes()
    path = tmp_path / f"{layout}.safetensors"
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}
    data = blob + blob
    if layout == "overlap":
        header["b"]["data_offsets"] = [8, 24]
    elif layout == "gap":
        header["b"]["data_offsets"] = [20, 36]
        data = blob + b"\0" * 4 + blob
    else:
        data += b"junk"
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    with pytest.raises(LoraFormatError) as e:
        read_source(path)
    assert str(path) in str(e.value) and needle in str(e.value)


def test_header_entries_with_wrong_types_are_refused(tmp_path):
    text = json.dumps({"a": {"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]}}).encode()
    path = tmp_path / "types.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(16))
    with pytest.raises(LoraFormatError, match=r"corrupt safetensors header: tensor 'a' has shape \['4'\]"):
        read_source(path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e5m2,
                                   torch.float8_e4m3fn])
def test_all_finite_reads_bit_patterns_exactly(dtype):
    finfo = torch.finfo(dtype)
    edge = torch.tensor([finfo.max, -finfo.max, finfo.tiny, -0.0, 0.0], dtype=torch.float64).to(dtype)
    assert all_finite(edge)
    assert all_finite(edge[::2])  # a strided view
    specials = [float("nan")] + ([] if dtype == torch.float8_e4m3fn else [float("inf"), float("-inf")])
    for bad in specials:  # (float8_e4m3fn has no Inf: a conversion saturates to its max)
        for sign in (1.0, -1.0):
            big = torch.zeros(3 * 2**19 + 5, dtype=dtype)  # more than one pass of the chunked check
            big[-1] = torch.tensor(sign * bad).to(dtype)
            assert not all_finite(big), (bad, sign)


def test_check_finite_on_a_file_names_the_bad_key_among_back_to_back_tensors(tmp_path):
    sd = {f"k{i:02d}": torch.ones(100, dtype=torch.float16) for i in range(20)}
    sd["k13"][57] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(sd, path)
    raw = read_source(path)
    with pytest.raises(LoraFormatError) as e:
        check_finite(raw.tensors, raw.label)
    assert "'k13'" in str(e.value) and "(1 of 100)" in str(e.value)
    sd["k13"][57] = 1.0
    save_file(sd, path)
    check_finite(read_source(path).tensors, str(path))


def test_a_mapped_read_gives_the_same_tensors_and_never_writes_the_file(tmp_path):
    g = torch.Generator().manual_seed(1)
    sd = {"a": torch.randn(8, 4, generator=g).half(), "b": torch.randn(3, generator=g)}
    path = tmp_path / "m.safetensors"
    save_file(sd, path)
    before = path.read_bytes()
    raw = read_source(path, mapped=True)
    for key, t in sd.items():
        assert torch.equal(raw.tensors[key], t)
    raw.tensors["b"].mul_(2.0)  # copy-on-write: the file keeps its bytes
    assert path.read_bytes() == before


def test_loading_for_another_device_maps_the_file_and_keeps_only_private_copies(tmp_path, make_pipe, make_adapter):
    from lorablend.io import load_adapter, save_adapter

    pipe = make_pipe("sd1")
    path = save_adapter(make_adapter("sd1", "a", seed=5, targets="all"), tmp_path / "a.safetensors", target=pipe)
    reference = load_adapter(path, target=pipe)
    # torch.device("cpu", 0) is not torch.device("cpu"): the path a GPU load takes, on a machine without one
    moved = load_adapter(path, target=pipe, device=torch.device("cpu", 0))
    assert moved.deltas.keys() == reference.deltas.keys()
    for key, d in reference.deltas.items():
        for x, y in zip(d.tensors(), moved.deltas[key].tensors()):
            assert torch.equal(x, y) and x.dtype == y.dtype
    assert len({t.untyped_storage().data_ptr() for d in moved.deltas.values() for t in d.tensors()}) == 1
    with open(path, "r+b") as f:  # rewritten in place: the loaded adapter holds no page of the file
        f.truncate(0)
    for key, d in reference.deltas.items():
        for x, y in zip(d.tensors(), moved.deltas[key].tensors()):
            assert torch.equal(x, y)


def test_a_pickle_named_safetensors_is_read_as_the_pickle_it_is(tmp_path):
    """torch.load(path) hands any *.safetensors path to the safetensors library: the reader passes a file."""
    path = tmp_path / "renamed.safetensors"
    torch.save({"unet.x.lora_A.weight": torch.ones(2, 3)}, path)
    assert torch.equal(read_source(path).tensors["unet.x.lora_A.weight"], torch.ones(2, 3))
    path.write_bytes(b"\x80\x02" + b"cbuiltins\nprint\n" + b"q\x00.")  # a global: refused, never run
    with pytest.raises(LoraFormatError, match="holds Python objects"):
        read_source(path)


# ------------------------------------------------------------------------------------------- pick_weight_file


def test_the_one_weight_file_picker(tmp_path):
    from lorablend.io.files import WeightFileError, pick_weight_file

    def touch(*names):
        for n in names:
            (tmp_path / n).write_bytes(b"x")

    with pytest.raises(WeightFileError, match="no weight file") as e:
        pick_weight_file(tmp_path)
    assert isinstance(e.value, LoraFormatError) and isinstance(e.value, FileNotFoundError)
    touch("style.safetensors", "style.bin", "optimizer.bin", "README.md")
    assert pick_weight_file(tmp_path).name == "style.safetensors"  # its .bin twin and a trainer's state are not candidates
    touch("other.safetensors")
    with pytest.raises(WeightFileError, match=r"several weight files \['other.safetensors', 'style.safetensors'\]"):
        pick_weight_file(tmp_path)
    assert pick_weight_file(tmp_path, weight_name="other.safetensors").name == "other.safetensors"
    with pytest.raises(WeightFileError, match="no file 'nope.safetensors'"):
        pick_weight_file(tmp_path, weight_name="nope.safetensors")
    touch("pytorch_lora_weights.bin")
    assert pick_weight_file(tmp_path).name == "pytorch_lora_weights.bin"  # diffusers' default name wins
    assert pick_weight_file(tmp_path, weight_name=None, safetensors_only=False).suffix == ".bin"
    with pytest.raises(WeightFileError, match="several"):
        pick_weight_file(tmp_path, safetensors_only=True)  # the default .bin is no candidate then
