"""Read a LoRA source into plain tensors and header metadata, refusing bad input with errors that teach.

A source is a file (``.safetensors``; ``.bin`` / ``.pt`` / ``.ckpt`` / ``.pth`` torch pickles), a folder holding
exactly one weight file, or a dict of tensors. Files are recognised by their bytes, not their suffix.
Pickles go through ``torch.load(weights_only=True)`` only: we never run code from a file.

Every refusal is a :class:`~lorablend.errors.LoraFormatError` that names the source and the problem, raised
before anything is returned (there is no partial result).

>>> import torch
>>> raw = read_source({"unet.x.lora_A.weight": torch.zeros(2, 3)})
>>> raw.label, list(raw.tensors)
('<state dict>', ['unet.x.lora_A.weight'])
"""

from __future__ import annotations

import mmap
import pickle
import stat
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import LoraFormatError, WeightFileError
from .legacy import refuse_tensor_list
from .safetensors import DTYPES, looks_like_safetensors, read_header

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES

@dataclass
class RawSource:
    """What a source holds before any LoRA interpretation: tensors by key, header metadata, a label for messages."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    label: str = "<state dict>"
    name: str = "adapter"


def read_source(source: Any, *, weight_name: str | None = None, mapped: bool = False) -> RawSource:
    """Tensors and metadata of a file, a folder holding one weight file, or a dict of tensors.

    The caller's dict is never changed (a new dict is returned; tensors are shared, never modified).
    A safetensors file is read into one private buffer (a view per tensor), so nothing that later happens to
    the file reaches the tensors. ``mapped=True`` maps the file instead (copy-on-write, no copy made: much
    faster where fresh memory is costly): for a caller that copies the tensors elsewhere right away, e.g. to
    a GPU, and drops these; tensors kept from a map would change, or crash the process, if the file were
    rewritten in place.

    >>> read_source("missing.safetensors")                                    # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lorablend.errors.LoraFormatError: missing.safetensors: no such file or folder...
    """
    if isinstance(source, Mapping):
        return RawSource(tensors=_check_tensor_dict(dict(source), "<state dict>"), label="<state dict>")
    if isinstance(source, (list, tuple)):
        refuse_tensor_list(source, "<list>")
    if not isinstance(source, (str, Path)):
        raise LoraFormatError(
            f"cannot read a LoRA from a {type(source).__name__}: pass a file path, a folder, or a dict of tensors"
        )
    path = Path(source)
    if path.is_dir():
        path = pick_weight_file(path, weight_name=weight_name)
        name = Path(source).name
    elif weight_name is not None:
        raise LoraFormatError(f"{source}: weight_name={weight_name!r} is only meaningful when the source is a folder")
    else:
        name = path.stem
    if not path.exists():
        raise LoraFormatError(f"{path}: no such file or folder; pass the path of a LoRA .safetensors file")
    tensors, metadata = _read_file(path, mapped)
    return RawSource(tensors=tensors, metadata=metadata, label=str(path), name=name)


# Files a LoRA folder or repo may hold beside the LoRA (a trainer's resume state); diffusers skips them too.
TRAINING_STATE_WORDS = ("scheduler", "optimizer", "checkpoint")
DEFAULT_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")  # what diffusers writes


def pick_weight_file(
    folder: str | Path, where: str | None = None, *, weight_name: str | None = None, safetensors_only: bool = False
) -> Path:
    """The one weight file of a folder (a local folder or a downloaded hub repo), by diffusers' rules with one
    difference: several candidates and no ``weight_name`` is an error that lists them, never a pick of the first.

    ``weight_name`` names the file; else diffusers' default name (``pytorch_lora_weights.safetensors``, then
    ``.bin``) wins; else the single weight file, where a ``.bin`` beside a ``.safetensors`` of the same stem is
    the same weights saved twice (the safetensors file is taken) and a trainer's scheduler / optimizer /
    checkpoint files are not candidates while anything else is. ``safetensors_only`` ignores pickles. ``where``
    names the folder in messages (default: its path). Every refusal is a :class:`WeightFileError`.

    >>> pick_weight_file("/nonexistent-folder")
    Traceback (most recent call last):
    ...
    lorablend.errors.WeightFileError: /nonexistent-folder: no such folder; pass a LoRA file or a folder holding one
    """
    folder = Path(folder)
    where = where or str(folder)
    if not folder.is_dir():
        raise WeightFileError(f"{where}: no such folder; pass a LoRA file or a folder holding one")
    suffixes = SAFETENSORS_SUFFIXES if safetensors_only else WEIGHT_SUFFIXES
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in suffixes)
    if weight_name is not None:
        chosen = folder / weight_name
        if not chosen.is_file():
            raise WeightFileError(
                f"{where}: no file {weight_name!r} here (weight files: {[p.name for p in files]})"
            )
        return chosen
    for default in DEFAULT_WEIGHT_NAMES:
        if (folder / default).is_file() and (folder / default).suffix in suffixes:
            return folder / default
    twins = {p.stem for p in files if p.suffix in SAFETENSORS_SUFFIXES}
    candidates = [p for p in files if p.suffix in SAFETENSORS_SUFFIXES or p.stem not in twins]
    weights = [p for p in candidates if not any(w in p.name for w in TRAINING_STATE_WORDS)] or candidates
    if not weights:
        raise WeightFileError(
            f"{where}: holds no weight file ({', '.join(suffixes)}); pass the LoRA file itself"
        )
    if len(weights) > 1:
        names = [p.name for p in weights]
        raise WeightFileError(
            f"{where} holds several weight files {names} ({len(names)} weight files); say which one to load: "
            f"pass the file path, or weight_name='{names[0]}'"
        )
    return weights[0]


def _read_file(path: Path, mapped: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise LoraFormatError(f"{path}: not a regular file (a device, pipe or socket); pass a LoRA weight file")
    if info.st_size == 0:
        raise LoraFormatError(f"{path}: empty file (0 bytes); the download or copy did not complete")
    with open(path, "rb") as f:
        head = f.read(16)
    # safetensors first: its 8-byte little-endian header length may itself start with 0x80, a pickle's first byte
    if looks_like_safetensors(head, info.st_size):
        return _read_safetensors(path, mapped)
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return _read_pickle(path), {}
    if head[8:9] == b"{":  # a JSON header behind a length that cannot be right: let the reader say what is wrong
        return _read_safetensors(path, mapped)
    raise LoraFormatError(
        f"{path}: not a LoRA weight file: it is neither safetensors (8-byte header length + JSON header) nor a "
        f"torch pickle (first bytes {head[:8]!r}); check that the file is the weights and not an HTML error page "
        f"or a Git LFS pointer"
    )


def _read_safetensors(path: Path, mapped: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    header = read_header(path)  # every check of the format: the views below trust its offsets
    if not header.entries:
        raise LoraFormatError(f"{path}: holds no tensors; a LoRA file maps key names to tensors")
    if sys.byteorder != "little" or any(e.dtype not in DTYPES for e in header.entries):
        return _read_with_library(path), dict(header.metadata)
    # The whole data section as ONE buffer, then a view per tensor (a LoRA is hundreds of small tensors). Private
    # by default: tensors backed by a map of the file would change, or crash the process (SIGBUS), if a trainer
    # rewrote the file in place while the adapter is loaded. The private copy is made from a map of the file by
    # torch's threads: fresh memory costs page faults, which several threads take faster than one read() does.
    if not header.data_length:  # only zero-size tensors: nothing to map
        return {e.name: torch.empty(e.shape, dtype=DTYPES[e.dtype]) for e in header.entries}, dict(header.metadata)
    with open(path, "rb") as f:
        whole = torch.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=torch.uint8)
    if whole.numel() != header.file_size:  # the offsets were checked against another length
        raise LoraFormatError(f"{path}: the file changed while it was read; try again when it is complete")
    if mapped:
        data, base = whole[header.data_start:], header.data_start
    else:
        data, base = torch.empty(header.data_length, dtype=torch.uint8), 0
        data.copy_(whole[header.data_start:])
        del whole  # (unmaps the file)
    tensors = {}
    for e in header.entries:
        dtype = DTYPES[e.dtype]
        span = data[e.start:e.end]
        if (base + e.start) % dtype.itemsize:  # not aligned for a view (the writer did not pad): copy this one
            span = span.clone()
        tensors[e.name] = span.view(dtype).view(e.shape)
    return tensors, dict(header.metadata)


def _read_with_library(path: Path) -> dict[str, torch.Tensor]:
    """Tensors through the safetensors library (a big-endian host, or a dtype this torch has no name for)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # the library's own checks: report them in our words, naming the file
        raise LoraFormatError(f"{path}: unreadable safetensors file ({e}); download the file again") from None


