"""Helpers of the quantized-base tests (tests/quant/): comparing stored states bit for bit, and what bitsandbytes'
own 4-bit quantizer makes of a weight."""

from __future__ import annotations

import torch


def same_state(a: dict, b: dict) -> bool:
    """Bytes and quant state equal: tensors with torch.equal (dtype included), other values with ==."""
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype
                    and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def bnb4_bytes(weight: torch.Tensor, snap) -> torch.Tensor:
    """What bitsandbytes' quantize_4bit makes of ``weight`` with the settings of the layer ``snap`` was taken
    from. (A bound on the error is no test for 4-bit: double-quantized statistics of a layer of a few blocks, as on
    the tiny models, can be off by tens of percent of the layer's largest weight — bitsandbytes' 8-bit absmax code,
    not the fuse.)"""
    from bitsandbytes.functional import quantize_4bit

    state = snap.extra["quant_state"]
    nested = getattr(state, "original_nested", state.nested)
    dtype = getattr(state, "original_dtype", state.dtype)
    data, _ = quantize_4bit(weight.to(dtype), blocksize=state.blocksize, compress_statistics=nested,
                            quant_type=state.quant_type, quant_storage=snap.weight.quant_storage)
    return data


def write_gguf_file(path, state_dict: dict, qname: str = "Q8_0") -> None:
    """A single-file GGUF denoiser as city96's files hold one: 2-D weights whose rows are whole blocks in ``qname``
    (gguf-py's quantizer), everything else F32; the names as given (diffusers' for the tiny models)."""
    import gguf

    from lorablend.quant.gguf import quantize_gguf

    qtype = gguf.GGMLQuantizationType[qname]
    writer = gguf.GGUFWriter(str(path), "flux")
    for name, t in state_dict.items():
        a = t.float().numpy()
        if a.ndim == 2 and a.shape[1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
            writer.add_tensor(name, quantize_gguf(a, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
