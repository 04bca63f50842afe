"""Outputs (lorablend/outputs.py): atomic writes, inputs never overwritten, existing outputs kept unless asked.

Each rule is checked on the module itself, then once through a caller (save_adapter, bake, save_png, the CLI),
so a caller that went around the module would show here.
"""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lorablend.adapter import Adapter
from lorablend.cli import main
from lorablend.images.drawing import save_png
from lorablend.io import load_adapter, save_adapter
from lorablend.outputs import (
    InputOverwriteError, OutputExistsError, atomic_file, atomic_folder, atomic_write, check_output, same_file,
)


def _listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _failing_chunks():
    yield b"partial"
    raise OSError("disk full")


# ------------------------------------------------------------------------------------------- atomic writes


def test_a_write_leaves_the_file_and_nothing_else(tmp_path):
    out = atomic_write(tmp_path / "sub" / "a.bin", [b"ab", memoryview(b"cd")])
    assert out.read_bytes() == b"abcd" and _listing(out.parent) == ["a.bin"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_failure_midway_removes_the_temp_file_and_keeps_the_old_output(tmp_path, overwrite):
    out = tmp_path / "o.bin"
    if overwrite:
        out.write_bytes(b"keep me")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(out, _failing_chunks(), overwrite=overwrite)
    assert _listing(tmp_path) == (["o.bin"] if overwrite else [])
    if overwrite:
        assert out.read_bytes() == b"keep me"


def test_an_exception_inside_atomic_file_removes_the_temp_file(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_file(tmp_path / "x.png") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert _listing(tmp_path) == []


def test_an_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "o.bin"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError) as e:
        atomic_write(out, [b"new"])
    assert str(e.value) == f"{out} exists; pass --overwrite (overwrite=True) to replace it"
    assert isinstance(e.value, ValueError) and isinstance(e.value, FileExistsError)
    assert out.read_bytes() == b"keep me" and _listing(tmp_path) == ["o.bin"]
    atomic_write(out, [b"new"], overwrite=True)
    assert out.read_bytes() == b"new" and _listing(tmp_path) == ["o.bin"]


def test_an_output_that_appears_while_writing_is_not_clobbered(tmp_path):
    out = tmp_path / "o.bin"
    with pytest.raises(OutputExistsError):
        with atomic_file(out) as tmp:
            tmp.write_bytes(b"ours")
            out.write_bytes(b"theirs")  # another process got there first
    assert out.read_bytes() == b"theirs" and _listing(tmp_path) == ["o.bin"]


# ------------------------------------------------------------------------------------------- inputs


@pytest.fixture
def an_input(tmp_path):
    src = tmp_path / "in.safetensors"
    src.write_bytes(b"the user's only copy")
    return src


def _alias(kind: str, src, tmp_path):
    if kind == "same path":
        return tmp_path / "." / src.name
    alias = tmp_path / f"alias_{kind.replace(' ', '_')}.safetensors"
    if kind == "hard link":
        os.link(src, alias)
    else:
        alias.symlink_to(src)
    return alias


@pytest.mark.parametrize("kind", ["same path", "hard link", "symlink"])
def test_an_input_is_never_overwritten_even_with_overwrite(tmp_path, an_input, kind):
    alias = _alias(kind, an_input, tmp_path)
    assert same_file(alias, an_input)
    with pytest.raises(InputOverwriteError, match="never overwrites an input"):
        atomic_write(alias, [b"clobbered"], overwrite=True, inputs=[an_input])
    assert an_input.read_bytes() == b"the user's only copy"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_different_files_with_equal_bytes_are_not_the_same(tmp_path, an_input):
    other = tmp_path / "copy.safetensors"
    other.write_bytes(an_input.read_bytes())
    assert not same_file(other, an_input) and not same_file(tmp_path / "missing", an_input)


def test_a_symlink_loop_is_no_file_and_raises_nothing(tmp_path, an_input):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert not same_file(loop, an_input)


def test_folders_around_inputs_are_refused(tmp_path, an_input):
    with pytest.raises(InputOverwriteError, match="this folder holds an input"):
        with atomic_folder(tmp_path, overwrite=True, inputs=[an_input]):
            pass
    inside = tmp_path / "model"
    inside.mkdir()
    with pytest.raises(InputOverwriteError, match="inside an input folder"):
        check_output(inside / "image.png", inputs=[inside])
    assert an_input.read_bytes() == b"the user's only copy"


# ------------------------------------------------------------------------------------------- folders


def test_atomic_folder_swaps_a_whole_folder_in(tmp_path):
    out = tmp_path / "baked"
    with atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(OutputExistsError):
        with atomic_folder(out) as tmp:
            pass
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert _listing(out) == ["b.txt"] and _listing(tmp_path) == ["baked"]


def test_a_failure_while_filling_a_folder_keeps_the_old_one(tmp_path):
    out = tmp_path / "baked"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(out, overwrite=True) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("save_pretrained failed")
    assert _listing(out) == ["old.txt"] and _listing(tmp_path) == ["baked"]


def test_a_file_where_a_folder_goes_is_refused(tmp_path):
    (tmp_path / "baked").write_text("a file")
    with pytest.raises(NotADirectoryError):
        with atomic_folder(tmp_path / "baked", overwrite=True):
            pass
    assert (tmp_path / "baked").read_text() == "a file"


# ------------------------------------------------------------------------------------------- through the callers


def _adapter_file(tmp_path):
    from lorablend.adapter import LowRankDelta

    g = torch.Generator().manual_seed(0)
    a = Adapter("s", "sd1", {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k":
                             LowRankDelta(torch.randn(4, 768, generator=g), torch.randn(320, 4, generator=g), alpha=4.0)})
    return save_adapter(a, tmp_path / "in.safetensors", "kohya")


@pytest.mark.parametrize("kind", ["hard link", "symlink"])
def test_save_adapter_refuses_an_alias_of_its_source(tmp_path, kind):
    src = _adapter_file(tmp_path)
    before = src.read_bytes()
    alias = _alias(kind, src, tmp_path)
    with pytest.raises(InputOverwriteError, match="read from"):
        save_adapter(load_adapter(src), alias, "diffusers", overwrite=True)
    assert src.read_bytes() == before


def test_convert_refuses_a_hard_link_of_its_input(tmp_path, capsys):
    src = _adapter_file(tmp_path)
    before = src.read_bytes()
    alias = _alias("hard link", src, tmp_path)
    assert main(["convert", str(src), str(alias), "--to", "diffusers", "--overwrite"]) == 2
    assert "never overwrites an input" in capsys.readouterr().err
    assert src.read_bytes() == before


def test_bake_refuses_a_symlink_to_its_checkpoint(tmp_path):
    from lorablend.offline.bake import bake

    ckpt = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.x": torch.ones(2)}, str(ckpt))
    lora = _adapter_file(tmp_path)
    before = ckpt.read_bytes()
    alias = _alias("symlink", ckpt, tmp_path)
    with pytest.raises(InputOverwriteError, match="never overwrites an input"):
        bake(ckpt, [(lora, 1.0)], alias, overwrite=True)
    assert ckpt.read_bytes() == before


def test_save_png_is_atomic_and_keeps_existing_files(tmp_path):
    out = tmp_path / "img.png"
    out.write_bytes(b"keep")
    image = Image.new("RGB", (4, 4))
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_png(image, out)
    assert out.read_bytes() == b"keep"
    save_png(image, out, overwrite=True)
    assert Image.open(out).size == (4, 4) and _listing(tmp_path) == ["img.png"]
