"""Merging Wan distillation LoRAs (lightx2v / Lightning): a modulation table's ``diff_m`` stays a table delta, norms'
``.diff`` vectors and ``.diff_b`` stay what they are, for every method; merge -> write (each layout) -> read gives the
same deltas back.

Oracles: the merged tables / vectors / biases against the weighted sums computed here by hand (``EXACT``: 1e-6
absolute, one fp32 multiply-add per term); what is written and read back against the merged adapter with
``torch.equal`` (we write those tensors). Layouts: ComfyUI (``ai-toolkit``: ``diffusion_model.blocks.N.diff_m``) and
``onetrainer`` hold everything; ``kohya`` (musubi names) holds diff / diff_b but no table and ``diffusers`` none of
them: both refuse, naming the key and the layout that holds it. Models: the tiny Wan pipeline, and the real layout of
a Kijai-extracted Wan 2.1 I2V file (WanVideoWrapper#940) at real widths with a diff_m added per block."""

from __future__ import annotations

import copy

import pytest
import torch

from lorablend import DiffusionPipeline
from lorablend.adapter import Adapter, LowRankDelta
from lorablend.fixtures.tiny_2026 import tiny_2026_pipeline
from lorablend.io.load import load_adapter
from lorablend.io.write import save_adapter
from lorablend.merge import METHODS, merge, merge_with_report
from lorablend.merge.options import FACTORWISE

from conftest import COMPUTED_TOL
from keylists_2026 import requires_2026, shape_from_family, state_dict

EXACT = dict(rtol=0, atol=1e-6)
WEIGHTS = [0.7, -0.4]
HEAD = "transformer.proj_out"  # head.head: a 2-D full diff, no factors for the factor-wise methods (PEFT's)


@pytest.fixture(scope="module")
def base():
    return tiny_2026_pipeline("wan")


def _distill_file(transformer, seed: int, head: bool = True) -> dict[str, torch.Tensor]:
    """lightx2v's ComfyUI names: a diff_m per block and for the head, a LoRA pair with its diff_b, a norm's diff,
    and (``head``) the head's whole ΔW ``head.head.diff`` with its ``diff_b``."""
    g = torch.Generator().manual_seed(seed)
    sd = {f"diffusion_model.blocks.{i}.diff_m": torch.randn(tuple(b.scale_shift_table.shape), generator=g)
          for i, b in enumerate(transformer.blocks)}
    sd["diffusion_model.head.diff_m"] = torch.randn(tuple(transformer.scale_shift_table.shape), generator=g)
    width = transformer.blocks[0].attn1.to_q.in_features
    q = "diffusion_model.blocks.0.self_attn.q."
    sd[q + "lora_down.weight"] = torch.randn(2, width, generator=g)
    sd[q + "lora_up.weight"] = torch.randn(width, 2, generator=g)
    sd[q + "diff_b"] = torch.randn(width, generator=g)
    sd["diffusion_model.blocks.0.norm3.diff"] = torch.randn(tuple(transformer.blocks[0].norm2.weight.shape), generator=g)
    if head:
        sd["diffusion_model.head.head.diff"] = torch.randn(tuple(transformer.proj_out.weight.shape), generator=g)
        sd["diffusion_model.head.head.diff_b"] = torch.randn(tuple(transformer.proj_out.bias.shape), generator=g)
    return sd


def _adapters(base, head: bool = True) -> list[Adapter]:
    return [load_adapter(_distill_file(base.transformer, seed, head), target=base, name=name)
            for seed, name in ((1, "lightning"), (2, "lightx2v"))]


def _options(method: str) -> dict:
    return {"density": 0.5} if method not in ("cat", "svd") and method != "linear" else {}


def _check_sums(merged: Adapter, inputs: list[Adapter]) -> None:
    """Every layer without a LoRA form, and every bias, is the hand-computed weighted sum, in its own kind."""
    for key, delta in inputs[0].deltas.items():
        got = merged.deltas[key]
        if not delta.has_lora_form:
            assert got.kind == delta.kind, key  # a table stays a table, a norm's vector a full diff
            hand = sum(w * a.deltas[key].delta_weight() for w, a in zip(WEIGHTS, inputs))
            torch.testing.assert_close(got.delta_weight(), hand, **EXACT, msg=key)
        if delta.changes_bias:
            hand = sum(w * a.deltas[key].delta_bias() for w, a in zip(WEIGHTS, inputs))
            torch.testing.assert_close(got.delta_bias(), hand, **EXACT, msg=key)


