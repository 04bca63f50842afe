"""``inspect --plot``: norms and cosine similarities from the factors equal the dense maths; the PNGs are drawn."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

import lorablend.images.plot
from lorablend.adapter import Adapter, FullDelta, LoHaDelta, LowRankDelta
from lorablend.cli import main
from lorablend.io import save_adapter
from lorablend.naming import standard_index
from lorablend.images.plot import delta_inner, delta_norm, norm_heatmap, render_heatmap, similarity_heatmap


def _dense(d):
    w = d.delta_weight()
    return w.reshape(w.shape[0], -1)


def test_inner_products_from_factors_equal_dense():
    g = torch.Generator().manual_seed(0)
    lin = [LowRankDelta(torch.randn(r, 40, generator=g), torch.randn(30, r, generator=g), alpha=a) for r, a in ((4, 2.0), (7, None))]
    conv = [LowRankDelta(torch.randn(3, 8, 3, 3, generator=g), torch.randn(6, 3, 1, 1, generator=g), alpha=1.0) for _ in range(2)]
    loha = LoHaDelta(torch.randn(30, 2, generator=g), torch.randn(2, 40, generator=g), torch.randn(30, 2, generator=g),
                     torch.randn(2, 40, generator=g))
    full = FullDelta(torch.randn(30, 40, generator=g))
    for x, y in [(lin[0], lin[1]), (conv[0], conv[1]), (lin[0], loha), (full, lin[1]), (loha, full)]:
        want = float((_dense(x).double() * _dense(y).double()).sum())
        assert delta_inner(x, y) == pytest.approx(want, rel=1e-4)
        assert delta_norm(x) == pytest.approx(float(_dense(x).double().norm()), rel=1e-5)


def _adapter(name: str, seed: int, sign: float = 1.0) -> Adapter:
    """A small LoRA on standard SD1.5 layers (so files load without a model)."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for key, info in standard_index("sd1").modules.items():
        if key.endswith((".attn1.to_q", ".attn2.to_v", ".proj_in", "self_attn.q_proj")) or key == "unet.conv_in":
            out_f, *rest = info.weight_shape
            down = torch.randn(2, *rest, generator=g) * 0.1
            up = torch.randn((out_f, 2, 1, 1) if info.kind == "conv" else (out_f, 2), generator=g) * 0.1 * sign
            deltas[key] = LowRankDelta(down, up, alpha=1.0)
    return Adapter(name, "sd1", deltas)


def test_norm_heatmap_cells_are_block_norms():
    a = _adapter("a", 1)
    heat = norm_heatmap(a)
    assert heat.rows[0] == "BASE te" and heat.rows[-1] == "OUT11" and "M00" in heat.rows
    assert heat.cols[0] == "te attn" and "attn1" in heat.cols and "conv io" in heat.cols
    keys = [k for k in a.deltas if heat.layers[k]["block"] == "IN01" and heat.layers[k]["type"] == "attn1"]
    want = math.sqrt(sum(float(_dense(a.deltas[k]).double().norm()) ** 2 for k in keys))
    assert heat.values[heat.rows.index("IN01")][heat.cols.index("attn1")] == pytest.approx(want, rel=1e-5)
    img = render_heatmap(heat)
    assert img.size[1] > 56 * len(heat.rows)


def test_similarity_is_one_with_itself_and_minus_one_negated():
    a, neg = _adapter("a", 1), _adapter("neg", 1, sign=-1.0)
    same = similarity_heatmap(a, a)
    flat = [v for row in same.values for v in row if v is not None]
    assert flat and all(v == pytest.approx(1.0, abs=1e-5) for v in flat)
    opposite = [v for row in similarity_heatmap(a, neg).values for v in row if v is not None]
    assert all(v == pytest.approx(-1.0, abs=1e-5) for v in opposite)
    other = similarity_heatmap(a, _adapter("b", 2))
    assert all(abs(v) < 0.5 for row in other.values for v in row if v is not None)  # random: nearly orthogonal


def test_cli_inspect_plot_one_and_two_files(tmp_path, capsys):
    fa = save_adapter(_adapter("a", 1), tmp_path / "a.safetensors", format="kohya")
    fb = save_adapter(_adapter("b", 2), tmp_path / "b.safetensors", format="diffusers")
    assert main(["inspect", str(fa), "--plot", str(tmp_path / "a.png")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert Image.open(tmp_path / "a.png").size[0] > 200
    assert main(["inspect", str(fa), str(fb), "--plot", str(tmp_path / "ab.png"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["plot"].endswith("ab.png") and data["rows"][0] == "BASE te"
    assert all(v["cosine"] is not None for v in data["layers"].values())


@pytest.mark.parametrize(
    "argv,match",
    [
        (["{a}", "{b}"], "only for --plot"),
        (["{a}", "--plot", "{a}"], ".png"),
        (["{tmp}/missing.safetensors", "--plot", "{tmp}/o.png"], "no such file"),
        (["{a}", "--plot", "{tmp}/taken.png"], "exists"),
    ],
)
def test_cli_plot_errors(tmp_path, capsys, argv, match):
    fa = save_adapter(_adapter("a", 1), tmp_path / "a.safetensors", format="kohya")
    (tmp_path / "taken.png").write_bytes(b"keep")
    argv = [s.format(a=fa, b=fa, tmp=tmp_path) for s in argv]
    code = main(["inspect", *argv])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and match in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "taken.png"]
    assert (tmp_path / "taken.png").read_bytes() == b"keep"
