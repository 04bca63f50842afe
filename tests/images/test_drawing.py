"""images/drawing.py: labelled sheets of images, text wrapping, the first picture of any output, atomic PNGs."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from lorablend.images.drawing import first_picture, font, render_grid, save_png, text_size, wrap
from lorablend.outputs import InputOverwriteError, OutputExistsError


def test_a_sheet_holds_every_image_at_its_place_with_room_for_labels():
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    sheet = render_grid([[red, blue], [blue, red]], ["w=0", "w=1"], ["a cat", "a dog"], title="t")
    assert sheet.size[0] > 16 and sheet.size[1] > 16
    colours = {c for _, c in sheet.getcolors(maxcolors=1 << 16)}
    assert (255, 0, 0) in colours and (0, 0, 255) in colours


def test_wrapped_lines_fit_the_width():
    f = font(12)
    lines = wrap("a bowl of ramen shaped like a cute kawaii bear", 60, f)
    assert len(lines) > 1 and " ".join(lines).split() == "a bowl of ramen shaped like a cute kawaii bear".split()
    assert all(text_size(line, f)[0] <= 60 or " " not in line for line in lines)


def test_the_first_picture_of_images_or_of_a_video():
    assert first_picture(SimpleNamespace(images=[Image.new("RGB", (3, 3))])).size == (3, 3)
    strip = first_picture(SimpleNamespace(frames=np.zeros((1, 5, 16, 8, 3))))
    assert strip.shape[-1] == 3


def test_save_png_is_atomic_and_never_over_an_input_or_an_existing_file(tmp_path):
    image, out = Image.new("RGB", (4, 4), (1, 2, 3)), tmp_path / "out.png"
    assert save_png(image, out) == out and Image.open(out).getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(OutputExistsError):
        save_png(image, out)
    with pytest.raises(InputOverwriteError):
        save_png(image, out, overwrite=True, inputs=[out])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temporary left behind
