"""sweep/command.py: ``lorablend sweep``'s flags and what they become; bad values name the flag."""

from __future__ import annotations

import argparse

import pytest

from lorablend.sweep.command import add_arguments, from_arguments, numbers


def test_flags_become_the_sweep_and_how_to_run_it():
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--model", "m/", "--lora", "x/ink.safetensors", "--prompt", "a cat", "--weights", "0,1",
                         "--seeds", "3,4", "--steps", "2", "-o", "out"])
    spec, run = from_arguments(args, progress=False)
    assert spec.loras == [("x/ink.safetensors", "ink")] and spec.weights == [0.0, 1.0] and spec.seeds == [3, 4]
    assert spec.steps == 2 and run.engine == "local" and run.workers == 1


@pytest.mark.parametrize("text", ["", "1,x", "nan", "1,inf"])
def test_numbers_refuse_what_is_not_a_list_of_finite_numbers(text):
    with pytest.raises(ValueError, match="--weights"):
        numbers(text, "--weights")
    assert numbers("0, 0.5,1", "--weights") == [0.0, 0.5, 1.0]
