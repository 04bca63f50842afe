"""Wan's modulation tables (``scale_shift_table``) as layers: a distillation LoRA's ``diff_m`` (lightx2v / Kijai)
applied unfused (the owner reads ``T + w·ΔT`` for the call), fused (``T + w·ΔT`` written) and unfused back bit for bit.
diffusers drops these keys (``_convert_non_diffusers_wan_lora_to_diffusers`` logs "diff keys we do not handle"), so
the oracle is a hand computation: the same tables with ``w·ΔT`` added, on an untouched copy of the model."""

from __future__ import annotations

import copy

import pytest
import torch

from lorablend import DiffusionPipeline
from lorablend.fixtures.tiny_2026 import tiny_2026_pipeline
from lorablend.runtime.model_view import ModulationTable

from conftest import COMPUTED_TOL


@pytest.fixture(scope="module")
def base():
    return tiny_2026_pipeline("wan")


def _distill_file(transformer, seed: int = 0) -> dict[str, torch.Tensor]:
    """A lightx2v-style file: a diff_m per block and for the head, a LoRA pair on one Linear, a head diff_b."""
    g = torch.Generator().manual_seed(seed)
    sd = {f"diffusion_model.blocks.{i}.diff_m": torch.randn(tuple(b.scale_shift_table.shape), generator=g) * 0.5
          for i, b in enumerate(transformer.blocks)}
    sd["diffusion_model.head.diff_m"] = torch.randn(tuple(transformer.scale_shift_table.shape), generator=g) * 0.5
    width = transformer.blocks[0].attn1.to_q.in_features
    sd["diffusion_model.blocks.0.self_attn.q.lora_down.weight"] = torch.randn(2, width, generator=g) * 0.2
    sd["diffusion_model.blocks.0.self_attn.q.lora_up.weight"] = torch.randn(width, 2, generator=g) * 0.2
    return sd


def _by_hand(base, sd, weight: float):
    """The oracle: an untouched copy with ``weight · ΔT`` added to every table and ``weight · up·down`` to to_q."""
    hand = copy.deepcopy(base.transformer)
    with torch.no_grad():
        for i, block in enumerate(hand.blocks):
            block.scale_shift_table.add_(sd[f"diffusion_model.blocks.{i}.diff_m"], alpha=weight)
        hand.scale_shift_table.add_(sd["diffusion_model.head.diff_m"], alpha=weight)
        q = "diffusion_model.blocks.0.self_attn.q."
        hand.blocks[0].attn1.to_q.weight.add_(sd[q + "lora_up.weight"] @ sd[q + "lora_down.weight"] * weight)
    return hand