# torch.save's legacy format opens with its magic number, pickled at protocol 2 (torch.serialization.MAGIC_NUMBER);
# its zip format opens with "PK". A file that opens with another pickle PROTO opcode was written by pickle.dump.
_TORCH_LEGACY_HEAD = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


def plain_pickle_protocol(path: Path) -> int | None:
    """The protocol of a plain ``pickle.dump`` file (not a ``torch.save`` one), or None.

    >>> import pickle, tempfile; p = Path(tempfile.mkdtemp()) / "x.bin"; _ = p.write_bytes(pickle.dumps({}, 4))
    >>> plain_pickle_protocol(p)
    4
    """
    with open(path, "rb") as f:
        head = f.read(len(_TORCH_LEGACY_HEAD))
    if len(head) < 2 or head[0] != 0x80 or not 2 <= head[1] <= 5 or head == _TORCH_LEGACY_HEAD:
        return None
    return head[1]


def _refuse_plain_pickle(path: Path) -> None:
    protocol = plain_pickle_protocol(path)
    if protocol is not None:  # (torch's safe unpickler reads neither its FRAME opcode nor its missing magic number)
        raise LoraFormatError(
            f"{path}: a plain Python pickle (pickle.dump, protocol {protocol}), not a torch.save file: it holds "
            "Python objects, and lorablend never unpickles those (loading one can run code): save the weights with "
            "safetensors (safetensors.torch.save_file) or torch.save where you trust the file") from None


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        # An open file, not the path: torch.load hands any path ending in .safetensors to the safetensors
        # library, whose errors are not ours to catch; sniffing already said these bytes are a pickle.
        with open(path, "rb") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        blocked = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), None)
        if blocked is None:
            _refuse_plain_pickle(path)
            detail = next((line.strip() for line in text.splitlines()[1:] if line.strip() and "WeightsUnpickler" not in line
                           and "Check the documentation" not in line), text.splitlines()[0] if text else "")
            raise LoraFormatError(f"{path}: corrupt or truncated torch pickle ({detail})") from None
        raise LoraFormatError(
            f"{path}: this pickle holds Python objects, not only tensors ({blocked}); safe loading "
            f"(torch.load(weights_only=True)) refuses it and lorablend never runs code from a file: convert it to "
            f"safetensors where you trust it"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        _refuse_plain_pickle(path)
        raise LoraFormatError(f"{path}: corrupt or truncated torch pickle ({type(e).__name__}: {e})") from None
    if isinstance(obj, (list, tuple)):
        refuse_tensor_list(obj, str(path))
    if isinstance(obj, Mapping) and set(obj) == {"state_dict"} and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]  # Lightning-style wrapper around the weights
    if not isinstance(obj, Mapping):
        raise LoraFormatError(
            f"{path}: the pickle holds a {type(obj).__name__}, not a dict of tensors; a LoRA file maps key names to tensors"
        )
    return _check_tensor_dict(dict(obj), str(path))


