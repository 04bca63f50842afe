"""A corpus of hostile inputs for every reader of lorablend, generated (no binary blob is committed).

``build_corpus(out_dir, full=...)`` writes damaged files made from a few *bases* and returns one :class:`Case`
per file. The bases:

* ``sd15_kohya`` / ``sd15_diffusers``: small synthetic LoRAs (4 layers, SD1.5 shapes) in kohya and PEFT naming,
  which offline commands (``inspect``, ``convert``, ``merge``, ``load_adapter`` without a model) accept;
* ``tiny_kohya`` / ``tiny_diffusers``: LoRAs for the tiny SD1.5 pipeline of ``lorablend.fixtures.tiny_unets.tiny_pipeline``
  (what ``load_lora_weights``, ``fuse --model`` and ``generate`` accept);
* ``tiny_ckpt``: the tiny pipeline as a single-file LDM checkpoint (for ``fuse --model``);
* ``real_*``: small third-party files of ``../shared/realdata/loras`` when that folder exists (skipped cleanly
  when it does not).

Every base is also written untouched (kind ``pristine``): the tests check that those load, so a refusal of a
damaged file is a refusal of the damage. Each damaged file has a ``kind`` (the damage) and an ``expect``:
``"refuse"`` (every entry point must raise the library's error) or ``"any"`` (a random bit flip that left a
well-formed file, as judged by the ``safetensors`` library: loading it is fine; crashing is not).

``full=False`` gives the fast subset the suite runs (every kind at least once); ``full=True`` the whole
corpus (>= 200 files, with the real 100 MB header). Pickle payloads create ``marker_path(out_dir)`` if they
are ever executed: that file must never appear.

    python tests/support/hostile_corpus.py OUT_DIR [--full]
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import os
import pickle
import random
import signal
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch


class Hung(BaseException):
    """Raised by the alarm: not an Exception, so no ``except Exception`` in the code under test swallows it."""


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise :class:`Hung` in this (main) thread if the block runs longer than ``seconds``."""
    def fire(signum, frame):
        raise Hung()

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)

HERE = Path(__file__).resolve().parent
REALDATA = HERE.parents[2] / "shared" / "realdata" / "loras"
# Small real files (< 3.3 MB) of different formats: LyCORIS LoKr (kohya names), diffusers, legacy attn-procs pickle.
REAL_FILES = {
    "real_lokr": "sd1x/sd1x_lycoris_lokr_smart_falcon_r4.safetensors",
    "real_diffusers": "sd1x/sd15_diffusers_timo_step2100.safetensors",
    "real_attnprocs": "sd1x/sd15_attnprocs_catundchat.safetensors",
    "real_pickle": "sd1x/sd15_attnprocs_catundchat.bin",
}
MARKER = "PAYLOAD_RAN"
HUGE_KINDS = {"header_len_2p63", "header_len_2p64_minus_1", "header_100mb", "header_100mb_sparse",
              "shape_absurd", "offsets_out_of_range"}

# groups: which entry points a case is meant for
OFFLINE, TINY, CKPT, ANY = "offline", "tiny", "checkpoint", "any"


@dataclass
class Case:
    """One corpus entry: ``path`` (file, folder or link), what damage it carries, and what must happen."""

    path: Path
    kind: str
    base: str
    group: str  # offline | tiny | checkpoint | any
    expect: str = "refuse"  # refuse | any | ok (pristine)
    note: str = ""
    huge: bool = False  # claims sizes far beyond the file: check memory

    @property
    def id(self) -> str:
        return self.path.name


def marker_path(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / MARKER


# ---------------------------------------------------------------------------------------- safetensors bytes

_DT = {"F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2)}
_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def header_bytes(header: Any) -> bytes:
    """JSON of a header (dict or ready text), padded with spaces to a multiple of 8 as safetensors writes it."""
    text = header if isinstance(header, (bytes, str)) else json.dumps(header, separators=(",", ":"))
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    return raw + b" " * (-len(raw) % 8)


def st_file(header: Any, data: bytes, *, length: int | None = None) -> bytes:
    h = header_bytes(header)
    return struct.pack("<Q", len(h) if length is None else length) + h + data


def st_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    chunks, at = [], 0
    for name, t in tensors.items():
        b = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + len(b)]}
        chunks.append(b)
        at += len(b)
    return st_file(header, b"".join(chunks))


