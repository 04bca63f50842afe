"""``lorablend serve``'s command line (serve/command.py): what it refuses before loading anything."""

from __future__ import annotations

import pytest

from lorablend.cli import main


@pytest.mark.parametrize("argv, says", [
    (["serve"], "needs --model and --lora-dir"),
    (["serve", "--model", "m", "--lora-dir", "no-such-folder"], "--lora-dir no-such-folder: not a folder"),
    (["serve", "--model", "m", "--lora-dir", "{tmp}", "--replicas", "2"], "are for --engine ray"),
    (["serve", "--model", "m", "--lora-dir", "{tmp}", "--port", "x"], "invalid int value"),
    (["serve", "--model", "m", "--lora-dir", "{tmp}", "--denoiser", "flux.safetensors"], "--denoiser flux.safetensors"),
])
def test_bad_serve_command_lines_exit_2_with_one_line_naming_the_flag(argv, says, capsys, tmp_path):
    pytest.importorskip("fastapi")
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and says in err, err


def test_serve_is_listed_with_its_flags():
    from lorablend.cli import build_parser

    out = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for flag in ("--lora-dir", "--demo", "--token", "--quantize", "--denoiser", "--engine", "--max-batch", "--drain-seconds"):
        assert flag in out, flag
