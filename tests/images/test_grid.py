"""images/grid.py: cells made in mix order on one pipeline (the mix switched only when it changes), and X/Y weight
grids placed in grid order. A recording stand-in for the pipeline: the logic, not the model, is under test."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from lorablend.images.generate import GenerationSettings
from lorablend.images.grid import CellRenderer, weight_grid


class RecordingPipe:
    """set_adapters / prepare / __call__ recorded; each image's colour encodes the mix it was made with."""

    def __init__(self):
        self.calls, self.mix = [], None

    def set_adapters(self, names, adapter_weights):
        self.calls.append(("set_adapters", tuple(names), tuple(adapter_weights)))
        self.mix = tuple(adapter_weights)

    def prepare(self):
        self.calls.append(("prepare",))

    def __call__(self, prompt, generator, **kw):
        self.calls.append(("call", prompt, kw["num_inference_steps"]))
        noise = int(generator.integers(256))
        colour = tuple(int(128 + 100 * w) for w in (self.mix + (0.0, 0.0))[:2]) + (noise,)
        return SimpleNamespace(images=[Image.new("RGB", (4, 4), colour)])


def test_a_renderer_switches_only_when_the_mix_changes_and_seeds_each_cell():
    pipe = RecordingPipe()
    r = CellRenderer(pipe, ["a"], GenerationSettings(steps=3))
    first, _, switched = r.render("cat", 5, [0.5])
    again, _, switched_again = r.render("dog", 5, [0.5])
    _, _, switched_third = r.render("dog", 6, [1.0])
    assert (switched, switched_again, switched_third) == (True, False, True) and r.switches == 2
    assert [c[0] for c in pipe.calls].count("set_adapters") == 2
    assert first.getpixel((0, 0)) == again.getpixel((0, 0))  # same seed, same mix: the same noise


def test_a_weights_by_weights_grid_makes_each_mix_once_and_places_it_in_its_cell():
    pipe = RecordingPipe()
    grid = weight_grid(pipe, ["a", "b"], [1.0, 1.0], ["cat"], GenerationSettings(steps=2),
                       x_weights=[0.0, 1.0], y_weights=[-1.0, 0.5])
    assert [c[0] for c in pipe.calls].count("set_adapters") == 4
    assert grid.x_values == ["a=0", "a=1"] and grid.y_values == ["b=-1", "b=0.5"]
    by_place = {(c["row"], c["col"]): c["weights"] for c in grid.cells}
    assert by_place[(1, 0)] == {"a": 0.0, "b": 0.5}
    assert grid.image.size[0] > 8 and grid.image.size[1] > 8


def test_a_grid_refuses_what_it_cannot_lay_out():
    with pytest.raises(ValueError, match="at least one LoRA"):
        weight_grid(RecordingPipe(), [], [], ["cat"], GenerationSettings(), x_weights=[0.0])
    with pytest.raises(ValueError, match="two LoRAs"):
        weight_grid(RecordingPipe(), ["a"], [1.0], ["cat"], GenerationSettings(), x_weights=[0.0], y_weights=[1.0])
    with pytest.raises(ValueError, match="one prompt"):
        weight_grid(RecordingPipe(), ["a", "b"], [1.0, 1.0], ["cat", "dog"], GenerationSettings(), x_weights=[0.0],
                    y_weights=[1.0])