def _same_back(back: Adapter, merged: Adapter, keys=None) -> None:
    assert back.report.complete, back.report.summary()
    keys = set(merged.deltas) if keys is None else keys
    assert set(back.deltas) == keys
    for key in keys:
        mine, theirs = merged.deltas[key], back.deltas[key]
        # the tensors we wrote, bit for bit, and the scale they are read with: the same ΔW and Δb
        assert theirs.kind == mine.kind and theirs.scale == mine.scale, key
        ours, read = list(mine.tensors()), list(theirs.tensors())
        assert len(read) == len(ours) and all(torch.equal(a, b) for a, b in zip(read, ours)), key


@pytest.mark.parametrize("method", METHODS)
def test_merge_keeps_tables_and_writes_them_in_every_layout_that_holds_them(base, method, tmp_path):
    inputs = _adapters(base)
    merged = merge(inputs, WEIGHTS, method, **_options(method))
    _check_sums(merged, inputs)
    if method in FACTORWISE:  # head.head.diff has no factors to combine: the exact weighted sum, a full diff
        hand = sum(w * a.deltas[HEAD].delta_weight() for w, a in zip(WEIGHTS, inputs))
        assert merged.deltas[HEAD].kind == "full"
        torch.testing.assert_close(merged.deltas[HEAD].delta_weight(), hand, **EXACT)
    tables = {k for k, d in merged.deltas.items() if d.kind == "table"}
    assert len(tables) == len(base.transformer.blocks) + 1 and merged.report.complete
    for fmt in ("ai-toolkit", "onetrainer"):
        path = save_adapter(merged, tmp_path / f"{fmt}.safetensors", format=fmt, target=base)
        back = load_adapter(path, target=base)
        _same_back(back, merged)
        if fmt == "ai-toolkit":  # the names lightx2v ships and ComfyUI-side tools read
            assert {r.key for r in back.report.records} >= {"diffusion_model.blocks.0.diff_m", "diffusion_model.head.diff_m"}
    with pytest.raises(ValueError, match=r"lora_unet_blocks_0\.diff_m is a modulation table.*format='ai-toolkit'"):
        save_adapter(merged, tmp_path / "kohya.safetensors", format="kohya", target=base)
    with pytest.raises(ValueError, match=r"modulation table \(diff_m\) \(first: transformer\.blocks\.0\.scale_shift_table\)"
                                         r".*format='ai-toolkit'"):
        save_adapter(merged, tmp_path / "diffusers.safetensors", format="diffusers", target=base)
    assert not any(tmp_path.glob("kohya*")) and not any(tmp_path.glob("diffusers*"))  # nothing half-written
    rest = Adapter("rest", merged.family, {k: d for k, d in merged.deltas.items() if k not in tables})
    path = save_adapter(rest, tmp_path / "kohya.safetensors", format="kohya", target=base)  # diff / diff_b: kohya holds them
    _same_back(load_adapter(path, target=base), rest)
    # the LoRA layers with their diff_b: diffusers holds them (diff_b as lora_B.bias, scale 1)
    loras = Adapter("loras", merged.family, {k: d for k, d in merged.deltas.items() if d.kind == "lora"})
    path = save_adapter(loras, tmp_path / "peft.safetensors", format="diffusers", target=base)
    _same_back(load_adapter(path, target=base), loras)


def test_diffusers_reads_the_merged_bias_differences_we_write(base, tmp_path):
    # the oracle: diffusers' own loader puts the merged diff_b into PEFT's lora_B.bias (lora_bias in the config)
    merged = merge(_adapters(base), WEIGHTS, "cat")
    key = "transformer.blocks.0.attn1.to_q"
    path = save_adapter(Adapter("loras", merged.family, {key: merged.deltas[key]}), tmp_path / "peft.safetensors",
                        format="diffusers", target=base)
    pipe = copy.deepcopy(base)
    pipe.load_lora_weights(str(path), adapter_name="m")
    layer = pipe.transformer.blocks[0].attn1.to_q
    assert layer.scaling["m"] == 1.0 and torch.equal(layer.lora_B["m"].bias.detach(), merged.deltas[key].diff_b)
    assert torch.equal(layer.lora_B["m"].weight.detach(), merged.deltas[key].up)


def test_cat_is_the_exact_weighted_sum_on_every_layer(base):
    inputs = _adapters(base)
    merged, report = merge_with_report(inputs, WEIGHTS, "cat")
    for key in inputs[0].deltas:
        hand = sum(w * a.deltas[key].delta_weight() for w, a in zip(WEIGHTS, inputs))
        torch.testing.assert_close(merged.deltas[key].delta_weight(), hand, rtol=0, atol=1e-5, msg=key)
    exact = {m.key for m in report.layers if m.path == "exact"}
    assert exact == {k for k, d in inputs[0].deltas.items() if not d.has_lora_form}
    assert merged.metadata["lorablend.merge.rank"] != "0" and "rank 0" not in report.summary()