@dataclass
class Parsed:
    """A well-formed safetensors file taken apart: header length, header dict (file order), data section."""

    raw: bytes
    n: int
    header: dict[str, Any]
    data: bytes

    @classmethod
    def of(cls, raw: bytes) -> "Parsed":
        (n,) = struct.unpack("<Q", raw[:8])
        return cls(raw, n, json.loads(raw[8:8 + n]), raw[8 + n:])

    @property
    def entries(self) -> list[tuple[str, dict]]:
        """Tensors by offset (no ``__metadata__``)."""
        return sorted(((k, v) for k, v in self.header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])

    def copy_header(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.header))


def _is_wellformed(raw: bytes) -> bool:
    """The safetensors library's verdict, plus the checks it leaves out (names unique and valid UTF-8)."""
    from safetensors.torch import load

    try:
        (n,) = struct.unpack("<Q", raw[:8])
        text = raw[8:8 + n].decode("utf-8")
        pairs = json.loads(text, object_pairs_hook=lambda p: p)
        names = [k for k, _ in pairs]
        if len(set(names)) != len(names) or any("\udc80" <= c <= "\udfff" or "\ud800" <= c <= "\udbff" for k in names for c in k):
            return False
        load(raw)
        return True
    except Exception:
        return False


# ---------------------------------------------------------------------------------------- the bases

_SD15_LAYERS = [  # (diffusers path, kohya name, out, in): SD1.5 shapes; attn2.to_k says "768-wide text = SD1"
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 320, 320),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 768),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v", 320, 768),
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
     "lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768),
]


