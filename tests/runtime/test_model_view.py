"""runtime/model_view.py: the adaptable modules of one live pipeline, found once (every Linear / Conv2d the index
names, bound to the live module object)."""

from __future__ import annotations

import torch

from lorablend.naming import components_of
from lorablend.runtime.model_view import ModelView


def test_every_indexed_layer_is_the_live_module_of_its_component(tiny_pipes):
    pipe = tiny_pipes["sd1"]
    view = ModelView.of(components_of(pipe))
    assert view.family == "sd1" and set(view.components) == {"unet", "text_encoder"}
    assert set(view.modules) == set(view.index.modules)  # one walk found every layer the index names
    key = "unet.mid_block.attentions.0.proj_in"
    assert view.module(key) is pipe.unet.mid_block.attentions[0].proj_in
    live = {id(m) for c in view.components.values() for m in c.modules() if isinstance(m, (torch.nn.Linear,
                                                                                               torch.nn.Conv2d))}
    assert {id(m) for m in view.modules.values()} <= live


def test_a_cpu_model_has_no_shared_accelerator_and_other_components_are_left_out(tiny_pipes):
    pipe = tiny_pipes["sd1"]
    view = ModelView.of({"unet": pipe.unet, "vae": pipe.vae, "scheduler": pipe.scheduler})
    assert set(view.components) == {"unet"} and view.shared_accelerator() is None