def test_factorwise_methods_refuse_a_whole_weight_difference_beside_a_lora_by_name(base):
    # one file's head.head.diff where the other has a LoRA: factors and no factors, nothing to combine factor-wise
    a, b = _adapters(base)
    out, width = a.deltas[HEAD].shape
    mixed = Adapter("lora-head", b.family, {**b.deltas, HEAD: LowRankDelta(torch.ones(2, width), torch.ones(out, 2))})
    with pytest.raises(ValueError, match=rf"'linear' combines LoRA factors.*{HEAD}.*full: use method='svd' or 'cat', wh"):
        merge([a, mixed], WEIGHTS, "linear")
    with pytest.raises(ValueError, match=r"'ties' combines LoRA factors.*or 'ties_svd'"):
        merge([a, mixed], WEIGHTS, "ties", density=0.5)


def test_add_weighted_adapter_runs_like_the_two_adapters_at_their_weights(base):
    pipe = DiffusionPipeline(copy.deepcopy(base))
    for seed, name in ((1, "lightning"), (2, "lightx2v")):
        pipe.load_lora_weights(_distill_file(pipe.transformer, seed), adapter_name=name)
    g = torch.Generator().manual_seed(5)
    cfg = pipe.transformer.config
    x, text = torch.randn(1, cfg.in_channels, 2, 4, 4, generator=g), torch.randn(1, 5, cfg.text_dim, generator=g)

    def run():
        with torch.no_grad():
            return pipe.transformer(x, torch.tensor([500]), text, return_dict=False)[0]

    pipe.set_adapters(["lightning", "lightx2v"], WEIGHTS)
    both = run()
    pipe.add_weighted_adapter(["lightning", "lightx2v"], WEIGHTS, "mix", combination_type="cat")
    pipe.set_adapters(["mix"], [1.0])
    torch.testing.assert_close(run(), both, **COMPUTED_TOL)
    pipe.set_adapters(["mix"], [0.0])
    assert (run() - both).abs().max() > 1e-2  # the merged tables do change the output


# ------------------------------------------------------------------------------------- the real layout (issue 940)
STEM = "wan21-i2v_comfy-kijai-diff__wanvideowrapper-issue940"


@pytest.fixture(scope="module")
def kijai_files() -> list[Adapter]:
    """Two files in the excerpt's names at real widths (seeded values), each with a diff_m for every block it names."""
    files = []
    for seed in (0, 1):
        sd = {k: v.float() for k, v in state_dict(STEM, shape_from_family("wan-i2v-14b"), seed=seed).items()}
        # the excerpt ends inside a module (block 27's k_img has its up, not its down): the real file has both
        sd = {k: v for k, v in sd.items() if not k.endswith(".lora_up.weight")
              or k.replace(".lora_up.", ".lora_down.") in sd}
        blocks = sorted({int(k.split(".")[2]) for k in sd})
        g = torch.Generator().manual_seed(seed + 10)
        sd.update({f"diffusion_model.blocks.{i}.diff_m": torch.randn(1, 6, 5120, generator=g) * 0.01 for i in blocks})
        files.append(load_adapter(sd))
    return files


@requires_2026
@pytest.mark.parametrize("method", ["cat", "svd", "ties"])
def test_the_real_kijai_layout_merged_written_and_read_back(kijai_files, method, tmp_path):
    assert all(a.family == "wan-i2v-14b" and a.report.complete for a in kijai_files)
    merged = merge(kijai_files, WEIGHTS, method, **_options(method))
    _check_sums(merged, kijai_files)
    assert {d.kind for d in merged.deltas.values()} == {"table", "full", "lora"}
    # every layout read back with no model given: the same family (its k_img / norm_k_img say I2V) and deltas
    for fmt in ("ai-toolkit", "onetrainer"):
        back = load_adapter(save_adapter(merged, tmp_path / f"{fmt}.safetensors", format=fmt))
        assert back.family == "wan-i2v-14b", fmt
        _same_back(back, merged)
    rest = Adapter("rest", merged.family, {k: d for k, d in merged.deltas.items() if d.kind != "table"})
    back = load_adapter(save_adapter(rest, tmp_path / "kohya.safetensors", format="kohya"))
    assert back.family == "wan-i2v-14b"
    _same_back(back, rest)