def sd15_lora(fmt: str, *, rank: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for path, kname, o, i in _SD15_LAYERS:
        down = (torch.randn(rank, i, generator=g) / math.sqrt(i)).to(dtype)
        up = (torch.randn(o, rank, generator=g) * 0.1).to(dtype)
        if fmt == "kohya":
            out[f"{kname}.alpha"] = torch.tensor(float(rank) / 2).to(dtype)
            out[f"{kname}.lora_down.weight"] = down
            out[f"{kname}.lora_up.weight"] = up
        else:
            out[f"{path}.lora_A.weight"] = down
            out[f"{path}.lora_B.weight"] = up
    return out


def tiny_lora(pipe: Any, fmt: str, *, seed: int = 1) -> dict[str, torch.Tensor]:
    """A rank-2 LoRA on the attention projections of the tiny pipeline, written by lorablend's own writer."""
    import tempfile

    from safetensors.torch import load_file

    from lorablend.fixtures.tiny_unets import random_adapter
    from lorablend.io import save_adapter

    adapter = random_adapter(pipe, f"tiny_{fmt}", rank=2, alpha=1.0 if fmt == "kohya" else None, seed=seed, targets="attn")
    with tempfile.TemporaryDirectory() as d:
        path = save_adapter(adapter, Path(d) / "x.safetensors", format=fmt, target=pipe)
        return load_file(str(path))


def tiny_checkpoint(pipe: Any) -> dict[str, torch.Tensor]:
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from ldm_convert import to_ldm  # the tests' own LDM converter (independent of lorablend.checkpoint)

    return to_ldm(pipe, "sd1")


# ---------------------------------------------------------------------------------------- damage

Variant = tuple[str, bytes, str]  # (label, bytes, expect)
Mutator = Callable[[Parsed, random.Random, bool], Iterable[Variant]]
MUTATORS: dict[str, Mutator] = {}


def damage(kind: str) -> Callable[[Mutator], Mutator]:
    def register(fn: Mutator) -> Mutator:
        MUTATORS[kind] = fn
        return fn

    return register


def _first(variants: list, full: bool) -> list:
    return variants if full else variants[:1]


@damage("truncate_in_length")
def _(p: Parsed, rng: random.Random, full: bool):
    return [(f"at{k}", p.raw[:k], "refuse") for k in _first([4, 1, 7], full)]


@damage("truncate_in_header")
def _(p: Parsed, rng: random.Random, full: bool):
    return [(f"at{k}", p.raw[:k], "refuse") for k in _first([8 + p.n // 2, 9, 8 + p.n - 1], full)]


@damage("truncate_at_data_start")
def _(p: Parsed, rng: random.Random, full: bool):
    return [("at_data", p.raw[:8 + p.n], "refuse")]


@damage("truncate_between_tensors")
def _(p: Parsed, rng: random.Random, full: bool):
    ends = sorted({v["data_offsets"][1] for _, v in p.entries if 0 < v["data_offsets"][1] < len(p.data)})
    picks = ends[:: max(1, len(ends) // 6)][:6] if full else ends[len(ends) // 2: len(ends) // 2 + 1]
    return [(f"after{e}", p.raw[:8 + p.n + e], "refuse") for e in picks]


@damage("truncate_in_tensor")
def _(p: Parsed, rng: random.Random, full: bool):
    spans = [v["data_offsets"] for _, v in p.entries if v["data_offsets"][1] - v["data_offsets"][0] > 1]
    cuts = [(b + e) // 2 for b, e in spans[:: max(1, len(spans) // 3)]][:3]
    return [(f"mid{c}", p.raw[:8 + p.n + c], "refuse") for c in _first(cuts + [len(p.data) - 1], full)]


@damage("truncate_random")
def _(p: Parsed, rng: random.Random, full: bool):
    cuts = sorted(rng.randrange(1, len(p.raw)) for _ in range(8 if full else 1))
    return [(f"r{c}", p.raw[:c], "refuse") for c in cuts]


def _flip(raw: bytes, at: int, bit: int) -> bytes:
    b = bytearray(raw)
    b[at] ^= 1 << bit
    return bytes(b)


def _structural_positions(p: Parsed) -> list[int]:
    """Header bytes of structure, dtypes, shapes and offsets (not inside names or metadata values)."""
    text = p.raw[8:8 + p.n].decode("utf-8", "replace")
    out, inside, start = [], False, 0
    for i, ch in enumerate(text):
        if ch == '"':
            inside = not inside
            start = i
        if not inside and ch not in " ":
            out.append(8 + i)
        elif inside and text[start:start + 6] in ('"F32"', '"F16"', '"BF16"', '"I32"'):
            out.append(8 + i)
    return out


@damage("flip_header_bits")
def _(p: Parsed, rng: random.Random, full: bool):
    pos = _structural_positions(p)
    out = []
    for j in range(6 if full else 2):
        raw = _flip(p.raw, rng.choice(pos), rng.randrange(8))
        out.append((f"f{j}", raw, "any" if _is_wellformed(raw) else "refuse"))
    return out


@damage("flip_any_header_bits")
def _(p: Parsed, rng: random.Random, full: bool):
    out = []
    for j in range(4 if full else 1):
        raw = _flip(p.raw, rng.randrange(8, 8 + p.n), rng.randrange(8))
        out.append((f"f{j}", raw, "any" if _is_wellformed(raw) else "refuse"))
    return out


@damage("garble_header")
def _(p: Parsed, rng: random.Random, full: bool):
    out = []
    for j in range(3 if full else 1):
        at = rng.randrange(8, 8 + p.n - 16)
        raw = p.raw[:at] + bytes(rng.randrange(256) for _ in range(16)) + p.raw[at + 16:]
        out.append((f"g{j}", raw, "any" if _is_wellformed(raw) else "refuse"))
    return out


@damage("header_not_utf8")
def _(p: Parsed, rng: random.Random, full: bool):
    text = p.raw[8:8 + p.n]
    at = text.index(b'"', 2) - 1  # the last byte of the first name
    raw = p.raw[:8 + at] + b"\xff" + p.raw[8 + at + 1:]
    return [("ff_in_name", raw, "refuse")]


@damage("header_len_2p63")
def _(p: Parsed, rng: random.Random, full: bool):
    return [("len2p63", struct.pack("<Q", 1 << 63) + p.raw[8:], "refuse")]


@damage("header_len_2p64_minus_1")
def _(p: Parsed, rng: random.Random, full: bool):
    return [("lenmax", struct.pack("<Q", (1 << 64) - 1) + p.raw[8:], "refuse")]


@damage("header_len_gt_file")
def _(p: Parsed, rng: random.Random, full: bool):
    return [(f"len{n}", struct.pack("<Q", n) + p.raw[8:], "refuse") for n in _first([len(p.raw) - 7, len(p.raw) * 2], full)]


@damage("header_len_short")
def _(p: Parsed, rng: random.Random, full: bool):
    return [(f"minus{d}", struct.pack("<Q", p.n - d) + p.raw[8:], "refuse") for d in _first([8, 1], full)]


@damage("header_len_zero")
def _(p: Parsed, rng: random.Random, full: bool):
    return [("len0", struct.pack("<Q", 0) + p.raw[8:], "refuse")]


@damage("json_deep")
def _(p: Parsed, rng: random.Random, full: bool):
    deep = 10 ** 5
    h = header_bytes(p.raw[8:8 + p.n].rstrip()).rstrip()
    meta = b'{"__metadata__":{"x":' + b"[" * deep + b"]" * deep + b"},"
    objs = b'{"__metadata__":' + b'{"a":' * deep + b"1" + b"}" * deep + b","
    out = [("in_metadata", st_file(meta + h[1:], p.data), "refuse"),
           ("objects", st_file(objs + h[1:], p.data), "refuse"),
           ("bare", st_file(b"[" * deep + b"]" * deep, p.data), "refuse")]
    return _first(out, full)


@damage("json_not_object")
def _(p: Parsed, rng: random.Random, full: bool):
    return [(f"v{i}", st_file(t, p.data), "refuse") for i, t in enumerate(_first(['[1,2]', '"x"', "null", "123", '{"a":1}'], full))]


@damage("json_trailing_garbage")
def _(p: Parsed, rng: random.Random, full: bool):
    return [("garbage", st_file(p.raw[8:8 + p.n].rstrip() + b"}x", p.data), "refuse")]


@damage("dtype_unknown")
def _(p: Parsed, rng: random.Random, full: bool):
    out = []
    for i, dt in enumerate(_first(["F33", "Q4_K", 5, None, "float32", ""], full)):
        h = p.copy_header()
        h[p.entries[0][0]]["dtype"] = dt
        out.append((f"d{i}", st_file(h, p.data), "refuse"))
    return out


@damage("shape_bytes_mismatch")
def _(p: Parsed, rng: random.Random, full: bool):
    name, info = max(p.entries, key=lambda kv: len(kv[1]["shape"]))
    shape = info["shape"]
    lies = [[*shape[:-1], shape[-1] + 1], [], [*shape, 2], [-shape[0], *shape[1:]], [float(shape[0]), *shape[1:]], "12"]
    out = []
    for i, s in enumerate(_first(lies, full)):
        h = p.copy_header()
        h[name]["shape"] = s
        out.append((f"s{i}", st_file(h, p.data), "refuse"))
    return out


@damage("shape_absurd")
def _(p: Parsed, rng: random.Random, full: bool):
    name = p.entries[-1][0]
    out = []
    for i, s in enumerate(_first([[1 << 40, 1 << 40], [1 << 32, 1 << 32], [1 << 62, 4], [10 ** 30]], full)):
        h = p.copy_header()
        h[name]["shape"] = s  # [2^32, 2^32] x 1 byte wraps to 0 in 64 bits; the others claim exabytes
        h[name]["dtype"] = "U8" if i == 1 else h[name]["dtype"]
        out.append((f"s{i}", st_file(h, p.data), "refuse"))
    return out


def _with_offsets(p: Parsed, name: str, offsets: Any) -> bytes:
    h = p.copy_header()
    h[name]["data_offsets"] = offsets
    return st_file(h, p.data)


@damage("offsets_overlap")
def _(p: Parsed, rng: random.Random, full: bool):
    (a, ia), (b, ib) = p.entries[0], p.entries[1]
    n = ib["data_offsets"][1] - ib["data_offsets"][0]
    start = ia["data_offsets"][0] + (1 if full else 0)
    out = [("same_span_as_first", _with_offsets(p, b, [ia["data_offsets"][0], ia["data_offsets"][0] + n]), "refuse")]
    if full:
        out.append(("shifted", _with_offsets(p, b, [start, start + n]), "refuse"))
    return out


@damage("offsets_out_of_range")
def _(p: Parsed, rng: random.Random, full: bool):
    name, info = p.entries[-1]
    b, e = info["data_offsets"]
    lies = [[b, len(p.data) + 4], [len(p.data) + 8, len(p.data) + 8 + (e - b)], [(1 << 63), (1 << 63) + (e - b)],
            [(1 << 64) - 4, (1 << 64) - 4 + (e - b)]]
    return [(f"o{i}", _with_offsets(p, name, o), "refuse") for i, o in enumerate(_first(lies, full))]


@damage("offsets_reversed")
def _(p: Parsed, rng: random.Random, full: bool):
    name, info = p.entries[-1]
    b, e = info["data_offsets"]
    return [("reversed", _with_offsets(p, name, [e, b]), "refuse")]


@damage("offsets_malformed")
def _(p: Parsed, rng: random.Random, full: bool):
    name, info = p.entries[0]
    b, e = info["data_offsets"]
    lies = [[b], [b, e, e], [str(b), str(e)], [-8, e - 8], [b + 0.5, e + 0.5], None, 7]
    return [(f"m{i}", _with_offsets(p, name, o), "refuse") for i, o in enumerate(_first(lies, full))]


@damage("offsets_gap")
def _(p: Parsed, rng: random.Random, full: bool):
    """8 bytes no tensor covers: between two tensors, or after the last one (data hidden in a gap)."""
    h = p.copy_header()
    first, *rest = p.entries
    for name, _ in rest:
        b, e = h[name]["data_offsets"]
        h[name]["data_offsets"] = [b + 8, e + 8]
    e0 = first[1]["data_offsets"][1]
    between = st_file(h, p.data[:e0] + b"HIDDEN!!" + p.data[e0:])
    return _first([("between", between, "refuse"), ("trailing", p.raw + b"HIDDEN!!", "refuse")], full)


def _set_values(p: Parsed, value: float, *, middle: bool = True) -> bytes:
    name, info = max(p.entries, key=lambda kv: kv[1]["data_offsets"][1] - kv[1]["data_offsets"][0])
    dtype, size = _DT[info["dtype"]]
    b, e = info["data_offsets"]
    t = torch.frombuffer(bytearray(p.data[b:e]), dtype=dtype).clone()
    t[t.numel() // 2 if middle else -1] = value
    data = p.data[:b] + t.view(torch.uint8).numpy().tobytes() + p.data[e:]
    return st_file(p.raw[8:8 + p.n], data)


@damage("nan_payload")
def _(p: Parsed, rng: random.Random, full: bool):
    return _first([("nan", _set_values(p, float("nan")), "refuse"), ("nan_last", _set_values(p, float("nan"), middle=False), "refuse")], full)


@damage("inf_payload")
def _(p: Parsed, rng: random.Random, full: bool):
    return _first([("inf", _set_values(p, float("inf")), "refuse"), ("ninf", _set_values(p, float("-inf")), "refuse")], full)


def _header_text(p: Parsed) -> str:
    return p.raw[8:8 + p.n].decode().rstrip()


@damage("duplicate_key")
def _(p: Parsed, rng: random.Random, full: bool):
    (a, ia), (b, ib) = p.entries[0], p.entries[1]
    text = _header_text(p)
    # the second entry spelled with the first's name: both spans covered, the name twice
    entry_b = json.dumps({b: ib}, separators=(",", ":"))[1:-1]
    dup = text.replace(entry_b, json.dumps(a) + entry_b[len(json.dumps(b)):], 1)
    assert dup != text
    again = text[:-1] + "," + json.dumps({a: ia}, separators=(",", ":"))[1:-1] + "}"  # the same entry twice
    meta = '{"__metadata__":{"a":"1"},"__metadata__":{"b":"2"},' + text[1:]
    return _first([("repeated", st_file(again, p.data), "refuse"), ("renamed", st_file(dup, p.data), "refuse"),
                   ("metadata_twice", st_file(meta, p.data), "refuse")], full)


@damage("nonutf8_name")
def _(p: Parsed, rng: random.Random, full: bool):
    name = p.entries[0][0]
    text = _header_text(p)
    lone = text.replace(json.dumps(name), json.dumps(name)[:-1] + '\\udcff"', 1)
    high = text.replace(json.dumps(name), json.dumps(name)[:-1] + '\\ud800"', 1)
    meta = '{"__metadata__":{"\\udcff":"x"},' + text[1:]
    return _first([("lone_low", st_file(lone, p.data), "refuse"), ("lone_high", st_file(high, p.data), "refuse"),
                   ("in_metadata_key", st_file(meta, p.data), "refuse")], full)


@damage("zero_size_tensor")
def _(p: Parsed, rng: random.Random, full: bool):
    """The rank of every pair set to 0 (zero-size factors, an empty data section), or one factor emptied."""
    h = p.copy_header()
    for name, info in p.entries:
        if len(info["shape"]) >= 2:
            shape = list(info["shape"])
            r = 0 if ("down" in name or "lora_A" in name or "w1" in name) else 1
            shape[r] = 0
            h[name]["shape"] = shape
        h[name]["data_offsets"] = [0, 0]
    for name, info in p.entries:
        if len(info["shape"]) < 2:
            h[name]["shape"] = [0]
    all_zero = st_file(h, b"")
    h2 = p.copy_header()
    name, info = max(p.entries, key=lambda kv: kv[1]["data_offsets"][1] - kv[1]["data_offsets"][0])
    b, e = info["data_offsets"]
    h2[name]["shape"] = [0, *info["shape"][1:]]
    for other, oinfo in p.entries:
        ob, oe = oinfo["data_offsets"]
        if ob >= e:
            h2[other]["data_offsets"] = [ob - (e - b), oe - (e - b)]
    h2[name]["data_offsets"] = [b, b]
    one = st_file(h2, p.data[:b] + p.data[e:])
    return _first([("all", all_zero, "refuse"), ("one", one, "refuse")], full)


@damage("metadata_malformed")
def _(p: Parsed, rng: random.Random, full: bool):
    out = []
    for i, meta in enumerate(_first(["x", {"a": 1}, ["x"], 7, {"a": {"b": "c"}}], full)):
        h = p.copy_header()
        h["__metadata__"] = meta
        out.append((f"m{i}", st_file(h, p.data), "refuse"))
    return out


@damage("no_tensors")
def _(p: Parsed, rng: random.Random, full: bool):
    return _first([("empty_object", st_file("{}", b""), "refuse"),
                   ("only_metadata", st_file({"__metadata__": {"a": "b"}}, b""), "refuse")], full)


def _rename_tensors(tensors: dict[str, torch.Tensor], fn: Callable[[str, torch.Tensor], torch.Tensor | None]) -> dict:
    out = {}
    for k, t in tensors.items():
        v = fn(k, t)
        if v is not None:
            out[k] = v
    return out


def _is_up(k: str) -> bool:
    return k.endswith(("lora_up.weight", "lora_B.weight", ".lora.up.weight", "_lora.up.weight"))


@damage("rank_mismatch")
def _(p: Parsed, rng: random.Random, full: bool):
    """Every pair's up factor one rank short of its down factor (``every``), or only one pair (``one``: a
    strict load refuses; a lenient one skips that layer)."""
    from safetensors.torch import load

    tensors = load(p.raw)
    ups = [k for k in tensors if _is_up(k)]
    if not ups:  # LoKr / LoHa: no up factor to cut
        return []
    every = _rename_tensors(tensors, lambda k, t: t[:, :-1].contiguous() if k in ups else t)
    out = [("every", st_from_tensors(every, p.header.get("__metadata__")), "refuse")]
    if full:
        one = _rename_tensors(tensors, lambda k, t: t[:, :-1].contiguous() if k == ups[0] else t)
        out.append(("one", st_from_tensors(one, p.header.get("__metadata__")), "refuse_strict"))
    return out


@damage("alpha_wrong_shape")
def _(p: Parsed, rng: random.Random, full: bool):
    from safetensors.torch import load

    tensors = load(p.raw)
    if not any(k.endswith(".alpha") for k in tensors):
        return []
    out = []
    for label, shape in _first([("vector", (4,)), ("matrix", (2, 2))], full):
        bad = _rename_tensors(tensors, lambda k, t: torch.full(shape, 2.0, dtype=t.dtype) if k.endswith(".alpha") else t)
        out.append((label, st_from_tensors(bad, p.header.get("__metadata__")), "refuse"))
    return out


# ---------------------------------------------------------------------------------------- files that are no file

def _big_header_file(path: Path, n: int, *, sparse: bool) -> None:
    """A header of ``n`` bytes: a real JSON object padded with spaces, or (sparse) a hole of zero bytes."""
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n))
        start = b'{"__metadata__":{"x":"'
        f.write(start)
        if sparse:
            f.seek(8 + n - 3)
        else:
            chunk = b"A" * (1 << 20)
            left = n - len(start) - 3
            while left > 0:
                f.write(chunk[:left])
                left -= len(chunk)
        f.write(b'"}}')


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears only if a loader ran the payload."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        import builtins

        return (builtins.open, (self.marker, "w"))


def _pickles(out: Path, marker: Path, full: bool) -> list[tuple[str, Path]]:
    made = []
    state = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 320),
             "evil": _Payload(marker)}
    specs = [("bin_zip", ".bin", "torch"), ("pt_raw", ".pt", "raw"), ("ckpt_zip", ".ckpt", "torch"),
             ("pth_list", ".pth", "list"), ("bin_state_dict", ".bin", "wrapped"), ("safetensors_named", ".safetensors", "raw")]
    for label, suffix, how in specs if full else specs[:3] + specs[-1:]:
        path = out / f"pickle_reduce__{label}{suffix}"
        if how == "torch":
            torch.save(state, path)
        elif how == "raw":
            path.write_bytes(pickle.dumps(state, protocol=2))
        elif how == "list":
            torch.save([torch.zeros(2), _Payload(marker)], path)
        else:
            torch.save({"state_dict": state}, path)
        made.append((label, path))
    return made


# ---------------------------------------------------------------------------------------- the corpus

# damage applied to each group's bases in the fast subset (full mode: every base gets every kind)
FAST_BASES = {"sd15_kohya": None, "tiny_diffusers": None, "tiny_ckpt": {
    "truncate_in_tensor", "header_len_2p63", "shape_bytes_mismatch", "offsets_overlap", "duplicate_key", "nonutf8_name",
    "zero_size_tensor"}}
CKPT_KINDS = FAST_BASES["tiny_ckpt"] | {"truncate_in_header", "truncate_random", "flip_header_bits", "json_deep",
                                          "header_len_gt_file", "offsets_reversed", "offsets_out_of_range",
                                          "offsets_gap", "dtype_unknown", "truncate_between_tensors", "zero_size_tensor"}


def build_corpus(out_dir: str | os.PathLike, *, full: bool, pipe: Any = None, seed: int = 0) -> list[Case]:
    """Write the corpus into ``out_dir`` (created) and return its cases, pristine bases first.

    ``pipe``: the tiny SD1.5 diffusers pipeline (``lorablend.fixtures.tiny_unets.tiny_pipeline("sd1")`` is built when None).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    if pipe is None:
        from lorablend.fixtures.tiny_unets import tiny_pipeline

        pipe = tiny_pipeline("sd1")
    bases: dict[str, tuple[bytes, str]] = {
        "sd15_kohya": (st_from_tensors(sd15_lora("kohya"), {"ss_network_dim": "4"}), OFFLINE),
        "sd15_diffusers": (st_from_tensors(sd15_lora("diffusers", dtype=torch.float16, seed=1)), OFFLINE),
        "tiny_kohya": (st_from_tensors(tiny_lora(pipe, "kohya")), TINY),
        "tiny_diffusers": (st_from_tensors(tiny_lora(pipe, "diffusers", seed=2)), TINY),
        "tiny_ckpt": (st_from_tensors(tiny_checkpoint(pipe), {"modelspec.title": "tiny"}), CKPT),
    }
    real: dict[str, Path] = {}
    if REALDATA.is_dir():
        for name, rel in REAL_FILES.items():
            if (REALDATA / rel).is_file():
                real[name] = REALDATA / rel
                if rel.endswith(".safetensors") and (full or name == "real_lokr"):
                    bases[name] = ((REALDATA / rel).read_bytes(), OFFLINE)
    cases: list[Case] = []
    pristine = out / "pristine"
    pristine.mkdir(exist_ok=True)
    for name, (raw, group) in bases.items():
        path = pristine / f"{name}.safetensors"
        path.write_bytes(raw)
        cases.append(Case(path, "pristine", name, group, expect="ok"))

    for base, (raw, group) in bases.items():
        p = Parsed.of(raw)
        if full:
            kinds = set(MUTATORS) if group != CKPT else CKPT_KINDS
        elif base in FAST_BASES:
            kinds = FAST_BASES[base] or set(MUTATORS)
            if base == "tiny_diffusers":  # the pipeline group: the kinds whose meaning is a LoRA's, and a few more
                kinds = {"rank_mismatch", "nan_payload", "inf_payload", "zero_size_tensor", "duplicate_key",
                         "nonutf8_name", "truncate_between_tensors", "json_deep", "header_len_2p63",
                         "shape_bytes_mismatch", "offsets_overlap", "flip_header_bits", "dtype_unknown"}
        elif base == "tiny_kohya":
            kinds = {"alpha_wrong_shape"}
        else:
            kinds = {"truncate_in_tensor"}  # a real file: one cut (the rest in full mode)
        for kind in sorted(kinds):
            # big bases (the 8.6 MB checkpoint, 3 MB real files) get one variant of each kind: disk, not coverage
            many = full and len(raw) < (1 << 20)
            for label, data, expect in MUTATORS[kind](p, rng, many):
                path = out / f"{kind}__{base}__{label}.safetensors"
                path.write_bytes(data)
                cases.append(Case(path, kind, base, group, expect=expect, huge=kind in HUGE_KINDS))

    # no base: files and folders that are not LoRAs at all
    def add(path: Path, kind: str, note: str = "", huge: bool = False, group: str = ANY) -> None:
        cases.append(Case(path, kind, "-", group, note=note, huge=huge))

    (out / "empty_file__0.safetensors").write_bytes(b"")
    add(out / "empty_file__0.safetensors", "empty_file")
    if full:
        (out / "empty_file__bin.bin").write_bytes(b"")
        add(out / "empty_file__bin.bin", "empty_file")
        (out / "empty_file__eight_zero_bytes.safetensors").write_bytes(bytes(8))
        add(out / "empty_file__eight_zero_bytes.safetensors", "empty_file")
    (out / "not_a_weight_file__html.safetensors").write_bytes(b"<!DOCTYPE html><html><body>Not found</body></html>\n")
    add(out / "not_a_weight_file__html.safetensors", "not_a_weight_file")
    if full:
        (out / "not_a_weight_file__lfs.safetensors").write_bytes(
            b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 3227336\n")
        add(out / "not_a_weight_file__lfs.safetensors", "not_a_weight_file")
    sparse = out / "header_100mb_sparse__-.safetensors"
    _big_header_file(sparse, 100 * 1024 * 1024, sparse=True)
    add(sparse, "header_100mb_sparse", "100 MiB header of zero bytes (a hole)", huge=True)
    if full:
        for label, n in (("100mib", 100 * 1024 * 1024), ("100mib_plus1", 100 * 1024 * 1024 + 1)):
            path = out / f"header_100mb__{label}.safetensors"
            _big_header_file(path, n, sparse=False)
            add(path, "header_100mb", "a real 100 MiB JSON header", huge=True)
    d = out / "directory_empty__-"
    d.mkdir()
    add(d, "directory_empty")
    d = out / "directory_two_files__-"
    d.mkdir()
    (d / "a.safetensors").write_bytes(bases["tiny_diffusers"][0])
    (d / "b.safetensors").write_bytes(bases["tiny_kohya"][0])
    add(d, "directory_two_files")
    if full:
        d = out / "directory_two_files__st_and_pt"
        d.mkdir()
        (d / "a.safetensors").write_bytes(bases["sd15_kohya"][0])
        torch.save(sd15_lora("diffusers"), d / "b.pt")
        add(d, "directory_two_files")
        d = out / "directory_empty__subfolder_only"
        (d / "unet").mkdir(parents=True)
        add(d, "directory_empty")
    a, b = out / "symlink_loop__a.safetensors", out / "symlink_loop__b.safetensors"
    os.symlink(b.name, a)
    os.symlink(a.name, b)
    add(a, "symlink_loop")
    if full:
        add(b, "symlink_loop")
        s = out / "symlink_loop__self.safetensors"
        os.symlink(s.name, s)
        add(s, "symlink_loop")
        d = out / "symlink_loop__in_folder"
        d.mkdir()
        os.symlink("x.safetensors", d / "x.safetensors")
        add(d, "symlink_loop")
    marker = marker_path(out)
    for label, path in _pickles(out, marker, full):
        add(path, "pickle_reduce", label)
    if "real_pickle" in real:
        raw = real["real_pickle"].read_bytes()
        cuts = [len(raw) // 2, len(raw) - 1, 100] if full else [len(raw) // 2]
        for c in cuts:
            path = out / f"pickle_truncated__real_pickle__at{c}.bin"
            path.write_bytes(raw[:c])
            cases.append(Case(path, "pickle_truncated", "real_pickle", OFFLINE))
    buf = io.BytesIO()
    torch.save(sd15_lora("diffusers"), buf)
    raw = buf.getvalue()
    for c in ([len(raw) // 2, len(raw) - 30, 64] if full else [len(raw) // 2]):
        path = out / f"pickle_truncated__sd15_diffusers__at{c}.pt"
        path.write_bytes(raw[:c])
        cases.append(Case(path, "pickle_truncated", "sd15_diffusers", OFFLINE))
    return cases


def kinds_of(cases: list[Case]) -> dict[str, int]:
    return dict(sorted(collections.Counter(c.kind for c in cases if c.expect != "ok").items()))


def gguf_hostile_files(good: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Damaged variants of a good GGUF file (issue 18's bake refuses each before writing): cut short, a tensor's
    data offset pointing past the end (a lying offset), an unknown GGML type, two tensors over the same bytes, a
    bad magic. Positions come from gguf-py's reader of the good file (each tensor-info field's own offset)."""
    import struct

    import gguf

    raw = Path(good).read_bytes()
    infos = gguf.GGUFReader(good).tensors
    first, second = infos[0].field, infos[1].field

    def type_at(field) -> int:  # name (u64 length + bytes), n_dims u32, dims u64 each, then the u32 type
        name_len = struct.unpack_from("<Q", raw, field.offset)[0]
        n_dims = struct.unpack_from("<I", raw, field.offset + 8 + name_len)[0]
        return field.offset + 8 + name_len + 4 + 8 * n_dims

    def patched(at: int, fmt: str, value: int) -> bytes:
        out = bytearray(raw)
        struct.pack_into(fmt, out, at, value)
        return bytes(out)

    second_offset = struct.unpack_from("<Q", raw, type_at(second) + 4)[0]
    variants = {
        "truncated": raw[: len(raw) - 100],
        "lying_offset": patched(type_at(first) + 4, "<Q", len(raw) * 4),
        "unknown_type": patched(type_at(first), "<I", 99),
        "overlap": patched(type_at(first) + 4, "<Q", second_offset),
        "bad_magic": b"GGUX" + raw[4:],
    }
    paths = {}
    for name, data in variants.items():
        path = Path(out_dir) / f"hostile-{name}.gguf"
        path.write_bytes(data)
        paths[name] = path
    return paths


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="write the hostile-input corpus into a folder")
    ap.add_argument("out_dir")
    ap.add_argument("--full", action="store_true", help="the whole corpus (default: the fast subset)")
    args = ap.parse_args(argv)
    cases = build_corpus(args.out_dir, full=args.full)
    counts = kinds_of(cases)
    for kind, n in counts.items():
        print(f"{n:4d}  {kind}")
    print(f"{sum(counts.values()):4d}  damaged files ({len(counts)} kinds), plus {len(cases) - sum(counts.values())} pristine bases, in {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
