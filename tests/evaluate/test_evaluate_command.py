"""``lorablend eval merges`` from the command line: the seeds flag, and a 2-seed run that writes its table, JSON
and chart."""

from __future__ import annotations

import argparse
import json

import pytest

from lorablend.cli import main
from lorablend.evaluate.command import seeds_arg

STEPS = 6
SEEDS = [0, 1]


def test_seeds_take_a_range_or_a_list_and_refuse_words():
    assert seeds_arg("0-3") == [0, 1, 2, 3] and seeds_arg("5,1") == [5, 1]
    with pytest.raises(argparse.ArgumentTypeError, match="0-15"):
        seeds_arg("many")


def test_the_command_writes_table_json_and_chart(tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "merges", "--seeds", "0,1", "--methods", "blend,klora", "--styles", "outline",
                 "--steps", str(STEPS), "-o", str(out)])
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["blend", "klora"] and data["seeds"] == SEEDS
    assert (out / "chart.png").stat().st_size > 0 and "| blend |" in (out / "table.md").read_text()
    assert "| klora |" in capsys.readouterr().out