def _wan_single_file(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    """The tiny transformer in Wan's own names (``blocks.0.self_attn.q.weight``, ``head.head.bias``), its tables as
    ``blocks.N.modulation`` / ``head.modulation``: what a ComfyUI Wan file holds (Wan has no fused layers)."""
    out = {}
    for name, tensor in pipe.transformer.state_dict().items():
        module, _, part = name.rpartition(".")
        original = pipe.model_view.index.original_name(f"transformer.{module}")
        if name.endswith("scale_shift_table"):
            name = (module + ".modulation") if module else "head.modulation"
        elif original is not None and original[1] is None:
            name = f"{original[0]}.{part}"
        out[name] = tensor.detach().clone().contiguous()
    return out


def test_a_merged_distillation_file_bakes_as_the_pipeline_fuses_it(base, tmp_path):
    from safetensors.torch import load_file, save_file

    from lorablend.offline.bake import bake

    merged = merge(_adapters(base), WEIGHTS, "cat")
    lora = save_adapter(merged, tmp_path / "merged.safetensors", format="ai-toolkit", target=base)
    pipe = DiffusionPipeline(copy.deepcopy(base))
    state = _wan_single_file(pipe)
    save_file(state, str(tmp_path / "wan.safetensors"))
    report = bake(tmp_path / "wan.safetensors", [(str(lora), 1.0)], tmp_path / "baked.safetensors")
    assert not report.skipped
    pipe.load_lora_weights(str(lora), adapter_name="merged")
    pipe.set_adapters(["merged"], [1.0])
    pipe.fuse_lora()
    baked, fused = load_file(str(tmp_path / "baked.safetensors")), _wan_single_file(pipe)
    changed = {k for k in state if not torch.equal(baked[k], state[k])}
    # every table, the norm, both biases and both weights the merged file touches: baked as fused, bit for bit
    assert changed >= {"blocks.0.modulation", "blocks.1.modulation", "head.modulation", "blocks.0.norm3.weight",
                       "blocks.0.self_attn.q.weight", "blocks.0.self_attn.q.bias", "head.head.weight", "head.head.bias"}
    assert all(torch.equal(baked[k], fused[k]) for k in state), [k for k in state if not torch.equal(baked[k], fused[k])]


def _lightx2v_file(path, seed: int):
    """A lightx2v-style file at Wan 14B's real width (5120): two blocks' and the head's tables, one LoRA + diff_b."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {f"diffusion_model.blocks.{i}.diff_m": torch.randn(1, 6, 5120, generator=g) for i in (0, 1)}
    sd["diffusion_model.head.diff_m"] = torch.randn(1, 2, 5120, generator=g)
    q = "diffusion_model.blocks.0.self_attn.q."
    sd.update({q + "lora_down.weight": torch.randn(2, 5120, generator=g), q + "lora_up.weight": torch.randn(5120, 2, generator=g),
               q + "diff_b": torch.randn(5120, generator=g)})
    save_file(sd, str(path))
    return path, sd


def test_the_merge_command_writes_tables_in_comfyui_names_and_refuses_a_layout_without_them(tmp_path, capsys):
    from safetensors.torch import load_file

    from lorablend.cli import main

    (a, sa), (b, sb) = _lightx2v_file(tmp_path / "a.safetensors", 1), _lightx2v_file(tmp_path / "b.safetensors", 2)
    out = tmp_path / "merged.safetensors"
    assert main(["merge", f"{a}:0.7", f"{b}:-0.4", "-o", str(out), "--method", "svd", "--format", "ai-toolkit"]) == 0
    written = load_file(str(out))
    for key in ("diffusion_model.blocks.0.diff_m", "diffusion_model.blocks.1.diff_m", "diffusion_model.head.diff_m",
                "diffusion_model.blocks.0.self_attn.q.diff_b"):
        torch.testing.assert_close(written[key], 0.7 * sa[key] - 0.4 * sb[key], **EXACT, msg=key)
    back = load_adapter(out)  # Wan 14B T2V and I2V share these layers: one model line, read as T2V
    assert back.report.complete and back.family == "wan-14b" and set(back.also_fits) <= {"wan-i2v-14b"}
    capsys.readouterr()
    refused = tmp_path / "refused.safetensors"
    assert main(["merge", str(a), str(b), "-o", str(refused), "--format", "diffusers"]) == 2
    err = capsys.readouterr().err
    assert "modulation table (diff_m)" in err and "format='ai-toolkit'" in err and not refused.exists()
