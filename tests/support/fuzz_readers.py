"""Fuzzing the header and format readers: any bytes given to ``load_adapter`` give an Adapter or the library's
error (``LoraFormatError`` / ``LoraCompatibilityError``), within 2 s. Nothing else: no RecursionError,
KeyError, MemoryError, OSError, no hang.

Two engines over the same mutations of real safetensors bytes (truncate, flip bits, splice, rewrite a field of
the header JSON, rewrite the length) and generated headers (names, dtypes, shapes and offsets drawn at random):

* :func:`fuzz` — coverage-guided: an input that makes the readers (``src/lorablend``) take a line-to-line arc
  never seen before joins the pool that later inputs are mutated from;
* :func:`hostile_bytes` — a ``hypothesis`` strategy (shrinks a failure to a small input); the suite runs a
  short smoke of it (tests/test_hostile_inputs.py).

``make fuzz MINUTES=N`` runs both for N minutes (default 2), prints inputs tried and crashes, writes each
crashing input to ``fuzz-crashes/`` and exits 1 if there was any::

    python tests/support/fuzz_readers.py --minutes 2 --crashes fuzz-crashes
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import hostile_corpus as hc  # noqa: E402

LIMIT_S = 2.0
DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I32", "I64", "BOOL", "F8_E4M3", "F8_E5M2", "U16", "U32", "U64",
          "I16", "F8_E8M0", "F33", "", "f32", 5, None]
NAMES = ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight",
         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha",
         "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight",
         "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight",
         "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
         "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lokr_w1", "x", "", "__metadata__", "\udcff", "a" * 300]
INTS = [0, 1, 2, 3, 4, 7, 8, 320, 768, 1 << 31, 1 << 32, 1 << 63, (1 << 64) - 1, 1 << 64, -1, -(1 << 63)]


# ------------------------------------------------------------------------------------------ seeds


def seeds() -> list[bytes]:
    """Well-formed files: the synthetic SD1.5 LoRAs (kohya F32, PEFT F16, rank 1) and a small real one if present."""
    out = [hc.st_from_tensors(hc.sd15_lora("kohya"), {"ss_network_dim": "4"}),
           hc.st_from_tensors(hc.sd15_lora("diffusers", dtype=__import__("torch").float16, seed=1)),
           hc.st_from_tensors(hc.sd15_lora("kohya", rank=1, seed=2))]
    real = hc.REALDATA / hc.REAL_FILES["real_lokr"]
    if real.is_file():
        out.append(real.read_bytes())
    return out


# ------------------------------------------------------------------------------------------ mutations


def _rand_value(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if r < 0.35:
        return rng.choice(INTS)
    if r < 0.5:
        return [rng.choice(INTS) for _ in range(rng.randrange(4))]
    if r < 0.65:
        return rng.choice(DTYPES)
    if r < 0.75:
        return rng.choice([1.5, float("1e300"), True, None, "", "12"])
    if r < 0.85 and depth < 3:
        return {rng.choice(["dtype", "shape", "data_offsets", "x"]): _rand_value(rng, depth + 1)}
    return rng.choice(NAMES)


def _split(data: bytes) -> tuple[int, bytes, bytes] | None:
    if len(data) < 8:
        return None
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        return None
    return n, data[8:8 + n], data[8 + n:]


def m_truncate(data: bytes, rng: random.Random) -> bytes:
    return data[:rng.randrange(len(data) + 1)] if data else data


def m_flip(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return data
    b = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 4])):
        split = _split(data)
        hi = 8 + split[0] if split and rng.random() < 0.8 else len(b)  # mostly the header
        b[rng.randrange(hi)] ^= 1 << rng.randrange(8)
    return bytes(b)


def m_splice(data: bytes, rng: random.Random) -> bytes:
    """Insert, delete or repeat a run of bytes, or graft another seed's tail."""
    if len(data) < 2:
        return data + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
    i, j = sorted(rng.randrange(len(data)) for _ in range(2))
    op = rng.randrange(4)
    if op == 0:
        return data[:i] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 17))) + data[i:]
    if op == 1:
        return data[:i] + data[j:]
    if op == 2:
        return data[:j] + data[i:j] + data[j:]
    other = rng.choice(_SEEDS)
    return data[:i] + other[rng.randrange(len(other)):]


