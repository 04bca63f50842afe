"""``lorablend generate``: one image or a labelled X/Y grid, from a pipeline folder and LoRA files (tiny SD1.5)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lorablend.cli import main
from lorablend.fixtures.tiny_unets import random_adapter, tiny_pipeline
from lorablend.io import save_adapter

FAST = ["--steps", "2", "--width", "32", "--height", "32"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    pipe = tiny_pipeline("sd1")
    pipe.save_pretrained(root / "base")
    a = save_adapter(random_adapter(pipe, "style", seed=1, strength=2.0), root / "style.safetensors", format="kohya", target=pipe)
    b = save_adapter(random_adapter(pipe, "detail", seed=2, strength=2.0, targets="attn"), root / "detail.safetensors",
                     format="kohya", target=pipe)
    return root, str(root / "base"), str(a), str(b)


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _pixels(path, box=None):
    img = Image.open(path).convert("RGB")
    return np.asarray(img if box is None else img.crop(box))


def _same_pixels(a, b) -> bool:
    """8-bit images from the same weights agree within one level: the float images they come from are computed
    on tensors at other addresses (another process's load) and may differ in their last bits, which can move a
    value across a rounding boundary."""
    return a.shape == b.shape and int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) <= 1


@pytest.fixture(scope="module")
def reference(setup):
    """Images made through the library in this process (one pipeline load): the CLI must reproduce them."""
    from lorablend.images.generate import GenerationSettings, generate_image, load_pipeline

    _, model, a, _ = setup
    pipe, _ = load_pipeline(model, [], device="cpu")
    s = GenerationSettings(seed=0, steps=2, width=32, height=32)
    base = np.asarray(generate_image(pipe, [], [], "a cat", s))
    pipe.load_lora_weights(a, adapter_name="style")
    dog = np.asarray(generate_image(pipe, ["style"], [1.0], "a dog", s))
    return {"base": base, "dog1": dog}


def test_generate_one_image_and_weight_zero_is_the_base_model(setup, reference, tmp_path, capsys):
    _, model, a, _ = setup
    code, out, err = _run(capsys, "generate", "--model", model, "--lora", f"{a}:0", "--prompt", "a cat", *FAST,
                          "-o", str(tmp_path / "zero.png"), "--json")
    assert code == 0, err
    assert json.loads(out)["images"] == 1
    assert Image.open(tmp_path / "zero.png").size == (32, 32)
    assert _same_pixels(_pixels(tmp_path / "zero.png"), reference["base"])
    assert not _same_pixels(reference["dog1"], reference["base"])


def test_grid_weights_by_prompts(setup, reference, tmp_path, capsys):
    _, model, a, _ = setup
    grid = tmp_path / "grid.png"
    code, out, err = _run(capsys, "generate", "--model", model, "--lora", f"{a}:0.7", "--prompt", "a cat",
                          "--prompt", "a dog", "--grid", "--grid-weights", "0,1", *FAST, "-o", str(grid), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["images"] == 4 and data["grid"]["rows"] == ["a cat", "a dog"]
    assert data["grid"]["columns"] == ["style=0", "style=1"]
    w, h = Image.open(grid).size
    assert w > 64 and h > 64  # cells plus the label margins
    # the bottom-right cell is "a dog" at weight 1, from the same seed: the same pixels as the single image
    # (columns may be wider than the images, to fit their labels: look for it along the bottom row)
    sheet = _pixels(grid)
    right = [x for x in range(w - 32, -1, -1) if _same_pixels(sheet[h - 32:, x:x + 32], reference["dog1"])]
    assert right  # only the "a dog", style=1 cell can match: the style=0 one differs (see the first test)


def test_grid_weights_by_weights(setup, tmp_path, capsys):
    _, model, a, b = setup
    code, out, err = _run(capsys, "generate", "--model", model, "--lora", a, "--lora", f"{b}:0.5", "--prompt", "a cat",
                          "--grid", "--grid-weights", "0,0.5,1", "--grid-weights-y", "0,1", *FAST,
                          "-o", str(tmp_path / "ww.png"), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["images"] == 6 and data["grid"]["rows"] == ["detail=0", "detail=1"]
    assert data["grid"]["cells"][-1]["weights"] == {"style": 1.0, "detail": 1.0}


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--model", "{root}/nope", "--prompt", "x"], "no such pipeline folder"),
        (["--model", "{model}", "--lora", "{root}/missing.safetensors", "--prompt", "x"], "no such file"),
        (["--model", "{model}", "--lora", "{a}:heavy", "--prompt", "x"], "bad weight"),
        (["--model", "{model}", "--prompt", "x", "--prompt", "y"], "--grid"),
        (["--model", "{model}", "--prompt", "x", "--grid"], "at least one --lora"),
        (["--model", "{model}", "--lora", "{a}", "--prompt", "x", "--grid", "--grid-weights", "a,b"], "comma-separated"),
        (["--model", "{model}", "--lora", "{a}", "--prompt", "x", "--steps", "0"], "--steps"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(setup, tmp_path, capsys, argv, match):
    root, model, a, _ = setup
    argv = [s.format(root=root, model=model, a=a) for s in argv]
    out = tmp_path / "out.png"
    code, _, err = _run(capsys, "generate", *argv, "-o", str(out))
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("lorablend: error:") and match in err, err
    assert not out.exists()


def test_existing_output_and_lora_as_output_are_refused(setup, tmp_path, capsys):
    _, model, a, _ = setup
    out = tmp_path / "taken.png"
    out.write_bytes(b"keep")
    code, _, err = _run(capsys, "generate", "--model", model, "--prompt", "x", "-o", str(out))
    assert code == 2 and "--overwrite" in err and out.read_bytes() == b"keep"
    code, _, err = _run(capsys, "generate", "--model", model, "--lora", a, "--prompt", "x", "-o", a)
    assert code == 2 and "input" in err


def test_a_broken_lora_fails_before_the_pipeline_loads(setup, tmp_path, capsys, monkeypatch):
    """The LoRA files are read and checked against the model folder's configs first: a broken one costs no
    model load (found by the hostile-input corpus)."""
    from lorablend.pipeline import DiffusionPipeline

    _, model, a, _ = setup
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(open(a, "rb").read()[:200])  # cut off inside the header

    def no_load(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the LoRA files were checked")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", no_load)
    code, _, err = _run(capsys, "generate", "--model", model, "--lora", str(broken), "--prompt", "x",
                        "-o", str(tmp_path / "o.png"), *FAST)
    assert code == 2 and "broken.safetensors" in err and "AssertionError" not in err, err
    assert not (tmp_path / "o.png").exists()
