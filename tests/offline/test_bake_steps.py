"""What every bake shares (offline/bake_steps.py): one checkpoint tensor fused from its pristine values, whole,
transposed or by row blocks, with the runtime's one formula; the job's defaults; unique LoRA names."""

from __future__ import annotations

from pathlib import Path

import torch

from lorablend.kinds import LowRankDelta
from lorablend.offline.bake_steps import BakeJob, BakeOp, BakeReport, fused_tensor, lora_name
from lorablend.offline.checkpoint import Placement
from lorablend.runtime.fusion import fused_weight


def _delta(out: int, inp: int, seed: int) -> LowRankDelta:
    g = torch.Generator().manual_seed(seed)
    return LowRankDelta(down=torch.randn(2, inp, generator=g), up=torch.randn(out, 2, generator=g))


def test_a_whole_tensor_is_the_runtimes_formula_and_a_transposed_one_its_transpose():
    w = torch.randn(6, 4)
    terms = [(0.7, _delta(6, 4, 1))]
    op = BakeOp(Placement("unet.m", "m.weight"), "weight", terms)
    assert torch.equal(fused_tensor(w.clone(), [op], torch.float32, True), fused_weight(w, terms, out_dtype=torch.float32))
    op_t = BakeOp(Placement("unet.m", "m.weight", transposed=True), "weight", terms)
    assert torch.equal(fused_tensor(w.t().contiguous(), [op_t], torch.float32, True),
                       fused_weight(w, terms, out_dtype=torch.float32).t())


def test_row_blocks_of_a_fused_tensor_are_each_fused_from_their_own_pristine_rows():
    qkv = torch.randn(9, 4)
    ops = [BakeOp(Placement(f"t.{n}", "qkv.weight", rows=(3 * i, 3 * i + 3)), "weight",
                  [(1.0, _delta(3, 4, i))]) for i, n in enumerate("qkv") if n != "k"]
    got = fused_tensor(qkv.clone(), ops, torch.float32, True)
    assert torch.equal(got[3:6], qkv[3:6])  # k has no LoRA: its rows stay
    for i in (0, 2):
        want = fused_weight(qkv[3 * i:3 * i + 3], [(1.0, _delta(3, 4, i))], out_dtype=torch.float32)
        assert torch.equal(got[3 * i:3 * i + 3], want)


def test_job_defaults_names_and_report():
    job = BakeJob(Path("m.safetensors"), ((Path("a.safetensors"), 0.7),), Path("o.safetensors"), ())
    assert (job.lora_scale, job.strict, job.safe, job.dtype) == (1.0, True, True, None)
    taken: set[str] = set()
    assert [lora_name(p, taken) for p in ("x/style.safetensors", "y/style.safetensors", "ink.pt")] == \
        ["style", "style_2", "ink"]
    report = BakeReport("m", "o", "single_file", "sd1", 1.0, None, loras=[{"name": "a", "weight": 0.7}], touched=3)
    assert "a:0.7" in report.summary() and report.to_dict()["touched"] == 3
