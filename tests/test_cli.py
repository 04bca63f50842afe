"""cli.py: with --json, every command's error is one JSON document on stdout ({"error", "exit_code"}) with the
exit code it has without --json, and still one line on stderr."""

from __future__ import annotations

import json

import pytest

from lorablend.cli import SUBCOMMANDS, build_parser, main


def _commands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sorted({name for name, p in sub.choices.items() if p.prog.endswith(name)})


def _run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", _commands())
def test_a_usage_error_is_json_with_the_same_exit_code(capsys, command):
    plain, out, err = _run(capsys, [command, "--no-such-flag"])
    assert plain == 2 and out == "" and err.startswith("lorablend: error: ")
    code, out, err = _run(capsys, [command, "--no-such-flag", "--json"])
    assert code == plain and json.loads(out) == {"error": err.strip().removeprefix("lorablend: error: "),
                                                   "exit_code": plain}


@pytest.mark.parametrize("argv", [
    ["inspect", "{bad}"],
    ["convert", "{bad}", "{tmp}/o.safetensors", "--to", "kohya"],
    ["merge", "{bad}:0.5", "{bad}:0.5", "-o", "{tmp}/m.safetensors"],
    ["inspect", "{bad}", "{bad}", "--plot", "{tmp}/p.png"],
], ids=["inspect", "convert", "merge", "plot"])
def test_bad_input_is_json_with_the_same_exit_code(capsys, tmp_path, argv):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"<html>not a LoRA</html>")
    argv = [a.format(bad=bad, tmp=tmp_path) for a in argv]
    plain, out, _ = _run(capsys, argv)
    assert plain == 2 and out == ""
    code, out, _ = _run(capsys, argv + ["--json"])
    error = json.loads(out)
    assert code == plain and error["exit_code"] == plain and str(bad) in error["error"]
    assert not any(p.name != "bad.safetensors" for p in tmp_path.iterdir())  # nothing written


def test_every_subcommand_is_covered():
    assert len(_commands()) >= len(SUBCOMMANDS)
