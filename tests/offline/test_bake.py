"""``bake`` / ``lorablend fuse``: a baked single-file checkpoint holds exactly the pipeline's ``fuse_lora`` weights.

The single-file checkpoints here are written by a converter of this test's own (the LDM/SGM rules of
``shared/research/ecosystem_tools.md`` §2.2–2.5, as plain string rules: no ``lorablend.naming`` and no
``lorablend.offline.checkpoint``), cross-checked against ai-toolkit's independent key maps where those are present.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorablend
from lorablend.adapter import Adapter, DoRADelta, FullDelta, LoHaDelta, LoKrDelta, LowRankDelta
from lorablend.offline.bake import bake
from lorablend.errors import LoraCompatibilityError, LoraFormatError
from lorablend.io import save_adapter
from lorablend.io.safetensors import read_header
from lorablend.outputs import OutputExistsError

from ldm_convert import to_ldm


# ------------------------------------------------------------------------------ the test's own LDM converter

def _mixed_adapter(pipe, family: str) -> Adapter:
    """Every non-LoRA kind on a few layers, including a DoRA on a fused q/k/v row block and a bias diff."""
    g = torch.Generator().manual_seed(7)
    te = "text_encoder_2" if family == "sdxl" else "text_encoder"
    attn = "unet.down_blocks.1.attentions.0.transformer_blocks.0"
    w_k = dict(pipe.unet.named_parameters())["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight"]
    out_f, in_f = w_k.shape
    conv_in = pipe.unet.conv_in.weight
    deltas = {
        "unet.conv_in": FullDelta(torch.randn(conv_in.shape, generator=g) * 0.1, diff_b=torch.randn(conv_in.shape[0], generator=g)),
        f"{attn}.attn1.to_k": LoHaDelta(torch.randn(out_f, 2, generator=g), torch.randn(2, in_f, generator=g),
                                        torch.randn(out_f, 2, generator=g), torch.randn(2, in_f, generator=g), alpha=1.0),
        f"{attn}.attn1.to_v": LoKrDelta(w1=torch.randn(2, 2, generator=g), w2=torch.randn(out_f // 2, in_f // 2, generator=g)),
        f"{te}.text_model.encoder.layers.1.self_attn.k_proj": DoRADelta(
            LowRankDelta(torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g) * 0.1, alpha=1.0),
            magnitude=torch.rand(32, generator=g) + 0.5),
    }
    return Adapter("mixed", family, deltas)


def _write_loras(tmp_path, pipe, family: str):
    from lorablend.fixtures.tiny_unets import random_adapter

    a = random_adapter(pipe, "style", rank=4, seed=1)  # every Linear/Conv2d of the UNet and text encoders
    b = random_adapter(pipe, "detail", rank=2, alpha=1.0, seed=2, targets="attn")
    pa = save_adapter(a, tmp_path / "style.safetensors", format="kohya", target=pipe)
    pb = save_adapter(b, tmp_path / "detail.safetensors", format="diffusers", target=pipe)
    return pa, pb, _mixed_adapter(pipe, family)


def _raw(path, header, name) -> bytes:
    e = header.by_name[name]
    with open(path, "rb") as f:
        f.seek(header.data_start + e.start)
        return f.read(e.nbytes)


# ------------------------------------------------------------------------------ the acceptance test


@pytest.mark.parametrize("family,dtype", [("sd1", torch.float32), ("sdxl", torch.float16)])
def test_bake_single_file_equals_pipeline_fuse(tmp_path, make_pipe, family, dtype):
    pipe = make_pipe(family, dtype)
    ckpt = tmp_path / "model.safetensors"
    save_file(to_ldm(pipe, family), str(ckpt), metadata={"modelspec.title": "tiny"})
    pa, pb, mixed = _write_loras(tmp_path, pipe, family)
    weights, scale = [0.7, 0.8, -0.5], 0.9

    report = bake(ckpt, [(pa, 0.7), (pb, 0.8), (mixed, -0.5)], tmp_path / "baked.safetensors", lora_scale=scale)

    live = lorablend.DiffusionPipeline(pipe)
    for src, name in ((str(pa), "style"), (str(pb), "detail"), (mixed, "mixed")):
        live.load_lora_weights(src, adapter_name=name)
    live.set_adapters(["style", "detail", "mixed"], adapter_weights=weights)
    live.fuse_lora(lora_scale=scale)
    expected = to_ldm(pipe, family)

    out = tmp_path / "baked.safetensors"
    got = load_file(str(out))
    h_in, h_out = read_header(ckpt), read_header(out)
    assert [(e.name, e.dtype, e.shape) for e in h_in.entries] == [(e.name, e.dtype, e.shape) for e in h_out.entries]
    assert h_out.metadata["modelspec.title"] == "tiny" and "lorablend.baked_loras" in h_out.metadata
    before = load_file(str(ckpt))
    changed = [k for k in got if not torch.equal(got[k], before[k])]
    mismatched = [k for k in got if not torch.equal(got[k], expected[k])]
    assert not mismatched, f"{len(mismatched)} tensors differ from the pipeline's fused weights, e.g. {mismatched[:3]}"
    assert report.touched == len(lorablend.naming.module_index(pipe).modules)  # "style" touches every layer
    assert len(changed) > 50
    assert "model.diffusion_model.input_blocks.0.0.bias" in changed  # the full diff's bias difference
    if family == "sdxl":
        assert "conditioner.embedders.1.model.text_projection" in changed
        assert "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight" in changed
    for name in got:  # untouched tensors are copied byte for byte
        if name not in changed:
            assert _raw(ckpt, h_in, name) == _raw(out, h_out, name), name
    assert report.family == family and report.kind == "single_file" and not report.skipped


def test_bake_pipeline_folder_equals_fuse_and_save(tmp_path, make_pipe):
    pipe = make_pipe("sd1")
    pipe.save_pretrained(tmp_path / "base")
    pa, pb, _ = _write_loras(tmp_path, pipe, "sd1")
    report = bake(tmp_path / "base", [(pa, 0.7), (pb, 0.8)], tmp_path / "baked", lora_scale=0.5)
    live = lorablend.DiffusionPipeline(pipe)
    live.load_lora_weights(str(pa), adapter_name="a")
    live.load_lora_weights(str(pb), adapter_name="b")
    live.set_adapters(["a", "b"], adapter_weights=[0.7, 0.8])
    live.fuse_lora(lora_scale=0.5)
    baked = load_file(str(tmp_path / "baked" / "unet" / "diffusion_pytorch_model.safetensors"))
    for name, p in pipe.unet.state_dict().items():
        assert torch.equal(baked[name], p), name
    assert report.kind == "pipeline" and report.touched > 0
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


# ------------------------------------------------------------------------------ layout and names


# ------------------------------------------------------------------------------ errors: nothing written


def _tiny_ckpt(tmp_path, make_pipe, family="sd1"):
    pipe = make_pipe(family)
    ckpt = tmp_path / "m.safetensors"
    save_file(to_ldm(pipe, family), str(ckpt))
    return pipe, ckpt


def test_bake_refuses_before_writing(tmp_path, make_pipe):
    pipe, ckpt = _tiny_ckpt(tmp_path, make_pipe)
    from lorablend.fixtures.tiny_unets import random_adapter

    lora = save_adapter(random_adapter(pipe, "s", seed=3, targets="attn"), tmp_path / "s.safetensors", format="kohya", target=pipe)
    out = tmp_path / "out.safetensors"
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        bake(ckpt, [(tmp_path / "missing.safetensors", 1.0)], out)
    with pytest.raises(ValueError, match="input"):
        bake(ckpt, [(lora, 1.0)], ckpt, overwrite=True)
    with pytest.raises(ValueError, match="input"):
        bake(ckpt, [(lora, 1.0)], lora, overwrite=True)
    with pytest.raises(ValueError, match="finite"):
        bake(ckpt, [(lora, float("nan"))], out)
    with pytest.raises(LoraFormatError, match="not a single-file"):
        bake(lora, [(lora, 1.0)], out)
    out.write_bytes(b"keep")
    with pytest.raises(OutputExistsError):
        bake(ckpt, [(lora, 1.0)], out)
    assert out.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "out.safetensors", "s.safetensors"]


def test_layer_without_tensor_fails_or_is_reported(tmp_path, make_pipe):
    pipe, ckpt = _tiny_ckpt(tmp_path, make_pipe)
    sd = load_file(str(ckpt))
    gone = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    del sd[gone]
    pruned = tmp_path / "pruned.safetensors"
    save_file(sd, str(pruned))
    from lorablend.fixtures.tiny_unets import random_adapter

    lora = save_adapter(random_adapter(pipe, "s", seed=3, targets="attn"), tmp_path / "s.safetensors", format="kohya", target=pipe)
    out = tmp_path / "out.safetensors"
    with pytest.raises(LoraCompatibilityError, match="to_q"):
        bake(pruned, [(lora, 1.0)], out)
    assert not out.exists()
    report = bake(pruned, [(lora, 1.0)], out, strict=False)
    assert [s["key"] for s in report.skipped] == ["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert out.exists()


def test_sdxl_lora_on_sd1_checkpoint_is_refused(tmp_path, make_pipe):
    _, ckpt = _tiny_ckpt(tmp_path, make_pipe, "sd1")
    from lorablend.fixtures.tiny_unets import random_adapter

    xl = random_adapter(make_pipe("sdxl"), "xl", seed=4, targets="attn")
    with pytest.raises(LoraCompatibilityError):
        bake(ckpt, [(xl, 1.0)], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_dtype_cast_and_non_finite_refusal(tmp_path, make_pipe):
    pipe, ckpt = _tiny_ckpt(tmp_path, make_pipe)
    from lorablend.fixtures.tiny_unets import random_adapter

    a = random_adapter(pipe, "s", seed=5, targets="attn")
    out = tmp_path / "half.safetensors"
    bake(ckpt, [(a, 1.0)], out, dtype="fp16")
    assert {e.dtype for e in read_header(out).entries} == {"F16"}
    huge = Adapter("huge", "sd1", {k: LowRankDelta(d.down, d.up * 1e6) for k, d in a.deltas.items()})
    with pytest.raises(ValueError, match="NaN or Inf"):
        bake(ckpt, [(huge, 1e6)], tmp_path / "inf.safetensors", dtype="fp16")
    assert not (tmp_path / "inf.safetensors").exists()
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


# ------------------------------------------------------------------------------ a checkpoint whose header lies


def _pairs_text(pairs) -> bytes:
    """A header from (name, value) pairs in order, so a name can appear twice (a dict cannot hold that)."""
    return ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}").encode()


def _lie(ckpt, how: str) -> bytes:
    """The checkpoint's bytes with its header (or its data) made to lie in one way."""
    blob = ckpt.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header, data = json.loads(blob[8:8 + n]), blob[8 + n:]
    pairs = list(header.items())
    tensors = [i for i, (k, _) in enumerate(pairs) if k != "__metadata__"]
    by_start = sorted(tensors, key=lambda i: pairs[i][1]["data_offsets"][0])
    second, last = pairs[by_start[1]][1], pairs[by_start[-1]][1]
    if how == "overlap":  # the second tensor starts 4 bytes early: two names share bytes (the sizes still agree)
        second["data_offsets"] = [o - 4 for o in second["data_offsets"]]
    elif how == "shape_bytes_mismatch":
        second["shape"] = [second["shape"][0] + 1, *second["shape"][1:]]
    elif how == "truncated_data":
        data = data[:-100]
    elif how == "duplicate_name":
        name, info = pairs[by_start[-1]]
        pairs.append((name, dict(info)))  # the same name again: json would keep one, silently
    elif how == "gap":  # 8 unaccounted bytes before the last tensor
        start, end = last["data_offsets"]
        last["data_offsets"] = [start + 8, end + 8]
        data = data[:start] + bytes(8) + data[start:]
    elif how == "trailing_bytes":
        data += b"hidden payload"
    elif how == "header_length_past_the_end":
        text = _pairs_text(pairs)
        return (len(text) + len(data) + 1).to_bytes(8, "little") + text + data
    text = _pairs_text(pairs)
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


