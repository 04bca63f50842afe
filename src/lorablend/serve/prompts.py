"""A1111's LoRA tokens in prompts: ``<lora:name:weight>`` (and ``<lora:name>``, weight 1; ``<lyco:…>`` alike).

Front-ends that speak the AUTOMATIC1111 web API (and many OpenAI-API chat tools pointed at an image server) put
the LoRA mix in the prompt. The tokens are taken out of the text and summed per name (A1111 adds two tokens of
one LoRA); what is left, with its whitespace collapsed (CLIP's tokenizer collapses it anyway), is the prompt.

>>> split_lora_tokens("a cat <lora:ink:0.7>, <lora:paper>")
('a cat ,', {'ink': 0.7, 'paper': 1.0}, {}, {})
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..runtime.schedule import ExpertSplit, parse_keyframes
from .errors import PromptTokenError

_TOKEN = re.compile(r"<(lora|lyco):([^<>]*)>", re.IGNORECASE)


def block_weights(token: str, text: str) -> list[float] | dict[str, float]:
    """The block weights of an A1111 LoRA Block Weight field ``lbw=…``: numbers in LBW order (``lbw=1,0,0,…``:
    17 or 26 for SD1.x, 12 or 20 for SDXL, checked against the model later), or block labels (``lbw=IN02`` or
    ``lbw=IN02:0.5;OUT03``): only those blocks, at 1 or the value given; every other block 0.

    >>> block_weights("t", "IN04:0.5;OUT03"), block_weights("t", "1,0,0.5")
    ({'IN04': 0.5, 'OUT03': 1.0}, [1.0, 0.0, 0.5])
    """
    items = [i.strip() for i in text.replace(";", ",").split(",") if i.strip()]
    if not items:
        raise PromptTokenError(f"{token}: lbw= names no blocks; write e.g. lbw=IN04:0.5;OUT03 or 17 numbers (SD1.x)")
    try:
        values = [float(i) for i in items]
    except ValueError:
        values = None
    if values is not None:
        if not all(math.isfinite(v) for v in values):
            raise PromptTokenError(f"{token}: block weights must be finite numbers")
        return values
    labels: dict[str, float] = {}
    for item in items:
        label, _, value = item.replace("=", ":").partition(":")
        try:
            labels[label.strip().upper()] = float(value) if value else 1.0
        except ValueError:
            raise PromptTokenError(f"{token}: {item!r} is no block weight; write LABEL or LABEL:WEIGHT, e.g. "
                                   "IN04:0.5") from None
    return labels


def expert_split(token: str, name: str, text: str) -> ExpertSplit:
    """Wan 2.2 A14B's per-expert weights in a token's weight field, as WanGP writes its phase multipliers:
    ``HIGH;LOW`` (the high-noise expert's weight, then the low-noise one's).

    >>> expert_split("<lora:x:1;0.3>", "x", "1;0.3")
    ExpertSplit(high=1.0, low=0.3, given='prompt')
    """
    parts = text.split(";")
    try:
        high, low = (float(p) for p in parts) if len(parts) == 2 else (math.nan, math.nan)
    except ValueError:
        high = low = math.nan
    if not (math.isfinite(high) and math.isfinite(low)):
        raise PromptTokenError(f"{token}: a Wan 2.2 expert split is two finite weights, the high-noise expert's "
                               f"then the low-noise one's, e.g. <lora:{name}:1.0;0.3>")
    return ExpertSplit(high, low, given="prompt")


def split_lora_tokens(prompt: str) -> tuple[str, dict[str, float], dict[str, Any], dict[str, Any]]:
    """``(prompt without the tokens, {name: summed weight}, {name: block weights}, {name: keyframes})``; raises
    :class:`PromptTokenError` naming the token. A weight ``W@P,W@P`` is an sd-webui-loractl schedule (weight
    ``W`` at position ``P`` of the steps, linear between); a weight ``HIGH;LOW`` is Wan 2.2 A14B's weight per
    expert (:func:`expert_split`, an :class:`ExpertSplit` in the schedules). A third field ``lbw=…`` gives the
    LoRA block weights
    (:func:`block_weights`); another third field (A1111's separate text-encoder / UNet weights,
    ``<lora:name:te:unet>``) is refused rather than half applied.

    >>> split_lora_tokens("a <lora:ink:0.5:lbw=IN02> <lora:paper:1@0,0@0.6>")
    ('a', {'ink': 0.5, 'paper': 1.0}, {'ink': {'IN02': 1.0}}, {'paper': ((0.0, 1.0), (0.6, 0.0))})
    >>> split_lora_tokens("<lora:ink:nan>")
    Traceback (most recent call last):
    ...
    lorablend.serve.errors.PromptTokenError: <lora:ink:nan>: the weight must be a finite number, e.g. <lora:ink:0.8>
    """
    mix: dict[str, float] = {}
    blocks: dict[str, Any] = {}
    schedules: dict[str, Any] = {}
    for match in _TOKEN.finditer(prompt):
        token, fields = match.group(0), match.group(2).split(":", 2)
        name = fields[0].strip()
        if not name:
            raise PromptTokenError(f"{token}: no LoRA name; write <lora:NAME:WEIGHT>, e.g. <lora:ink:0.8>")
        if len(fields) > 2:
            if not fields[2].strip().lower().startswith("lbw="):
                raise PromptTokenError(f"{token}: separate text-encoder and UNet weights are not supported; write "
                                       f"<lora:{name}:WEIGHT> or block weights <lora:{name}:WEIGHT:lbw=IN04;OUT03>")
            spec = block_weights(token, fields[2].strip()[4:])
            if blocks.get(name, spec) != spec:
                raise PromptTokenError(f"{token}: {name!r} has other block weights in another token; give one")
            blocks[name] = spec
        weight = 1.0
        if len(fields) >= 2 and ";" in fields[1]:  # WanGP's phases: the high-noise expert's weight; the low's
            schedules[name] = expert_split(token, name, fields[1])
            fields = fields[:1]
        elif len(fields) >= 2 and "@" in fields[1]:
            try:
                schedules[name] = parse_keyframes(fields[1], token)
            except ValueError as exc:
                raise PromptTokenError(str(exc)) from None
            fields = fields[:1]  # the schedule gives the weight of each step: 1 is set
        if len(fields) >= 2:
            try:
                weight = float(fields[1])
            except ValueError:
                weight = math.nan
            if not math.isfinite(weight):
                raise PromptTokenError(
                    f"{token}: the weight must be a finite number, e.g. <lora:{name}:0.8>")
        mix[name] = mix.get(name, 0.0) + weight
    return " ".join(_TOKEN.sub(" ", prompt).split()), mix, blocks, schedules


__all__ = ["block_weights", "expert_split", "split_lora_tokens"]
