"""runtime/control.py: what a file overwrites (a control LoRA's widened x_embedder, diffusers-format norm weights)
and its way back, bit for bit, on a tiny Flux transformer; refusals change nothing."""

from __future__ import annotations

import pytest
import torch

from lorablend.adapter import Adapter
from lorablend.errors import LoraCompatibilityError
from lorablend.fixtures.tiny_transformers import FLUX_TRANSFORMER
from lorablend.runtime.control import overwritten, replace_norms, restore_overwritten, unwiden, widen_for_control
from lorablend.runtime.model_view import ModelView


class FluxControlPipeline:  # only the class name and the transformer matter to widen_for_control
    def __init__(self, transformer):
        self.transformer = transformer


class FluxPipeline(FluxControlPipeline):
    pass


@pytest.fixture
def transformer():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(**FLUX_TRANSFORMER)


def _control(width: int = 8) -> Adapter:
    return Adapter("depth", "flux", {}, widened_inputs={"transformer.x_embedder": width})


def test_widening_keeps_the_original_tensor_and_reset_puts_it_back(transformer):
    xe = transformer.x_embedder
    original, before = xe.weight, xe.weight.detach().clone()
    view = ModelView.of({"transformer": transformer})
    assert widen_for_control(FluxControlPipeline(transformer), _control(), view) == ["transformer.x_embedder"]
    assert xe.in_features == 8 == transformer.config.in_channels
    assert torch.equal(xe.weight[:, :4], before) and not xe.weight[:, 4:].any()  # zeros for the control latents
    assert widen_for_control(FluxControlPipeline(transformer), _control(), view) == []  # already wide
    restore_overwritten(transformer, widened=False)  # a plain unload keeps the width, as diffusers does
    assert xe.in_features == 8
    assert restore_overwritten(transformer, widened=True) == ["x_embedder"]
    assert xe.weight is original and torch.equal(xe.weight, before)
    assert xe.in_features == 4 == transformer.config.in_channels
    assert overwritten(transformer) == {"widened": {}, "config": {}, "norms": {}}
    widen_for_control(FluxControlPipeline(transformer), _control(), view)
    unwiden({"transformer": transformer}, ["transformer.x_embedder"])  # a load that failed after widening
    assert xe.weight is original and xe.in_features == 4 == transformer.config.in_channels
    assert overwritten(transformer) == {"widened": {}, "config": {}, "norms": {}}


def test_a_control_lora_is_refused_on_a_plain_pipeline_or_a_busy_layer(transformer):
    view = ModelView.of({"transformer": transformer})
    with pytest.raises(LoraCompatibilityError, match="control LoRA.*FluxControlPipeline.from_pipe"):
        widen_for_control(FluxPipeline(transformer), _control(), view)
    with pytest.raises(LoraCompatibilityError, match="unload / unfuse them first"):
        widen_for_control(FluxControlPipeline(transformer), _control(), view, busy={"transformer.x_embedder"})
    assert transformer.x_embedder.in_features == 4 == transformer.config.in_channels
    assert overwritten(transformer)["widened"] == {}


def test_norm_replacements_come_back_bit_for_bit_and_the_first_original_wins(transformer):
    paths = [n for n, _ in transformer.named_modules() if n.endswith(("norm_q", "norm_k"))]
    before = {p: transformer.get_submodule(p).weight.detach().clone() for p in paths}
    new = {f"transformer.{p}": torch.randn_like(w) for p, w in before.items()}
    replace_norms({"transformer": transformer}, new)
    replace_norms({"transformer": transformer}, {k: v + 1 for k, v in new.items()})  # a second file on the same norms
    assert all(torch.equal(transformer.get_submodule(p).weight, new[f"transformer.{p}"] + 1) for p in paths)
    assert sorted(restore_overwritten(transformer, widened=False)) == sorted(paths)
    assert all(torch.equal(transformer.get_submodule(p).weight, before[p]) for p in paths)


def test_a_norm_replacement_of_another_shape_changes_nothing(transformer):
    good, bad = [n for n, _ in transformer.named_modules() if n.endswith("norm_q")][:2]
    before = transformer.get_submodule(good).weight.detach().clone()
    weights = {f"transformer.{good}": torch.zeros_like(before), f"transformer.{bad}": torch.zeros(3)}
    with pytest.raises(LoraCompatibilityError, match=rf"{bad}.*nothing was changed"):
        replace_norms({"transformer": transformer}, weights)
    assert torch.equal(transformer.get_submodule(good).weight, before) and overwritten(transformer)["norms"] == {}
