"""runtime/weight_specs.py: a set_adapters weight spec (number, per component, per block) -> one weight per layer."""

from __future__ import annotations

import pytest

from lorablend.naming import components_of
from lorablend.runtime.binding import bind_adapter
from lorablend.runtime.model_view import ModelView
from lorablend.runtime.weight_specs import layer_weights


@pytest.fixture(scope="module")
def bound(tiny_pipes):
    from lorablend.fixtures.tiny_unets import random_adapter

    view = ModelView.of(components_of(tiny_pipes["sd1"]))
    return bind_adapter(random_adapter(tiny_pipes["sd1"], "a", seed=1), view), view


def test_none_and_a_number_weigh_every_layer_alike(bound):
    b, view = bound
    assert set(layer_weights(None, b, view).values()) == {1.0}
    assert set(layer_weights(0.4, b, view).values()) == {0.4}


def test_a_component_weight_applies_to_its_layers_only(bound):
    b, view = bound
    w = layer_weights({"text_encoder": 0.0}, b, view)
    assert {v for k, v in w.items() if k.startswith("text_encoder.")} == {0.0}
    assert {v for k, v in w.items() if k.startswith("unet.")} == {1.0}


def test_a_diffusers_block_dict_weighs_that_part_of_the_unet(bound):
    b, view = bound
    w = layer_weights({"unet": {"mid": 0.2}}, b, view)
    assert {v for k, v in w.items() if k.startswith("unet.mid_block.")} == {0.2}
    assert {v for k, v in w.items() if k.startswith("unet.down_blocks.")} == {1.0}


def test_a_block_label_weighs_its_block(bound):
    b, view = bound
    w = layer_weights({"M00": 0.5}, b, view)
    assert {v for k, v in w.items() if k.startswith("unet.mid_block.")} == {0.5}


@pytest.mark.parametrize("spec, message", [({"text_encoder_2": 1.0}, "components are"),
                                           ({"NOPE": 1.0}, "NOPE"), ("heavy", "weight of adapter")])
def test_a_bad_spec_is_refused_naming_what_is_wrong(bound, spec, message):
    b, view = bound
    with pytest.raises((ValueError, TypeError), match=message):
        layer_weights(spec, b, view)