_LIES = {
    "overlap": "overlap",
    "shape_bytes_mismatch": "but its dtype and shape need",
    "truncated_data": "truncated",
    "duplicate_name": "appears twice",
    "gap": "gap of 8 bytes",
    "trailing_bytes": "belong to none",
    "header_length_past_the_end": "truncated",
}


@pytest.fixture(scope="module")
def lying_setup(tmp_path_factory, tiny_pipes):
    root = tmp_path_factory.mktemp("lies")
    pipe = tiny_pipes["sd1"]  # read only
    ckpt = root / "m.safetensors"
    save_file(to_ldm(pipe, "sd1"), str(ckpt))
    from lorablend.fixtures.tiny_unets import random_adapter

    lora = save_adapter(random_adapter(pipe, "s", seed=3, targets="attn"), root / "s.safetensors", format="kohya", target=pipe)
    return ckpt, lora


@pytest.mark.parametrize("how", sorted(_LIES))
def test_bake_refuses_a_lying_checkpoint_before_writing_a_byte(tmp_path, lying_setup, how, capsys):
    """Bake streams the output by the header's offsets: every lie is refused by the one header reader first —
    by the library call and by ``lorablend fuse --model`` — and nothing (no output, no temp file) appears."""
    from lorablend.cli import main

    good, lora = lying_setup
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(_lie(good, how))
    before = ckpt.read_bytes()
    listing = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "baked.safetensors"
    with pytest.raises(LoraFormatError) as e:
        bake(ckpt, [(lora, 0.8)], out)
    assert str(ckpt) in str(e.value) and _LIES[how] in str(e.value), str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    code = main(["fuse", "--model", str(ckpt), "--lora", str(lora), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lorablend: error:") and err.count("\n") == 1 and _LIES[how] in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    assert ckpt.read_bytes() == before


def test_a_checkpoint_of_empty_tensors_is_refused_by_name(tmp_path, lying_setup):
    good, lora = lying_setup
    empty = {k: torch.zeros(0, *v.shape[1:]) for k, v in load_file(str(good)).items()}
    ckpt = tmp_path / "empty.safetensors"
    save_file(empty, str(ckpt))
    with pytest.raises(LoraFormatError, match="dimension of size 0"):
        bake(ckpt, [(lora, 1.0)], tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.safetensors"]
