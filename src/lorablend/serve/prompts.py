"""A1111's LoRA tokens in prompts: ``<lora:name:weight>`` (and ``<lora:name>``, weight 1; ``<lyco:…>`` alike).

Front-ends that speak the AUTOMATIC1111 web API (and many OpenAI-API chat tools pointed at an image server) put
the LoRA mix in the prompt. The tokens are taken out of the text and summed per name (A1111 adds two tokens of
one LoRA); what is left, with its whitespace collapsed (CLIP's tokenizer collapses it anyway), is the prompt.

>>> split_lora_tokens("a cat <lora:ink:0.7>, <lora:paper>")
('a cat ,', {'ink': 0.7, 'paper': 1.0})
"""

from __future__ import annotations

import math
import re

from .errors import PromptTokenError

_TOKEN = re.compile(r"<(lora|lyco):([^<>]*)>", re.IGNORECASE)


def split_lora_tokens(prompt: str) -> tuple[str, dict[str, float]]:
    """``(prompt without the tokens, {name: summed weight})``; raises :class:`PromptTokenError` naming the token.

    A third field (A1111's separate text-encoder / UNet weights, ``<lora:name:te:unet>``) is refused rather than
    half applied: this server applies one weight per LoRA.

    >>> split_lora_tokens("<lora:ink:nan>")
    Traceback (most recent call last):
    ...
    lorablend.serve.errors.PromptTokenError: <lora:ink:nan>: the weight must be a finite number, e.g. <lora:ink:0.8>
    """
    mix: dict[str, float] = {}
    for match in _TOKEN.finditer(prompt):
        token, fields = match.group(0), match.group(2).split(":")
        name = fields[0].strip()
        if not name:
            raise PromptTokenError(f"{token}: no LoRA name; write <lora:NAME:WEIGHT>, e.g. <lora:ink:0.8>")
        if len(fields) > 2:
            raise PromptTokenError(
                f"{token}: separate text-encoder and UNet weights are not supported; write <lora:{name}:WEIGHT>")
        weight = 1.0
        if len(fields) == 2:
            try:
                weight = float(fields[1])
            except ValueError:
                weight = math.nan
            if not math.isfinite(weight):
                raise PromptTokenError(
                    f"{token}: the weight must be a finite number, e.g. <lora:{name}:0.8>")
        mix[name] = mix.get(name, 0.0) + weight
    return " ".join(_TOKEN.sub(" ", prompt).split()), mix


__all__ = ["split_lora_tokens"]
