"""serve/prompts.py: A1111's LoRA tokens in a prompt (``<lora:name:weight>``) -> the prompt without them + a mix."""

from __future__ import annotations

import pytest

from lorablend.serve.errors import PromptTokenError
from lorablend.serve.prompts import split_lora_tokens


def test_tokens_leave_the_prompt_and_sum_into_the_mix():
    prompt, mix, blocks, schedules = split_lora_tokens("a cat <lora:ink:0.7>, <LORA:paper> <lyco:ink:0.1>")
    assert mix == pytest.approx({"ink": 0.8, "paper": 1.0}) and blocks == schedules == {}
    assert "<" not in prompt and "a cat" in prompt
    assert split_lora_tokens("plain") == ("plain", {}, {}, {})


def test_block_weights_and_schedules_ride_in_the_token():
    _, mix, blocks, schedules = split_lora_tokens("a <lora:ink:0.5:lbw=IN02> <lora:paper:1@0,0@0.6>")
    assert mix == {"ink": 0.5, "paper": 1.0} and blocks == {"ink": {"IN02": 1.0}}
    assert schedules == {"paper": ((0.0, 1.0), (0.6, 0.0))}


@pytest.mark.parametrize("token, why", [("<lora::1>", "no LoRA name"), ("<lora:ink:nan>", "finite number"),
                                        ("<lora:ink:0.5:1>", "separate text-encoder and UNet weights")])
def test_a_bad_token_is_refused_naming_it(token, why):
    with pytest.raises(PromptTokenError, match=why):
        split_lora_tokens(f"a cat {token}")
