"""Baking LoRAs into a GGUF Flux transformer (offline/quantized_files.py): a tiny Flux transformer in BFL names written
as GGUF (Q8_0 / Q4_0 / Q5_1 weights, F32 the rest) with gguf-py's writer; the bake keeps names, order, types and
metadata, copies untouched tensors byte for byte, and each fused layer's bytes equal what fusing that layer live
(``LayerState.write_fused`` on a diffusers GGUF linear holding the same rows) writes; gguf-py's own reader and numpy
dequantizer read it back as the fused weights. Hostile GGUF files are refused before anything is written."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from hostile_corpus import gguf_hostile_files  # noqa: E402
from test_bake_flux import bfl_state_dict  # noqa: E402

from lorablend.errors import LoraFormatError  # noqa: E402
from lorablend.fixtures.tiny_transformers import tiny_flux_pipeline  # noqa: E402
from lorablend.fixtures.tiny_unets import random_adapter  # noqa: E402
from lorablend.offline.bake import bake  # noqa: E402
from lorablend.offline.checkpoint import checkpoint_layout  # noqa: E402
from lorablend.offline.quantized_files import read_gguf  # noqa: E402
from lorablend.quant.gguf import dequantize_gguf, quantize_gguf  # noqa: E402
from lorablend.runtime.fusion import fused_weight  # noqa: E402


def write_gguf(path, tensors: dict[str, torch.Tensor], qtype) -> None:
    """2-D weights whose rows are whole blocks in ``qtype``, everything else F32 (as city96's files keep norms)."""
    writer = gguf.GGUFWriter(path, "flux")
    writer.add_string("general.name", "tiny flux")
    writer.add_uint32("tiny.answer", 42)
    for name, t in tensors.items():
        a = t.float().numpy()
        if a.ndim == 2 and a.shape[1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
            writer.add_tensor(name, quantize_gguf(a, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def flux():
    pipe = tiny_flux_pipeline()
    adapter = random_adapter(pipe, "style", rank=4, seed=3, components=["transformer"], strength=0.3)
    return pipe, adapter


def live_fused_rows(raw: np.ndarray, qtype, spans, delta, coef: float) -> np.ndarray:
    """What fuse_lora writes into a diffusers GGUF linear holding these rows of the file (the live code path)."""
    import contextvars

    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    from lorablend.runtime.layer_state import LayerTable

    rows = np.concatenate([raw[a:b] for a, b in spans]) if spans else raw
    layer = GGUFLinear(1, 1, bias=False, compute_dtype=torch.float32, device="meta")
    layer.weight = GGUFParameter(torch.from_numpy(rows.copy()), quant_type=qtype)
    state = LayerTable(contextvars.ContextVar("s", default=1.0)).add("transformer.x", "transformer", layer)
    state.write_fused([(coef, delta)])
    return layer.weight.detach().numpy()


@pytest.mark.parametrize("qname", ["Q8_0", "Q4_0", "Q5_1"])
def test_gguf_bake_equals_live_fuse_and_reads_back(tmp_path, flux, qname):
    pipe, adapter = flux
    qtype = gguf.GGMLQuantizationType[qname]
    src, out = tmp_path / f"flux-{qname}.gguf", tmp_path / "baked.gguf"
    write_gguf(src, bfl_state_dict(pipe.transformer), qtype)
    report = bake(src, [(adapter, 0.7)], out, lora_scale=0.9)
    assert report.kind == "gguf" and report.touched == len(adapter.deltas) and not report.skipped

    before, after = gguf.GGUFReader(src), gguf.GGUFReader(out)
    assert [t.name for t in after.tensors] == [t.name for t in before.tensors]
    assert [int(t.tensor_type) for t in after.tensors] == [int(t.tensor_type) for t in before.tensors]
    assert after.fields["general.name"].contents() == "tiny flux" and after.fields["tiny.answer"].contents() == 42
    layout = checkpoint_layout(src, read_gguf(src).header)
    by_name = {t.name: t for t in before.tensors}
    touched = {}
    for key, delta in adapter.deltas.items():
        p = layout.placement(key)
        touched.setdefault(p.weight_key, []).append((p, delta))
    for t in after.tensors:
        old = np.asarray(by_name[t.name].data)
        new = np.asarray(t.data)
        if t.name not in touched:
            assert new.tobytes() == old.tobytes(), t.name  # untouched: byte for byte
            continue
        own = gguf.GGMLQuantizationType(int(t.tensor_type))  # (a weight too narrow for blocks stays F32)
        w0 = torch.from_numpy(dequantize_gguf(old, own))
        back = dequantize_gguf(new, own)  # gguf-py's own numpy decoding of the baked bytes
        for p, delta in touched[t.name]:
            spans = p.row_spans
            rows = np.concatenate([np.arange(a, b) for a, b in spans]) if spans else np.arange(w0.shape[0])
            want = fused_weight(w0[rows], [(0.9 * 0.7, delta)])
            bound = (1 / 8 + 2 ** -10) * float(want.abs().max())  # the loosest of the three (Q4_0)
            assert float(np.abs(back[rows] - want.numpy()).max()) <= bound, t.name
            if own == qtype:  # the live fuse of a GGUF linear holding these rows writes the same bytes
                assert np.array_equal(new[rows], live_fused_rows(old, qtype, spans, delta, 0.9 * 0.7)), t.name
            else:  # an F32 tensor: a float layer, fused by the one formula
                assert np.array_equal(new[rows], want.numpy()), t.name


def test_hostile_gguf_refused_before_writing(tmp_path, flux):
    pipe, adapter = flux
    src = tmp_path / "good.gguf"
    write_gguf(src, bfl_state_dict(pipe.transformer), gguf.GGMLQuantizationType.Q8_0)
    for name, path in gguf_hostile_files(src, tmp_path).items():
        out = tmp_path / f"out-{name}.gguf"
        with pytest.raises(LoraFormatError, match=path.name):
            bake(path, [(adapter, 1.0)], out)
        assert not out.exists() and not list(tmp_path.glob("*.tmp*")), name


def test_gguf_fuzz_smoke(tmp_path):
    """A few seconds of `make fuzz`'s GGUF part: mutated GGUF bytes give a checked file or LoraFormatError, in time
    (gguf-py alone loops over a lying array count for minutes: the pre-scan bounds every count by the file size)."""
    from fuzz_readers import fuzz_gguf

    counts = fuzz_gguf(3.0, tmp_path / "crashes", seed=7)
    assert counts["inputs"] > 10 and counts["crashes"] == 0, sorted((tmp_path / "crashes").glob("*.txt"))


@pytest.mark.parametrize("scaled", [False, True])
def test_fp8_safetensors_bake_equals_live_fuse(tmp_path, flux, scaled):
    """A Flux file in BFL names with fp8 weights (plain, or ComfyUI's scaled fp8: ``<layer>.scale_weight``): the
    bake rounds each fused layer stochastically with the live fuse's seed and keeps the scale, so its bytes equal
    fusing that layer live (``LayerState.write_fused`` on an fp8 layer holding the same rows and scale)."""
    import contextvars

    from safetensors.torch import load_file, save_file

    from lorablend.quant.fp8 import ScaledFp8Linear
    from lorablend.runtime.layer_state import LayerTable

    pipe, adapter = flux
    tensors = {}
    for name, t in bfl_state_dict(pipe.transformer).items():
        if t.dim() == 2:
            scale = t.abs().max() / 448 if scaled else None
            tensors[name] = (t / scale if scaled else t).to(torch.float8_e4m3fn)
            if scaled:
                tensors[name[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            tensors[name] = t
    src, out = tmp_path / "flux-fp8.safetensors", tmp_path / "baked.safetensors"
    save_file(tensors, str(src))
    report = bake(src, [(adapter, 0.7)], out, lora_scale=0.9)
    assert report.touched == len(adapter.deltas)
    baked = load_file(str(out))
    layout = checkpoint_layout(src)
    table = LayerTable(contextvars.ContextVar("s", default=1.0))
    for key, delta in adapter.deltas.items():
        p = layout.placement(key)
        stored = tensors[p.weight_key]
        if stored.dtype != torch.float8_e4m3fn:
            continue
        rows = torch.cat([torch.arange(a, b) for a, b in (p.row_spans or ((0, stored.shape[0]),))])
        layer = ScaledFp8Linear(stored.shape[1], len(rows), bias=False, compute_dtype=torch.float32)
        layer.weight = torch.nn.Parameter(stored[rows].clone(), requires_grad=False)
        if scaled:
            layer.scale_weight = tensors[p.weight_key[: -len("weight")] + "scale_weight"].clone()
        else:
            del layer._buffers["scale_weight"]
        table.add(key, "transformer", layer).write_fused([(0.9 * 0.7, delta)])
        if scaled and p.row_spans is not None:  # one scale over q/k/v rows: kept (a live layer would grow its own)
            scale = tensors[p.weight_key[: -len("weight")] + "scale_weight"]
            want = fused_weight(stored[rows].float() * scale, [(0.9 * 0.7, delta)]).clamp(-448 * scale, 448 * scale)
            got = baked[p.weight_key][rows].float() * scale
            assert bool(((got - want).abs() <= want.abs() * 2 ** -3 + 2 ** -9 * scale).all()), key
            continue
        assert torch.equal(baked[p.weight_key][rows].view(torch.uint8), layer.weight.view(torch.uint8)), key
        if scaled:  # the scale written is the one the live layer grew to
            assert torch.equal(baked[p.weight_key[: -len("weight")] + "scale_weight"], layer.scale_weight), key
    touched = {layout.placement(k).weight_key for k in adapter.deltas}
    for name, t in tensors.items():  # untouched tensors as they were
        if name not in touched and name.replace("scale_weight", "weight") not in touched:
            assert torch.equal(baked[name].view(torch.uint8), t.view(torch.uint8)), name


def test_cli_bake_gguf(tmp_path, flux):
    """`lorablend bake --model flux-Q8_0.gguf --lora A:0.7 -o out.gguf` (the CLI's bake takes a GGUF model)."""
    import lorablend
    from lorablend.cli import main

    pipe, adapter = flux
    src, lora, out = tmp_path / "flux-Q8_0.gguf", tmp_path / "a.safetensors", tmp_path / "out.gguf"
    write_gguf(src, bfl_state_dict(pipe.transformer), gguf.GGMLQuantizationType.Q8_0)
    lorablend.save_adapter(adapter, str(lora), target=pipe)
    assert main(["bake", "--model", str(src), "--lora", f"{lora}:0.7", "-o", str(out)]) == 0
    assert [t.name for t in gguf.GGUFReader(out).tensors] == [t.name for t in gguf.GGUFReader(src).tensors]