def _check_tensor_dict(tensors: dict, label: str) -> dict[str, torch.Tensor]:
    if not tensors:
        raise LoraFormatError(f"{label}: holds no tensors; a LoRA file maps key names to tensors")
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise LoraFormatError(f"{label}: key {key!r} is a {type(key).__name__}; LoRA keys are strings")
        if key.endswith(".alpha") and isinstance(value, (int, float)) and not isinstance(value, bool):
            # an alpha given as a Python number (some Flux trainers' ``…lora_A.weight.alpha`` in a dict): one 0-d
            # tensor, fp64 so the number stays exactly as written
            tensors[key] = torch.tensor(float(value), dtype=torch.float64)
        elif not isinstance(value, torch.Tensor):
            raise LoraFormatError(
                f"{label}: value of {key!r} is a {type(value).__name__}, not a tensor; a LoRA file holds only tensors"
            )
    # detach (no copy): Parameters from a live model would make every ΔW built from them carry autograd history
    return {k: (v.detach() if v.requires_grad else v) for k, v in tensors.items()}


# Float dtype -> (same-width integer dtype, bit pattern of +Inf): a value is NaN or Inf exactly when its bits
# without the sign are at least those of Inf (all exponent bits set). float8_e4m3fn has no Inf; its NaN is
# the only pattern with every exponent and mantissa bit set.
_NONFINITE_FROM = {
    torch.float16: (torch.int16, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float32: (torch.int32, 0x7F800000),
    torch.float64: (torch.int64, 0x7FF0000000000000),
    torch.float8_e5m2: (torch.int8, 0x7C),
    torch.float8_e4m3fn: (torch.int8, 0x7F),
}
_ABS_MASK = {torch.int8: 0x7F, torch.int16: 0x7FFF, torch.int32: 0x7FFFFFFF, torch.int64: 0x7FFFFFFFFFFFFFFF}


_CHUNK = 1 << 19  # elements per pass of the finite check on a CPU: the scratch stays in cache, no fresh memory


def all_finite(t: torch.Tensor) -> bool:
    """True when the floating-point tensor ``t`` holds no NaN/Inf. Exact, and one integer pass for the usual
    dtypes: the largest sign-less bit pattern is compared with Inf's (no float conversion, no overflow).

    >>> all_finite(torch.tensor([1.0, float("inf")]))
    False
    """
    if not t.numel():
        return True
    spec = _NONFINITE_FROM.get(t.dtype)
    if spec is None:
        return bool(torch.isfinite(t).all())
    as_int, inf_bits = spec
    return _max_abs_bits(t.contiguous().view(as_int).reshape(-1)) < inf_bits


def _max_abs_bits(flat: torch.Tensor) -> int:
    """The largest sign-less bit pattern in a 1-D integer view of float values."""
    mask = _ABS_MASK[flat.dtype]
    if flat.device.type != "cpu" or flat.numel() <= _CHUNK:
        return int(torch.bitwise_and(flat, mask).max())
    scratch = torch.empty(_CHUNK, dtype=flat.dtype)
    best = 0
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start:start + _CHUNK]
        best = max(best, int(torch.bitwise_and(part, mask, out=scratch[: part.numel()]).max()))
    return best


