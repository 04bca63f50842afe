"""ΔW of every LyCORIS kind read from kohya-named dicts, against dense formulas written here from the LyCORIS
maths (../shared/research/ecosystem_tools.md §4) with loops and explicit compositions, not the library's einsums.

Modules of the tiny SD1 pipeline: a Linear, a 3x3 conv and a 1x1 conv.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorablend import DoRADelta, FullDelta, LoHaDelta, LoKrDelta, LowRankDelta
from lorablend.io import load_adapter
from lorablend.naming import module_index

LINEAR = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
CONV3 = "unet.down_blocks.0.resnets.0.conv1"
CONV1 = "unet.down_blocks.1.attentions.0.proj_in"


@pytest.fixture(scope="module")
def pipe(tiny_pipes):
    return tiny_pipes["sd1"]


@pytest.fixture(scope="module")
def idx(pipe):
    return module_index(pipe)


def _rand(*shape, seed=[0]):
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0]))


def _load_one(pipe, idx, key: str, tensors: dict[str, torch.Tensor], cls):
    name = idx.kohya_name(key)
    sd = {f"{name}.{suffix}": t for suffix, t in tensors.items()}
    adapter = load_adapter(sd, target=pipe)
    assert adapter.report.complete, adapter.report.summary()
    delta = adapter.deltas[key]
    assert isinstance(delta, cls)
    return delta, idx.modules[key].weight_shape


def _kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kronecker product by blocks: out[i·p + x, j·q + y, ...] = a[i, j] · b[x, y, ...]."""
    p, q = b.shape[:2]
    out = torch.zeros(a.shape[0] * p, a.shape[1] * q, *b.shape[2:])
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[i * p:(i + 1) * p, j * q:(j + 1) * q] = a[i, j] * b
    return out


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS rebuild_tucker by loops: W[p, q, k, l] = Σ_ab t[a, b, k, l] · wa[a, p] · wb[b, q]."""
    out = torch.zeros(wa.shape[1], wb.shape[1], *t.shape[2:])
    for a in range(t.shape[0]):
        for b in range(t.shape[1]):
            out += torch.outer(wa[a], wb[b])[:, :, None, None] * t[a, b]
    return out


@pytest.mark.parametrize("key", [LINEAR, CONV3])
def test_loha(pipe, idx, key):
    out, *rest = idx.modules[key].weight_shape
    fan_in = torch.Size(rest).numel()
    r, alpha = 3, 1.5
    t = {"hada_w1_a": _rand(out, r), "hada_w1_b": _rand(r, fan_in), "hada_w2_a": _rand(out, r),
         "hada_w2_b": _rand(r, fan_in), "alpha": torch.tensor(alpha)}
    delta, shape = _load_one(pipe, idx, key, t, LoHaDelta)
    expected = (alpha / r) * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    torch.testing.assert_close(delta.delta_weight(shape), expected.reshape(shape), atol=1e-5, rtol=1e-5)


def test_loha_tucker(pipe, idx):
    out, cin, kh, kw = idx.modules[CONV3].weight_shape
    r, alpha = 2, 4.0
    t = {"hada_w1_a": _rand(r, out), "hada_w1_b": _rand(r, cin), "hada_t1": _rand(r, r, kh, kw),
         "hada_w2_a": _rand(r, out), "hada_w2_b": _rand(r, cin), "hada_t2": _rand(r, r, kh, kw),
         "alpha": torch.tensor(alpha)}
    delta, shape = _load_one(pipe, idx, CONV3, t, LoHaDelta)
    expected = (alpha / r) * _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"]) * _tucker(
        t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
    torch.testing.assert_close(delta.delta_weight(shape), expected, atol=1e-5, rtol=1e-5)


def _lokr_case(layout: str, out: int, fan_in: int, r: int):
    """Factor shapes for out = o1·o2, fan_in = i1·i2, in one of LyCORIS' layouts (either factor may be bigger)."""
    o1, i1 = 2, 2
    o2, i2 = out // o1, fan_in // i1
    if layout == "w1_full_w2_lowrank":
        return {"lokr_w1": _rand(o1, i1), "lokr_w2_a": _rand(o2, r), "lokr_w2_b": _rand(r, i2)}, r
    if layout == "w1_lowrank_w2_full":  # the small factor second: w2 (2 x 2), w1 big and decomposed
        o1, i1, o2, i2 = out // 2, fan_in // 2, 2, 2
        return {"lokr_w1_a": _rand(o1, r), "lokr_w1_b": _rand(r, i1), "lokr_w2": _rand(o2, i2)}, r
    if layout == "both_lowrank":
        return {"lokr_w1_a": _rand(o1, r), "lokr_w1_b": _rand(r, i1), "lokr_w2_a": _rand(o2, r),
                "lokr_w2_b": _rand(r, i2)}, r
    if layout == "both_full":
        return {"lokr_w1": _rand(o1, i1), "lokr_w2": _rand(o2, i2)}, None
    raise AssertionError(layout)


