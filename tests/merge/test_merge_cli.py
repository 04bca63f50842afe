"""`lorablend merge`: a thin shell over lorablend.merge; one-line errors, non-zero exit, nothing partial written."""

from __future__ import annotations

import json

import pytest
import torch

from lorablend.adapter import Adapter, LowRankDelta
from lorablend.cli import main
from lorablend.io import load_adapter, save_adapter

from realdata import LORAS, requires_realdata

KEYS = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (320, 320),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (320, 768),
    "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_v": (1280, 1280),
}


def write_lora(path, seed, rank, alpha):
    g = torch.Generator().manual_seed(seed)
    deltas = {
        k: LowRankDelta(down=torch.randn(rank, i, generator=g) * 0.01, up=torch.randn(o, rank, generator=g) * 0.01, alpha=alpha)
        for k, (o, i) in KEYS.items()
    }
    save_adapter(Adapter(path.stem, "sd1", deltas), path, format="kohya")
    return path


@pytest.fixture
def files(tmp_path):
    return write_lora(tmp_path / "a.safetensors", 1, 4, 2.0), write_lora(tmp_path / "b.safetensors", 2, 8, 8.0)


def flat(delta) -> torch.Tensor:
    d = delta.delta_weight().double()
    return d.reshape(d.shape[0], -1)


def test_cat_from_the_command_line_is_the_exact_sum(files, tmp_path, capsys):
    a, b = files
    out, report = tmp_path / "m.safetensors", tmp_path / "m.json"
    rc = main(["merge", f"{a}:0.7", f"{b}:-0.8", "-o", str(out), "--method", "cat", "--report", str(report), "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["layers"] == 3 and printed["rank"] == "12" and printed["max_rel_error"] == 0.0
    merged, la, lb = load_adapter(out), load_adapter(a), load_adapter(b)
    for key in KEYS:
        exact = 0.7 * flat(la.deltas[key]) - 0.8 * flat(lb.deltas[key])
        assert float((flat(merged.deltas[key]) - exact).norm() / exact.norm()) < 1e-6
    assert merged.metadata["modelspec.merged_from"] == "a, b"
    data = json.loads(report.read_text())
    assert data["method"] == "cat" and len(data["layers"]) == 3 and data["inputs"][1]["weight"] == -0.8


def test_svd_from_the_command_line(files, tmp_path, capsys):
    a, b = files
    out = tmp_path / "s.safetensors"
    assert main(["merge", str(a), f"{b}:0.5", "-o", str(out), "--rank", "6", "--format", "diffusers"]) == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "rank 6" in text
    assert {d.rank for d in load_adapter(out).deltas.values()} == {6}


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["{a}", "{tmp}/missing.safetensors"], "no such file"),
        (["{a}:abc", "{b}"], "bad weight 'abc'"),
        (["{a}", "{b}", "--method", "average"], "invalid choice: 'average'"),
        (["{a}", "{b}", "--rank", "0"], "--rank 0"),
        (["{a}", "{b}", "--method", "ties", "--density", "2"], "density=2.0"),
        (["{a}", "{b}", "--energy", "1.5"], "energy=1.5"),
    ],
)
def test_bad_input_is_one_line_nonzero_and_writes_nothing(files, tmp_path, capsys, extra, needle):
    a, b = files
    out = tmp_path / "out.safetensors"
    argv = ["merge", *[e.format(a=a, b=b, tmp=tmp_path) for e in extra], "-o", str(out)]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorablend: error:") and "\n" not in err and needle in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temp file


def test_output_over_an_input_is_refused(files, capsys):
    a, b = files
    data = a.read_bytes()
    assert main(["merge", str(a), str(b), "-o", str(a), "--overwrite"]) == 2
    assert "OUTPUT is an INPUT" in capsys.readouterr().err
    assert a.read_bytes() == data


def test_existing_output_needs_overwrite(files, tmp_path, capsys):
    a, b = files
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"keep me")
    assert main(["merge", str(a), str(b), "-o", str(out)]) == 2
    assert out.read_bytes() == b"keep me"
    assert main(["merge", str(a), str(b), "-o", str(out), "--overwrite"]) == 0


@requires_realdata
def test_real_files_from_the_command_line(tmp_path, capsys):
    sd1 = LORAS / "sd1x"
    timo = [sd1 / "sd15_diffusers_timo_step2100.safetensors", sd1 / "sd15_diffusers_timo_final.safetensors"]
    out = tmp_path / "timo.safetensors"
    assert main(["merge", f"{timo[0]}:0.7", f"{timo[1]}:0.8", "-o", str(out), "--rank", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == 128

    out2 = tmp_path / "lokr_lora.safetensors"
    lokr = sd1 / "sd1x_lycoris_lokr_smart_falcon_r4.safetensors"
    assert main(["merge", str(lokr), f"{timo[0]}:0.5", "-o", str(out2), "--rank", "8", "--format", "kohya", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == 350
    written = load_adapter(out2)
    assert written.kinds() == {"lora": 350}
    # LoKr stores some convs flattened; the merged file has them as proper 4-D conv LoRAs.
    assert any(d.down.dim() == 4 and d.down.shape[2:] == (3, 3) for d in written.deltas.values())

    sd2 = LORAS / "sd2x" / "sd21_diffusers_justin.safetensors"
    out3 = tmp_path / "never.safetensors"
    assert main(["merge", str(timo[0]), str(sd2), "-o", str(out3)]) == 2
    err = capsys.readouterr().err
    assert "sd1" in err and "sd2" in err and not out3.exists()


@pytest.mark.parametrize("method", ["svd", "cat"])
def test_merged_file_loads_in_diffusers_with_provenance(tmp_path, make_pipe, make_adapter, method):
    """issue 4 item 3: a merged file carries provenance metadata and diffusers' own loader applies it exactly."""
    from safetensors import safe_open
    from conftest import params_of

    from lorablend import merge
    from lorablend.naming import module_index

    pipe = make_pipe("sd1")
    a = make_adapter("sd1", "a", rank=4, alpha=2.0, targets="attn", seed=11)
    b = make_adapter("sd1", "b", rank=4, alpha=4.0, targets="attn", seed=12)
    merged = merge([a, b], [0.7, -0.3], method=method, **({"rank": 4} if method == "svd" else {}))
    path = save_adapter(merged, tmp_path / "m.safetensors", "diffusers", target=pipe)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.merged_from"] == "a, b" and meta["lorablend.merge.method"] == method
    assert json.loads(meta["lorablend.merge.weights"]) == [0.7, -0.3]
    assert load_adapter(path, target=pipe).metadata["modelspec.merged_from"] == "a, b"

    w0 = params_of(pipe)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    now = params_of(pipe)
    idx = module_index(pipe)
    for key, d in merged.deltas.items():
        info = idx.modules[key]
        name = f"{info.component}.{info.live_path}.weight"
        torch.testing.assert_close(now[name], w0[name] + d.delta_weight(info.weight_shape), atol=1e-6, rtol=0)
