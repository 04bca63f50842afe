"""naming/blocks.py: one block vocabulary for per-block weights (LoRA Block Weight lists and dicts, transformer labels)."""

from __future__ import annotations

import pytest

from lorablend.naming.blocks import LBW_ORDERS, expand_block_weights, transformer_block_label


def test_a_dict_sets_its_labels_and_leaves_every_other_at_the_default():
    labels = ["BASE", "IN01", "M00", "OUT03"]
    assert expand_block_weights({"M00": 0.0, "IN01": -0.5}, "sd1", labels, default=0.8) == {
        "BASE": 0.8, "IN01": -0.5, "M00": 0.0, "OUT03": 0.8}


def test_an_unknown_label_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown block label\(s\) \['IN99'\].*valid labels: \['BASE', 'M00'\]"):
        expand_block_weights({"IN99": 1.0}, "sd1", ["BASE", "M00"])


def test_a_list_follows_the_lora_block_weight_order_of_its_length():
    for family, orders in LBW_ORDERS.items():
        for n, order in orders.items():
            got = expand_block_weights([i / 10 for i in range(n)], family, list(order))
            assert list(got.values()) == [i / 10 for i in range(n)], (family, n)


def test_a_list_of_another_length_names_the_lengths_that_exist():
    with pytest.raises(ValueError, match="must have one of"):
        expand_block_weights([1.0, 2.0, 3.0], "sdxl", ["BASE"])


@pytest.mark.parametrize("path, denoiser, label", [
    ("transformer_blocks.0.attn.to_q", "flux", "D00"),
    ("single_transformer_blocks.12.proj_mlp", "flux", "S12"),
    ("transformer_blocks.5.ff.net.2", "sd3", "J05"),
    ("proj_out", "sd3", "FINAL"),
])
def test_transformer_modules_get_their_block_labels(path, denoiser, label):
    assert transformer_block_label(path, denoiser) == label


# the 2025-26 families: one vocabulary each (naming/blocks.py), every module of the shipped data labelled
_VOCABULARY_2026 = {
    "qwen-image": ["B"], "wan-1.3b": ["B"], "wan-14b": ["B"], "wan-i2v-14b": ["B"], "wan-5b": ["B"],
    "flux2-dev": ["D", "S"], "flux2-klein-4b": ["D", "S"], "flux2-klein-9b": ["D", "S"], "chroma": ["D", "S"],
    "z-image": ["NR", "CR", "L"],
}


@pytest.mark.parametrize("family", sorted(_VOCABULARY_2026))
def test_2026_families_have_one_block_vocabulary(family):
    from lorablend.naming import LBW_ORDERS, expand_block_weights, standard_index

    labels = standard_index(family).block_labels()
    assert "OTHER" not in labels and {"TIME", "EMBED", "FINAL"} <= set(labels)
    blocks = [label for label in labels if label not in ("TIME", "EMBED", "FINAL")]
    assert {b.rstrip("0123456789") for b in blocks} == set(_VOCABULARY_2026[family])
    (count, order), = LBW_ORDERS[family].items()  # one list form: BASE, then every block in order
    assert order == ["BASE", *blocks] and count == len(blocks) + 1
    weights = expand_block_weights([0.5] * count, family, labels)
    assert all(weights[b] == 0.5 for b in blocks) and weights["TIME"] == 1.0