def _lokr_factor(t: dict, which: str) -> torch.Tensor:
    if f"lokr_{which}" in t:
        return t[f"lokr_{which}"]
    return t[f"lokr_{which}_a"] @ t[f"lokr_{which}_b"]


@pytest.mark.parametrize("layout", ["w1_full_w2_lowrank", "w1_lowrank_w2_full", "both_lowrank", "both_full"])
@pytest.mark.parametrize("key", [LINEAR, CONV3])
def test_lokr_layouts(pipe, idx, key, layout):
    out, *rest = idx.modules[key].weight_shape
    fan_in = torch.Size(rest).numel()
    t, r = _lokr_case(layout, out, fan_in, r=2)
    alpha = 3.0
    t["alpha"] = torch.tensor(alpha)
    delta, shape = _load_one(pipe, idx, key, t, LoKrDelta)
    # LyCORIS: scale alpha/dim when a factor is decomposed; a full-dim LoKr ignores alpha (scale 1)
    scale = alpha / r if r else 1.0
    expected = scale * _kron(_lokr_factor(t, "w1"), _lokr_factor(t, "w2"))
    got = delta.delta_weight(shape)
    assert got.shape == shape  # convs arrive flattened (out, in·kh·kw) and leave 4-D
    torch.testing.assert_close(got, expected.reshape(shape), atol=1e-5, rtol=1e-5)


def test_lokr_tucker_conv(pipe, idx):
    out, cin, kh, kw = idx.modules[CONV3].weight_shape
    r, alpha = 2, 5.0
    o1, i1 = 2, 2
    t = {"lokr_w1": _rand(o1, i1), "lokr_w2_a": _rand(r, out // o1), "lokr_w2_b": _rand(r, cin // i1),
         "lokr_t2": _rand(r, r, kh, kw), "alpha": torch.tensor(alpha)}
    delta, shape = _load_one(pipe, idx, CONV3, t, LoKrDelta)
    w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])  # (out/2, in/2, kh, kw)
    expected = (alpha / r) * _kron(t["lokr_w1"], w2)  # w1 acts as (o1, i1, 1, 1)
    torch.testing.assert_close(delta.delta_weight(shape), expected, atol=1e-5, rtol=1e-5)


def test_locon_tucker_equals_three_stacked_convs(pipe, idx):
    out, cin, kh, kw = idx.modules[CONV3].weight_shape
    r, alpha = 3, 2.0
    t = {"lora_down.weight": _rand(r, cin, 1, 1), "lora_mid.weight": _rand(r, r, kh, kw),
         "lora_up.weight": _rand(out, r, 1, 1), "alpha": torch.tensor(alpha)}
    delta, shape = _load_one(pipe, idx, CONV3, t, LowRankDelta)
    x = _rand(2, cin, 7, 7)
    # LyCORIS' Tucker LoCon runs down (1x1) -> mid (kxk) -> up (1x1); one conv with ΔW must do the same
    stacked = F.conv2d(F.conv2d(F.conv2d(x, t["lora_down.weight"]), t["lora_mid.weight"], padding=1), t["lora_up.weight"])
    single = F.conv2d(x, delta.delta_weight(shape), padding=1)
    torch.testing.assert_close(single, (alpha / r) * stacked, atol=1e-4, rtol=1e-4)