def check_finite(tensors: Mapping[str, torch.Tensor], label: str) -> None:
    """Refuse NaN / Inf anywhere: a LoRA with them would turn every image black. Names the first bad key.

    Tensors that lie back to back in one buffer with one dtype (a safetensors file read by ``read_source``)
    are checked as one run: a few passes for a whole file instead of a few per tensor.

    >>> check_finite({"a": torch.tensor([1.0, float("nan")])}, "x.safetensors")
    Traceback (most recent call last):
    ...
    lorablend.errors.LoraFormatError: x.safetensors: tensor 'a' holds NaN or Inf values (1 of 2); the file is damaged or was saved from a diverged training run
    """
    checked = [t for t in tensors.values() if t.is_floating_point() or t.is_complex()]
    if all(_run_finite(run) for run in _adjacent_runs(checked)):
        return
    for key, t in tensors.items():  # something is wrong: find the first bad key, in the caller's order
        if not (t.is_floating_point() or t.is_complex()):
            continue
        bad = _count_nonfinite(t)
        if bad:
            raise LoraFormatError(
                f"{label}: tensor {key!r} holds NaN or Inf values ({bad} of {t.numel()}); the file is damaged "
                f"or was saved from a diverged training run"
            )


def _adjacent_runs(ts: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``ts`` in runs of contiguous tensors of one dtype that follow each other in memory (others alone)."""
    runs: list[list[torch.Tensor]] = []
    end = None
    for t in sorted(ts, key=lambda t: (t.device.type, t.device.index or 0, t.data_ptr())):
        mergeable = t.is_contiguous() and t.dtype in _NONFINITE_FROM
        if mergeable and end is not None and runs[-1][-1].dtype == t.dtype and t.data_ptr() == end and \
                t.untyped_storage().data_ptr() == runs[-1][-1].untyped_storage().data_ptr():
            runs[-1].append(t)
        else:
            runs.append([t])
        end = t.data_ptr() + t.numel() * t.element_size() if mergeable else None
    return runs


def _run_finite(run: list[torch.Tensor]) -> bool:
    whole = run[0]
    if len(run) > 1:  # the run as one tensor over the same memory
        whole = torch.empty(0, dtype=whole.dtype, device=whole.device).set_(
            whole.untyped_storage(), whole.storage_offset(), (sum(t.numel() for t in run),), (1,))
    return whole.is_floating_point() and all_finite(whole)


def _count_nonfinite(t: torch.Tensor) -> int:
    spec = _NONFINITE_FROM.get(t.dtype)
    if spec is None:
        return int((~torch.isfinite(t)).sum())
    as_int, inf_bits = spec
    return int((torch.bitwise_and(t.contiguous().view(as_int), _ABS_MASK[as_int]) >= inf_bits).sum())