def m_length(data: bytes, rng: random.Random) -> bytes:
    split = _split(data)
    n = split[0] if split else 0
    new = rng.choice([0, 1, n - 1, n + 1, n + 8, len(data), len(data) - 8, 1 << 63, (1 << 64) - 1, 100 << 20,
                      rng.randrange(1 << 64)])
    return struct.pack("<Q", new % (1 << 64)) + data[8:]


def m_header_field(data: bytes, rng: random.Random) -> bytes:
    """Rewrite one field of the header JSON (a tensor's dtype, shape or offsets; a name; the metadata)."""
    split = _split(data)
    if not split:
        return m_flip(data, rng)
    _, text, body = split
    try:
        header = json.loads(text)
    except Exception:
        return m_flip(data, rng)
    if not isinstance(header, dict) or not header:
        return m_flip(data, rng)
    name = rng.choice(list(header))
    op = rng.randrange(6)
    if op == 0 and isinstance(header[name], dict):
        header[name][rng.choice(["dtype", "shape", "data_offsets"])] = _rand_value(rng)
    elif op == 1 and isinstance(header[name], dict) and isinstance(header[name].get("data_offsets"), list):
        header[name]["data_offsets"] = [x + rng.choice([-8, -1, 1, 8]) if isinstance(x, int) else x
                                        for x in header[name]["data_offsets"]]
    elif op == 2:
        header[rng.choice(NAMES)] = header.pop(name)
    elif op == 3:
        header.pop(name)
    elif op == 4:
        header["__metadata__"] = rng.choice([{"a": "b"}, {"a": 1}, [], "x", {"\udcff": "v"}, {"ss_network_dim": "x"}])
    else:
        header[name] = _rand_value(rng)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8", "surrogatepass")
    if rng.random() < 0.2:  # a name twice, spelled in the JSON text
        first = json.dumps(name).encode("utf-8", "surrogatepass")
        at = raw.find(first + b":")
        if at > 0:
            end = raw.find(b"}", at) + 1
            raw = raw[:-1] + b"," + raw[at:end] + b"}"
    return hc.st_file(raw, body)


