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


def test_family_flag_reads_a_file_that_fits_several_models(capsys, tmp_path):
    """A file whose layers fit several models alike (InvokeAI's Qwen-Image fixture: to_q / to_k at width 3072, which
    Flux.1, Qwen-Image, Flux.2 klein 4B and Chroma all have) is not read as any of them; the error names --family,
    and inspect / convert / merge read it as the family it names."""
    from keylists_2026 import KEYLISTS_2026, shape_from_family, state_dict
    from safetensors.torch import save_file

    if not KEYLISTS_2026.is_dir():
        pytest.skip("../shared/realdata/newfamily_loras/2026 is not beside the checkout")
    path = tmp_path / "q.safetensors"
    save_file(state_dict("qwenimage_diffusers-bare-downup__invokeai-testfixture", shape_from_family("qwen-image")),
              str(path))
    code, out, _ = _run(capsys, ["inspect", str(path), "--json"])
    info = json.loads(out)
    assert code == 0 and info["family"] == "unknown" and "--family qwen-image" in json.dumps(info)
    code, out, _ = _run(capsys, ["inspect", str(path), "--json", "--family", "qwen-image"])
    assert code == 0 and json.loads(out)["family"] == "qwen-image"
    code, out, _ = _run(capsys, ["convert", str(path), str(tmp_path / "k.safetensors"), "--to", "kohya", "--json",
                                 "--family", "qwen-image"])
    result = json.loads(out)
    assert code == 0 and result["family"] == "qwen-image" and result["report"]["unknown"] == 0
    code, out, _ = _run(capsys, ["merge", f"{path}:0.5", f"{path}:0.5", "-o", str(tmp_path / "m.safetensors"),
                                 "--method", "cat", "--json", "--family", "qwen-image"])
    assert code == 0 and json.loads(out)["layers"] > 0
    code, _, err = _run(capsys, ["inspect", str(path), "--family", "qwen"])
    assert code == 2 and "invalid choice: 'qwen'" in err
