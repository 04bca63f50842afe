"""io/legacy.py: formats we recognise and refuse — their keys give positions, not module names."""

from __future__ import annotations

import pytest
import torch

from lorablend.errors import LoraFormatError
from lorablend.io.legacy import is_cloneofsimo, refuse_cloneofsimo, refuse_tensor_list


def test_cloneofsimo_keys_are_recognised_and_refused_with_what_they_hold():
    keys = ["unet:0:up", "unet:0:down", "text_encoder:0:up", "text_encoder:0:down", "<s1>"]
    assert is_cloneofsimo(keys) and not is_cloneofsimo(["unet.a.lora_A.weight"])
    with pytest.raises(LoraFormatError, match=r"old\.pt: a cloneofsimo .*2 positional up/down pairs.*1 token"):
        refuse_cloneofsimo(keys, "old.pt")


def test_a_bare_tensor_list_and_other_lists_are_refused_by_what_they_are():
    with pytest.raises(LoraFormatError, match="bare list of 2 tensors with no names"):
        refuse_tensor_list([torch.zeros(1), torch.zeros(1)], "x.pt")
    with pytest.raises(LoraFormatError, match="holds a list of 2 items .*not a dict of named tensors"):
        refuse_tensor_list([1, "a"], "x.pt")
