"""runtime/schedule.py on its own (no model): keyframes read from every spelling, the weight of each step
(positions as fractions or step numbers, linear between, flat beyond), refusals that name the input, and the
per-image weight matrix a step callback writes (the model-level checks: tests/serve/test_batch_mixed.py)."""

from __future__ import annotations

import pytest
import torch

from lorablend.runtime.schedule import StepSchedule, parse_keyframes, weight_at


def test_keyframes_from_every_spelling():
    assert parse_keyframes("1.0@0, 0@0.6") == ((0.0, 1.0), (0.6, 0.0))
    assert parse_keyframes([[0.6, 0.0], [0, 1]]) == ((0.0, 1.0), (0.6, 0.0))
    assert parse_keyframes(0.7) == ((0.0, 0.7),)


@pytest.mark.parametrize("bad", ["1@x", [[0, float("nan")]], [[-1, 1.0]], [], "abc", True, [[0, 1]] * 33])
def test_bad_keyframes_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="detail"):
        parse_keyframes(bad, "detail")


def test_each_steps_weight():
    ramp = ((0.0, 1.0), (0.5, 0.0))
    assert [weight_at(ramp, i, 4) for i in range(4)] == [1.0, 0.5, 0.0, 0.0]
    assert [weight_at(((2.0, 1.0), (4.0, 3.0)), i, 8) for i in (0, 2, 3, 4, 7)] == [1.0, 1.0, 2.0, 3.0, 3.0]


def test_the_callback_writes_the_next_steps_weights():
    plan = StepSchedule([{"a": ((0.0, 1.0), (1.0, 0.0))}, {"b": ((0.0, 2.0),)}])

    class Samples:
        columns = {"a": 0, "b": 1}
        matrix = plan.matrix_at(0, 4, columns)
        generation = 0
    assert torch.equal(Samples.matrix, torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    seen = []
    callback = plan.callback(Samples, 4, then=lambda p, i, t, k: seen.append(i) or k)
    assert callback(None, 1, None, {"x": 1}) == {"x": 1} and seen == [1]
    assert torch.equal(Samples.matrix, torch.tensor([[0.5, 0.0], [0.0, 2.0]])) and Samples.generation == 1