def test_locon_plain_conv_equals_two_stacked_convs(pipe, idx):
    out, cin, kh, kw = idx.modules[CONV3].weight_shape
    r = 2
    t = {"lora_down.weight": _rand(r, cin, kh, kw), "lora_up.weight": _rand(out, r, 1, 1)}
    delta, shape = _load_one(pipe, idx, CONV3, t, LowRankDelta)
    x = _rand(2, cin, 6, 6)
    stacked = F.conv2d(F.conv2d(x, t["lora_down.weight"], padding=1), t["lora_up.weight"])
    torch.testing.assert_close(F.conv2d(x, delta.delta_weight(shape), padding=1), stacked, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("key", [LINEAR, CONV3])
def test_full_diff(pipe, idx, key):
    shape = idx.modules[key].weight_shape
    t = {"diff": _rand(*shape), "diff_b": _rand(shape[0])}
    delta, shape = _load_one(pipe, idx, key, t, FullDelta)
    assert torch.equal(delta.delta_weight(shape), t["diff"])
    assert torch.equal(delta.delta_bias(), t["diff_b"])


def _dora_expected(w0, dw, magnitude, axis):
    merged = w0 + dw
    if axis == "out":
        norm = torch.stack([merged[i].pow(2).sum().sqrt() for i in range(merged.shape[0])])
        scale = (magnitude.reshape(-1) / norm).reshape(-1, *([1] * (merged.dim() - 1)))
    else:
        norm = torch.stack([merged[:, j].pow(2).sum().sqrt() for j in range(merged.shape[1])])
        scale = (magnitude.reshape(-1) / norm).reshape(1, -1, *([1] * (merged.dim() - 2)))
    return merged * scale - w0


@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("key", [LINEAR, CONV3, CONV1])
def test_kohya_dora_both_axes(pipe, idx, key, axis):
    shape = idx.modules[key].weight_shape
    out, cin = shape[0], shape[1]
    r, alpha = 2, 1.0
    down = _rand(r, *shape[1:])
    up = _rand(out, r, 1, 1) if len(shape) == 4 else _rand(out, r)
    extra = [1] * (len(shape) - 2)
    mag = (_rand(out, 1, *extra).abs() + 1) if axis == "out" else (_rand(1, cin, *extra).abs() + 1)
    t = {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(alpha), "dora_scale": mag}
    delta, shape = _load_one(pipe, idx, key, t, DoRADelta)
    assert delta.axis == axis
    w0 = _rand(*shape)
    dw = (alpha / r) * (up.reshape(out, r) @ down.reshape(r, -1)).reshape(shape)
    expected = _dora_expected(w0, dw, mag, axis)
    torch.testing.assert_close(delta.delta_weight(shape, base=w0), expected, atol=1e-5, rtol=1e-5)


def test_dora_on_loha(pipe, idx):
    shape = idx.modules[LINEAR].weight_shape
    out, cin = shape
    r = 2
    t = {"hada_w1_a": _rand(out, r), "hada_w1_b": _rand(r, cin), "hada_w2_a": _rand(out, r),
         "hada_w2_b": _rand(r, cin), "dora_scale": _rand(out, 1).abs() + 1}
    delta, shape = _load_one(pipe, idx, LINEAR, t, DoRADelta)
    w0 = _rand(*shape)
    dw = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    expected = _dora_expected(w0, dw, t["dora_scale"], "out")
    torch.testing.assert_close(delta.delta_weight(shape, base=w0), expected, atol=1e-5, rtol=1e-5)
