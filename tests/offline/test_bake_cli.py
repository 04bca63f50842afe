"""``lorablend bake`` (alias ``fuse``): the CLI over ``bake`` — output, JSON, and one-line errors that leave nothing behind."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorablend.cli import main
from lorablend.fixtures.tiny_unets import random_adapter
from lorablend.io import save_adapter

from ldm_convert import to_ldm


@pytest.fixture
def files(tmp_path, make_pipe):
    pipe = make_pipe("sdxl")
    ckpt = tmp_path / "model.safetensors"
    save_file(to_ldm(pipe, "sdxl"), str(ckpt))
    a = save_adapter(random_adapter(pipe, "a", seed=1, targets="attn"), tmp_path / "a.safetensors", format="kohya", target=pipe)
    b = save_adapter(random_adapter(pipe, "b", seed=2), tmp_path / "b.safetensors", format="diffusers", target=pipe)
    return tmp_path, str(ckpt), str(a), str(b)


def _run(capsys, *argv):
    code = main(list(argv))
    c = capsys.readouterr()
    return code, c.out, c.err


def test_fuse_single_file_json(files, capsys):
    tmp, ckpt, a, b = files
    out = tmp / "baked.safetensors"
    code, stdout, err = _run(capsys, "fuse", "--model", ckpt, "--lora", f"{a}:0.7", "--lora", f"{b}:0.8",
                             "--lora-scale", "0.5", "-o", str(out), "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["kind"] == "single_file" and report["family"] == "sdxl" and report["touched"] > 0
    assert [l["weight"] for l in report["loras"]] == [0.7, 0.8]
    before, after = load_file(ckpt), load_file(str(out))
    assert before.keys() == after.keys()
    assert sum(not torch.equal(before[k], after[k]) for k in before) > 0
    code, stdout, _ = _run(capsys, "fuse", "--model", ckpt, "--lora", a, "-o", str(out), "--overwrite")
    assert code == 0 and stdout.startswith("baked a:1")


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--model", "{tmp}/nope.safetensors", "--lora", "{a}"], "no such"),
        (["--model", "{ckpt}", "--lora", "{tmp}/missing.safetensors"], "no such file"),
        (["--model", "{ckpt}", "--lora", "{a}:strong"], "bad weight"),
        (["--model", "{ckpt}", "--lora", "{a}", "--lora-scale", "nan"], "finite"),
        (["--model", "{ckpt}", "--lora", "{a}", "--strict", "maybe"], "true or false"),
        (["--model", "{a}", "--lora", "{a}"], "not a single-file"),
    ],
)
def test_fuse_bad_input_one_line_nothing_written(files, capsys, argv, match):
    tmp, ckpt, a, _ = files
    out = tmp / "out.safetensors"
    argv = [s.format(tmp=tmp, ckpt=ckpt, a=a) for s in argv]
    code, _, err = _run(capsys, "fuse", *argv, "-o", str(out))
    assert code != 0 and err.count("\n") == 1 and err.startswith("lorablend: error:") and match in err, err
    assert not out.exists()
    assert not [p for p in tmp.iterdir() if p.name.startswith(".")]


def test_fuse_refuses_to_write_over_an_input(files, capsys):
    tmp, ckpt, a, _ = files
    size = (tmp / "model.safetensors").stat().st_size
    for target in (ckpt, a):
        code, _, err = _run(capsys, "fuse", "--model", ckpt, "--lora", a, "-o", target, "--overwrite")
        assert code == 2 and "input" in err and err.count("\n") == 1
    assert (tmp / "model.safetensors").stat().st_size == size


def test_bake_is_the_command_and_fuse_its_alias(files, capsys):
    tmp, ckpt, a, _ = files
    code, stdout, err = _run(capsys, "bake", "--model", ckpt, "--lora", f"{a}:0.5", "-o", str(tmp / "baked_by_bake.safetensors"), "--json")
    assert code == 0, err
    assert json.loads(stdout)["kind"] == "single_file"
    code, stdout, _ = _run(capsys, "--help")
    assert code == 0 and "bake (fuse)" in stdout