def _run(transformer, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    x = torch.randn(1, cfg.in_channels, 2, 4, 4, generator=g)
    text = torch.randn(1, 5, cfg.text_dim, generator=g)
    with torch.no_grad():
        return transformer(x, torch.tensor([500]), text, return_dict=False)[0]


def test_diff_m_unfused_with_weight_and_scale_matches_the_hand_computation(base):
    sd = _distill_file(base.transformer)
    pipe = DiffusionPipeline(copy.deepcopy(base))
    pipe.load_lora_weights(sd, adapter_name="lightning")
    pipe.set_adapters(["lightning"], [0.5])
    torch.testing.assert_close(_run(pipe.transformer), _run(_by_hand(base, sd, 0.5)), **COMPUTED_TOL)
    assert (_run(pipe.transformer) - _run(base.transformer)).abs().max() > 0.05  # the tables do change the output
    pipe.set_adapters(["lightning"], [0.0])
    torch.testing.assert_close(_run(pipe.transformer), _run(base.transformer), **COMPUTED_TOL)
    pipe.set_adapters(["lightning"], [1.0])
    with pipe.runtime.call_scale(0.5):  # the call-time scale (what pipeline(..., attention_kwargs={"scale"}) sets)
        torch.testing.assert_close(_run(pipe.transformer), _run(_by_hand(base, sd, 0.5)), **COMPUTED_TOL)


def test_diff_m_fuses_and_unfuses_bit_for_bit(base):
    sd = _distill_file(base.transformer, seed=3)
    pipe = DiffusionPipeline(copy.deepcopy(base))
    pristine = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    pipe.load_lora_weights(sd, adapter_name="lightning")
    pipe.set_adapters(["lightning"], [0.75])
    pipe.fuse_lora()
    hand = _by_hand(base, sd, 0.75)
    # the fused tables are W0 + 0.75·ΔT in fp32 (fusion.fused_weight: one add with alpha): the hand's add, bit for bit
    for i, block in enumerate(pipe.transformer.blocks):
        assert torch.equal(block.scale_shift_table, hand.blocks[i].scale_shift_table)
    assert torch.equal(pipe.transformer.scale_shift_table, hand.scale_shift_table)
    torch.testing.assert_close(_run(pipe.transformer), _run(hand), **COMPUTED_TOL)
    pipe.unfuse_lora()
    for name, p in pipe.transformer.named_parameters():
        assert torch.equal(p, pristine[name]), name
    assert isinstance(pipe.transformer.blocks[0]._parameters["scale_shift_table"], torch.nn.Parameter)


def test_the_model_tree_is_unchanged_and_a_failed_forward_puts_the_table_back(base):
    pipe = DiffusionPipeline(copy.deepcopy(base))
    keys = list(pipe.transformer.state_dict())
    pipe.load_lora_weights(_distill_file(base.transformer), adapter_name="lightning")
    assert list(pipe.transformer.state_dict()) == keys  # the table view is no submodule
    block = pipe.transformer.blocks[0]
    table = block._parameters["scale_shift_table"]
    with pytest.raises(Exception):
        block(torch.zeros(1, 3, 1), None, None, None)  # wrong inputs: the block raises mid-forward
    assert block._parameters["scale_shift_table"] is table
    pipe.unload_lora_weights()
    assert block._parameters["scale_shift_table"] is table and not block._forward_pre_hooks


def test_a_table_view_is_its_owners_parameter():
    owner = torch.nn.Module()
    owner.scale_shift_table = torch.nn.Parameter(torch.zeros(1, 2, 3))
    view = ModulationTable.of(owner, "scale_shift_table")
    assert view.weight is owner.scale_shift_table and list(owner.children()) == []


def test_static_mode_refuses_an_unfused_table_delta_and_runs_a_fused_one(base):
    from lorablend.runtime.compiled import compile_denoiser

    sd = {k: v for k, v in _distill_file(base.transformer, seed=5).items() if k.endswith("diff_m")}
    pipe = DiffusionPipeline(copy.deepcopy(base))
    pipe.load_lora_weights(sd, adapter_name="lightning")
    pipe.set_adapters(["lightning"], [0.5])
    with pytest.raises(ValueError, match="modulation table, which static mode has no buffer for. Fuse it"):
        compile_denoiser(pipe.runtime, max_rank=4, backend=None)  # (no table gets a static layer: never dropped)
    pipe.fuse_lora()
    static = compile_denoiser(pipe.runtime, max_rank=4, backend=None)
    torch.testing.assert_close(_run(pipe.transformer), _run(_by_hand(base, sd | _no_lora(base), 0.5)), **COMPUTED_TOL)
    static.close()


def _no_lora(base) -> dict[str, torch.Tensor]:
    """The LoRA pair _by_hand adds, as zeros (a file of tables only)."""
    width = base.transformer.blocks[0].attn1.to_q.in_features
    q = "diffusion_model.blocks.0.self_attn.q."
    return {q + "lora_down.weight": torch.zeros(2, width), q + "lora_up.weight": torch.zeros(width, 2)}


def test_a_merge_of_table_deltas_applies_as_their_blend(base):
    # merge keeps a table delta a table, the exact weighted sum (merge/sums.py): its owner reads the blend
    from lorablend import merge
    from lorablend.io import load_adapter

    files = [{k: v for k, v in _distill_file(base.transformer, seed=s).items() if k.endswith("diff_m")} for s in (6, 7)]
    width = base.transformer.blocks[0].attn1.to_q.in_features
    adapters = [load_adapter(f, target=base, name=f"l{i}") for i, f in enumerate(files)]
    assert {d.kind for d in adapters[0].deltas.values()} == {"table"}
    merged = merge(adapters, [0.5, 0.5], method="cat")
    assert {d.kind for d in merged.deltas.values()} == {"table"}
    pipe = DiffusionPipeline(copy.deepcopy(base))
    pipe.load_lora_weights(merged, adapter_name="both")
    blend = {k: 0.5 * files[0][k] + 0.5 * files[1][k] for k in files[0]}
    q = "diffusion_model.blocks.0.self_attn.q."
    blend |= {q + "lora_down.weight": torch.zeros(2, width), q + "lora_up.weight": torch.zeros(width, 2)}
    want = _run(_by_hand(base, blend, 1.0))
    torch.testing.assert_close(_run(pipe.transformer), want, **COMPUTED_TOL)
    # once per-sample weights were asked for, layers build low-rank pairs: a table's owner still gets its dense term
    pipe.runtime.layers.low_rank_only = True
    pipe.set_adapters(["both"], [1.0])
    torch.testing.assert_close(_run(pipe.transformer), want, **COMPUTED_TOL)


def test_per_block_weights_reach_each_blocks_table_and_the_heads(base):
    pipe = DiffusionPipeline(copy.deepcopy(base))
    pipe.load_lora_weights({k: v for k, v in _distill_file(base.transformer).items() if k.endswith("diff_m")},
                           adapter_name="lightning")
    pipe.set_adapters(["lightning"], [{"transformer": {"B00": 0.0, "B01": 0.5, "FINAL": 0.25}}])
    assert pipe.runtime.layers.weights["lightning"] == {"transformer.blocks.0.scale_shift_table": 0.0,
                                                         "transformer.blocks.1.scale_shift_table": 0.5,
                                                         "transformer.scale_shift_table": 0.25}


def test_an_adapter_on_a_table_takes_no_per_sample_weights(base):
    # a cat merge gives a table a LoRA (low-rank factors): still a blocker, so a server batches it by its mix
    from lorablend import merge
    from lorablend.io import load_adapter

    files = [{k: v for k, v in _distill_file(base.transformer, seed=s).items() if k.endswith("diff_m")} for s in (8, 9)]
    merged = merge([load_adapter(f, target=base, name=f"l{i}") for i, f in enumerate(files)], [0.5, 0.5], method="cat")
    pipe = DiffusionPipeline(copy.deepcopy(base))
    pipe.load_lora_weights(merged, adapter_name="both")
    pipe.load_lora_weights(files[0], adapter_name="one")
    assert pipe.runtime.sample_weight_blockers(["both", "one"]) == ["both", "one"]