def generated_header(rng: random.Random) -> bytes:
    """A header made from scratch: 0-6 tensors with drawn names, dtypes, shapes and offsets over a short body."""
    header: dict[str, Any] = {}
    if rng.random() < 0.3:
        header["__metadata__"] = {"k": "v"} if rng.random() < 0.7 else _rand_value(rng)
    at = 0
    for _ in range(rng.randrange(7)):
        dtype = rng.choice(DTYPES[:6]) if rng.random() < 0.8 else rng.choice(DTYPES)
        shape = [rng.choice([0, 1, 2, 4, 8, 320]) for _ in range(rng.randrange(5))] if rng.random() < 0.85 else _rand_value(rng)
        size = 1
        for d in shape if isinstance(shape, list) else []:
            size *= d if isinstance(d, int) else 1
        nbytes = size * {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}.get(dtype if isinstance(dtype, str) else "", 1)
        nbytes = nbytes if rng.random() < 0.8 else rng.choice(INTS)
        offsets = [at, at + nbytes] if rng.random() < 0.85 else _rand_value(rng)
        header[rng.choice(NAMES) if rng.random() < 0.8 else f"t{at}"] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        at += nbytes if isinstance(nbytes, int) and 0 <= nbytes < (1 << 20) else 0
    body_len = max(0, min(at, 1 << 20)) + rng.choice([0, 0, 0, 1, 8])
    body = (b"\x00\x00\x80\x3f" * (body_len // 4 + 1))[:body_len]
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8", "surrogatepass")
    if rng.random() < 0.05:
        depth = rng.choice([100, 1000, 10 ** 5])
        raw = b'{"__metadata__":{"x":' + b"[" * depth + b"]" * depth + b"}}"
    return hc.st_file(raw, body)


MUTATIONS: list[Callable[[bytes, random.Random], bytes]] = [m_truncate, m_flip, m_flip, m_splice, m_length,
                                                            m_header_field, m_header_field, m_header_field]
_SEEDS: list[bytes] = []


def mutate(data: bytes, rng: random.Random) -> bytes:
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        data = rng.choice(MUTATIONS)(data, rng)
    return data


# ------------------------------------------------------------------------------------------ the property


Hung, _deadline = hc.Hung, hc.deadline  # the one alarm helper, shared with test_hostile_inputs.py


def _readers() -> list[Callable[[Path], Any]]:
    """What reads a file's header or format: the LoRA loader, and the bare header reader (the one bake and the
    checkpoint layout use) where this build has it."""
    import lorablend

    readers: list[Callable[[Path], Any]] = [lambda p: lorablend.load_adapter(str(p))]
    try:
        from lorablend.io.safetensors import read_header

        readers.append(read_header)
    except ImportError:
        pass
    return readers


def check_bytes(data: bytes, folder: Path, suffix: str = ".safetensors") -> str | None:
    """Read ``data`` as a file through ``load_adapter`` and the header reader: None when each answers (an
    Adapter, a header) or raises the library's error, all in time; else what went wrong."""
    import lorablend

    path = folder / f"input{suffix}"
    path.write_bytes(data)
    t = time.perf_counter()
    try:
        with _deadline(10 * LIMIT_S):
            for read in _readers():
                try:
                    read(path)
                except (lorablend.LoraFormatError, lorablend.LoraCompatibilityError):
                    pass
    except Hung:
        return f"hung (> {10 * LIMIT_S:.0f} s)"
    except BaseException as e:  # noqa: BLE001 - anything else is the finding
        return f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        path.unlink(missing_ok=True)
    seconds = time.perf_counter() - t
    if seconds > LIMIT_S:
        return f"slow: {seconds:.1f} s"
    return None


def save_crash(data: bytes, why: str, crashes: Path) -> Path:
    crashes.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(data).hexdigest()[:16]
    path = crashes / f"crash-{digest}.safetensors"
    path.write_bytes(data)
    (crashes / f"crash-{digest}.txt").write_text(why + "\n")
    return path


# ------------------------------------------------------------------------------------------ coverage guidance

SRC = str((HERE.parents[1] / "src" / "lorablend").resolve())


class Arcs:
    """Line-to-line arcs taken inside lorablend's own code (sys.settrace; other code is not traced)."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, int, int]] = set()
        self.current: set[tuple[str, int, int]] = set()

    def _local(self, frame, event, arg):
        if event == "line":
            code = frame.f_code
            self.current.add((code.co_filename, self._last.get(id(frame), -1), frame.f_lineno))
            self._last[id(frame)] = frame.f_lineno
        return self._local

    def _global(self, frame, event, arg):
        if frame.f_code.co_filename.startswith(SRC):
            return self._local
        return None

    @contextlib.contextmanager
    def tracing(self):
        self.current = set()
        self._last: dict[int, int] = {}
        sys.settrace(self._global)
        try:
            yield
        finally:
            sys.settrace(None)

    def new(self) -> int:
        fresh = self.current - self.seen
        self.seen |= fresh
        return len(fresh)


def fuzz(seconds: float, crashes: Path, *, seed: int = 0, log: Callable[[str], None] = print) -> dict[str, int]:
    """The coverage-guided loop for ``seconds``: returns {"inputs": tried, "crashes": n, "pool": kept, "arcs": seen}."""
    rng = random.Random(seed)
    _SEEDS[:] = seeds()
    pool = list(_SEEDS)
    arcs = Arcs()
    tried = crashed = 0
    end = time.monotonic() + seconds
    next_log = time.monotonic() + 30
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for s in pool:  # the seeds' own coverage first: must load
            with arcs.tracing():
                why = check_bytes(s, folder)
            arcs.new()
            assert why is None, f"a seed fails: {why}"
        while time.monotonic() < end:
            data = generated_header(rng) if rng.random() < 0.2 else mutate(rng.choice(pool), rng)
            with arcs.tracing():
                why = check_bytes(data, folder)
            tried += 1
            if arcs.new():
                pool.append(data)
            if why is not None:
                crashed += 1
                path = save_crash(data, why, crashes)
                log(f"CRASH {why} -> {path}")
            if time.monotonic() > next_log:
                log(f"  {tried} inputs, {crashed} crashes, pool {len(pool)}, {len(arcs.seen)} arcs")
                next_log += 30
    return {"inputs": tried, "crashes": crashed, "pool": len(pool), "arcs": len(arcs.seen)}


# ------------------------------------------------------------------------------------------ hypothesis


def hostile_bytes():
    """A hypothesis strategy: a seed mutated by drawn mutations (seeded by hypothesis, so it shrinks), or a
    generated header."""
    from hypothesis import strategies as st

    if not _SEEDS:
        _SEEDS[:] = seeds()
    mutated = st.builds(lambda i, r, k: _apply(_SEEDS[i % len(_SEEDS)], r, k),
                        st.integers(0, 10), st.randoms(use_true_random=False), st.integers(1, 3))
    generated = st.builds(generated_header, st.randoms(use_true_random=False))
    raw_header = st.builds(lambda text, body: hc.st_file(text, body), st.binary(max_size=200), st.binary(max_size=64))
    return st.one_of(mutated, mutated, generated, raw_header)


def _apply(data: bytes, rng: random.Random, k: int) -> bytes:
    for _ in range(k):
        data = rng.choice(MUTATIONS)(data, rng)
    return data


def run_hypothesis(seconds: float, crashes: Path, *, log: Callable[[str], None] = print) -> dict[str, int]:
    """The property under hypothesis, in rounds of 200 examples with fresh seeds, until ``seconds`` are spent."""
    from hypothesis import HealthCheck, given, settings

    counts = {"inputs": 0, "crashes": 0}
    end = time.monotonic() + seconds
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)

        @settings(max_examples=200, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(hostile_bytes())
        def prop(data: bytes) -> None:
            counts["inputs"] += 1
            why = check_bytes(data, folder)
            assert why is None, why

        while time.monotonic() < end:
            try:
                prop()
            except AssertionError as e:
                counts["crashes"] += 1
                log(f"CRASH (hypothesis, shrunk): {str(e).splitlines()[0][:300]}")
            except Exception as e:  # a falsifying example re-raised as something else
                counts["crashes"] += 1
                log(f"CRASH (hypothesis): {type(e).__name__}: {e}")
    return counts


# ------------------------------------------------------------------------------------------ GGUF (issue 18)


def gguf_seed(folder: Path) -> bytes:
    """A small well-formed GGUF file (Q8_0, Q4_0, F32 tensors and a few metadata values), gguf-py's writer."""
    import gguf
    import numpy as np

    from lorablend.quant.gguf import quantize_gguf

    path = folder / "seed.gguf"
    writer = gguf.GGUFWriter(path, "flux")
    writer.add_string("general.name", "seed")
    writer.add_array("tiny.list", [1, 2, 3])
    rng = np.random.default_rng(0)
    for name, qtype in (("a.weight", gguf.GGMLQuantizationType.Q8_0), ("b.weight", gguf.GGMLQuantizationType.Q4_0)):
        writer.add_tensor(name, quantize_gguf(rng.standard_normal((4, 64), dtype=np.float32), qtype), raw_dtype=qtype)
    writer.add_tensor("c.scale", rng.standard_normal(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    path.unlink()
    return data


def check_gguf(data: bytes, folder: Path) -> str | None:
    """``read_gguf`` (the check the GGUF bake runs before writing) on ``data``: None when it answers (a checked
    file, or ``LoraFormatError``) in time; else what went wrong."""
    import lorablend
    from lorablend.offline.quantized_files import read_gguf

    path = folder / "input.gguf"
    path.write_bytes(data)
    t = time.perf_counter()
    try:
        with _deadline(10 * LIMIT_S):
            try:
                read_gguf(path)
            except lorablend.LoraFormatError:
                pass
    except Hung:
        return f"hung (> {10 * LIMIT_S:.0f} s)"
    except BaseException as e:  # noqa: BLE001 - anything else is the finding
        return f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        path.unlink(missing_ok=True)
    seconds = time.perf_counter() - t
    return f"slow: {seconds:.1f} s" if seconds > LIMIT_S else None


def _m_run(data: bytes, rng: random.Random) -> bytes:
    """Delete or repeat a run of bytes, or overwrite 8 of them with a striking integer (counts, offsets)."""
    i, j = sorted(rng.randrange(len(data) + 1) for _ in range(2))
    op = rng.randrange(3)
    if op == 0:
        return data[:i] + data[j:]
    if op == 1:
        return data[:j] + data[i:j] + data[j:]
    return data[:i] + struct.pack("<Q", rng.choice(INTS) % (1 << 64)) + data[i + 8:]


def fuzz_gguf(seconds: float, crashes: Path, *, seed: int = 0) -> dict[str, int]:
    """Random truncations, bit flips and splices of a GGUF seed through :func:`check_gguf` for ``seconds``."""
    import lorablend.offline.quantized_files  # noqa: F401 - imports outside the timed checks

    rng = random.Random(seed)
    counts = {"inputs": 0, "crashes": 0}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        good = gguf_seed(folder)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            data = good
            for _ in range(rng.choice([1, 1, 2, 3])):
                data = rng.choice([m_truncate, m_flip, m_flip, _m_run])(data, rng)
            counts["inputs"] += 1
            why = check_gguf(data, folder)
            if why is not None:
                counts["crashes"] += 1
                save_crash(data, "gguf: " + why, crashes)
    return counts


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--crashes", default="fuzz-crashes", help="folder for crashing inputs (default fuzz-crashes)")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    seconds = args.minutes * 60
    seed = args.seed if args.seed is not None else int(time.time())
    crashes = Path(args.crashes)
    import lorablend  # noqa: F401 - imports outside the timed loop
    import logging

    logging.disable(logging.WARNING)
    t = time.monotonic()
    print(f"fuzzing lorablend's readers for {args.minutes:g} min (seed {seed}); crashing inputs go to {crashes}/")
    guided = fuzz(seconds * 0.75, crashes, seed=seed)
    print(f"coverage-guided: {guided['inputs']} inputs, {guided['crashes']} crashes, "
          f"{guided['arcs']} arcs in lorablend covered, pool of {guided['pool']}")
    hyp = run_hypothesis(max(1.0, seconds * 0.9 - (time.monotonic() - t)), crashes)
    print(f"hypothesis:      {hyp['inputs']} inputs, {hyp['crashes']} crashes")
    gg = fuzz_gguf(max(1.0, seconds - (time.monotonic() - t)), crashes, seed=seed)
    print(f"gguf (bake's reader): {gg['inputs']} inputs, {gg['crashes']} crashes")
    total = guided["inputs"] + hyp["inputs"] + gg["inputs"]
    bad = guided["crashes"] + hyp["crashes"] + gg["crashes"]
    print(f"total: {total} inputs tried, {bad} crashes in {time.monotonic() - t:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
