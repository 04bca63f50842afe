"""The request bodies of every endpoint, checked by pydantic (a bad field answers 422 naming it), and what
each becomes: one :class:`~lorablend.serve.batch.Generation`.

Types are strict (``"steps": "20"`` is refused, not guessed), numbers must be finite, weights and sizes bounded.
The native body refuses unknown fields (a typo is an error); the A1111 and OpenAI bodies ignore the fields of
those APIs this server has no use for (``sampler_name``, ``quality``, ...), as their front-ends send them all.
LoRA tokens ``<lora:name:weight>`` in a prompt add to the mix on every endpoint.

>>> ImageRequest(prompt="a cat", seed=1).loras
{}
"""

from __future__ import annotations

import random
import re
from dataclasses import replace
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field

from .config import MAX_GUIDANCE, MAX_PROMPT_CHARS, MAX_SEED, MAX_SIDE, MAX_WEIGHT, ServeSettings
from .batch import Generation
from .errors import PromptTokenError
from .prompts import split_lora_tokens
from ..runtime.schedule import ExpertSplit, parse_keyframes

Weight = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_WEIGHT, le=MAX_WEIGHT)]
Side = Annotated[int, Field(ge=8, le=MAX_SIDE, multiple_of=8)]
Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
LoraName = Annotated[str, Field(min_length=1, max_length=256)]
Guidance = Annotated[float, Field(allow_inf_nan=False, ge=0.0, le=MAX_GUIDANCE)]
KeyframeList = Annotated[list[Annotated[list[Annotated[float, Field(allow_inf_nan=False, ge=-10_000, le=10_000)]],
                                        Field(min_length=2, max_length=2)]], Field(min_length=1, max_length=32)]
_STRICT = ConfigDict(strict=True, extra="forbid")
_COMPAT = ConfigDict(strict=True, extra="ignore")


class ExpertWeights(BaseModel):
    """A LoRA's weight on each Wan 2.2 A14B expert: ``high`` on the high-noise ``transformer``'s steps, ``low`` on
    the low-noise ``transformer_2``'s (a server whose pipeline has one denoiser answers 422).

    >>> ExpertWeights(high=1.0, low=0.3).low
    0.3
    """

    model_config = _STRICT
    high: Weight
    low: Weight


def invalid(field: str, message: str, value: Any = None) -> RequestValidationError:
    """A 422 in FastAPI's own shape, for checks that depend on the server's settings (max steps, images).

    >>> invalid("steps", "at most 150").errors()[0]["loc"]
    ('body', 'steps')
    """
    return RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": message, "input": value}])


def _mix(prompt: str, loras: dict[str, Any]) -> tuple[str, dict[str, float], dict[str, Any], dict[str, Any]]:
    """The prompt without its ``<lora:…>`` tokens, the whole mix (tokens added to ``loras``), block weights and
    schedules (keyframes from ``loras`` or ``W@P`` tokens: weight 1 is set, the schedule gives each step's), checked."""
    try:
        text, tokens, blocks, schedules = split_lora_tokens(prompt)
    except PromptTokenError as exc:
        raise invalid("prompt", str(exc), prompt) from None
    mix = {}
    for name, value in loras.items():
        if isinstance(value, ExpertWeights):  # the pipeline turns it into keyframes (ServerState.check_experts)
            schedules[name], value = ExpertSplit(value.high, value.low), 1.0
        elif isinstance(value, list):
            try:
                schedules[name] = parse_keyframes(value, f"loras[{name!r}]")
            except ValueError as exc:
                raise invalid("loras", str(exc), name) from None
            value = 1.0
        mix[name] = value
    for name, weight in tokens.items():
        mix[name] = mix.get(name, 0.0) + weight
    for name, weight in mix.items():
        if abs(weight) > MAX_WEIGHT:
            raise invalid("loras", f"LoRA {name!r}: weight {weight:g} (with its prompt tokens) is over "
                                   f"{MAX_WEIGHT:g}; use a weight in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]", weight)
    for name, points in schedules.items():
        weights = (points.high, points.low) if isinstance(points, ExpertSplit) else [w for _, w in points]
        if mix.get(name) != 1.0 or any(abs(w) > MAX_WEIGHT for w in weights):
            raise invalid("loras", f"LoRA {name!r}: give a schedule once (no other weight for it), with weights in "
                                   f"[-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]", name)
    if blocks and schedules:  # (the per-sample path sets every LoRA at weight 1: block weights would be lost)
        raise invalid("prompt", f"block weights (lbw=) for {sorted(blocks)} and a schedule or expert split for "
                                f"{sorted(schedules)} cannot share a request: a schedule gives each LoRA one weight "
                                "per step; drop one of them", sorted(blocks))
    return text, mix, blocks, schedules


def _limits(config: ServeSettings, steps: int, images: int, images_field: str) -> None:
    if steps > config.max_steps:
        raise invalid("steps", f"{steps} steps: this server allows at most {config.max_steps}", steps)
    if images > config.max_images:
        raise invalid(images_field, f"{images} images: this server allows at most {config.max_images} per request; "
                                    "send several requests", images)


def _seed(seed: int | None) -> int:
    return random.SystemRandom().randrange(MAX_SEED) if seed is None or seed < 0 else seed


class ImageRequest(BaseModel):
    """``POST /v1/images``: the native body. ``seed`` omitted: a random one, returned in the answer.

    >>> ImageRequest(prompt="a cat", loras={"ink": float("nan")})          # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 3 validation errors for ImageRequest
    loras.ink.constrained-float
      Input should be a finite number ...

    A LoRA's value may be keyframes instead of a weight, ``[[position, weight], ...]``: its weight over the steps
    (runtime/schedule.py); or, on Wan 2.2 A14B, one weight per expert ``{"high": 1.0, "low": 0.3}``
    (:class:`ExpertWeights`).
    """

    model_config = _STRICT
    prompt: Prompt
    negative_prompt: Prompt | None = None
    loras: dict[LoraName, Weight | KeyframeList | ExpertWeights] = Field(
        default_factory=dict, max_length=64, description="LoRA name -> a weight, keyframes [[position, weight], ...] "
        "(its weight over the steps), or {high, low}: one weight per Wan 2.2 A14B expert")
    scale: Weight = 1.0
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    steps: Annotated[int, Field(ge=1)] | None = None
    guidance_scale: Guidance | None = None
    width: Side | None = None
    height: Side | None = None
    num_images: Annotated[int, Field(ge=1)] = 1
    num_frames: Annotated[int, Field(ge=1, description="a video pipeline's length in frames (Wan: 4k + 1; default "
                                     "the pipeline's); an image pipeline answers 422")] | None = None
    response_format: Literal["png", "json"] | None = None

    def generation(self, config: ServeSettings) -> Generation:
        """The request in the library's terms (422 for what only the server's limits refuse).

        >>> ImageRequest(prompt="a cat <lora:ink:0.5>", seed=2).generation(ServeSettings(".")).loras
        {'ink': 0.5}
        """
        steps = self.steps or config.default_steps
        _limits(config, steps, self.num_images, "num_images")
        if self.response_format == "png" and self.num_images > 1:
            raise invalid("response_format", "png answers one image; ask for response_format 'json' to get "
                                             f"{self.num_images} images", self.response_format)
        prompt, mix, blocks, schedules = _mix(self.prompt, self.loras)
        return Generation(prompt, _seed(self.seed), steps, mix, self.negative_prompt or None, self.guidance_scale,
                          self.width, self.height, self.num_images, self.scale, blocks=blocks, schedules=schedules,
                          num_frames=self.num_frames)


class LoraRegistration(BaseModel):
    """``POST /v1/loras`` (JSON): serve a file inside ``--lora-dir`` under ``name`` (default: the file's stem).

    >>> LoraRegistration(path="styles/ink.safetensors").path
    'styles/ink.safetensors'
    """

    model_config = _STRICT
    path: Annotated[str, Field(min_length=1, max_length=4096)]
    name: Annotated[str, Field(min_length=1, max_length=128)] | None = None


class Txt2ImgRequest(BaseModel):
    """``POST /sdapi/v1/txt2img``: AUTOMATIC1111's body (the fields that apply; the others are ignored).

    ``seed`` -1 (A1111's "random") picks one; images are ``batch_size × n_iter``, image ``i`` from ``seed + i``
    (A1111's ``all_seeds``: each image is the one a request for that seed alone gives).

    >>> Txt2ImgRequest(prompt="a cat <lora:ink:0.8>", seed=5, steps=2).generation(ServeSettings(".")).prompt
    'a cat'
    """

    model_config = _COMPAT
    prompt: Prompt
    negative_prompt: Prompt | None = ""
    seed: Annotated[int, Field(ge=-1, le=MAX_SEED)] = -1
    steps: Annotated[int, Field(ge=1)] = 20
    cfg_scale: Guidance = 7.0
    width: Side | None = None
    height: Side | None = None
    batch_size: Annotated[int, Field(ge=1)] = 1
    n_iter: Annotated[int, Field(ge=1)] = 1

    def generation(self, config: ServeSettings) -> Generation:
        """The request in the library's terms. >>> Txt2ImgRequest(prompt="x").generation(ServeSettings(".")).steps
        20
        """
        images = self.batch_size * self.n_iter
        _limits(config, self.steps, images, "batch_size")
        prompt, mix, blocks, schedules = _mix(self.prompt, {})
        return Generation(prompt, _seed(self.seed), self.steps, mix, self.negative_prompt or None, self.cfg_scale,
                          self.width, self.height, images, seed_per_image=True, blocks=blocks, schedules=schedules)


class Img2ImgRequest(Txt2ImgRequest):
    """``POST /sdapi/v1/img2img``: AUTOMATIC1111's img2img body: txt2img's fields, the ``init_images`` (base64 PNG /
    JPEG, resized to ``width`` × ``height``: A1111's "just resize"; image ``i`` starts from ``init_images[i % n]``)
    and ``denoising_strength`` (diffusers' ``strength``: the last ``steps × strength`` steps run). No inpainting: a
    ``mask`` is a 422.

    >>> Img2ImgRequest(prompt="x", init_images=["aGk="], steps=4).generation(ServeSettings(".")).strength
    0.75
    """

    init_images: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=16)]
    denoising_strength: Annotated[float, Field(allow_inf_nan=False, ge=0.0, le=1.0)] = 0.75
    mask: str | None = None

    def generation(self, config: ServeSettings) -> Generation:
        """The request in the library's terms: txt2img's, with the init images (checked by the server) and the
        strength; 422 for a mask, a strength that runs no step, or a schedule."""
        if self.mask:
            raise invalid("mask", "inpainting is not served here; send init_images without a mask")
        if int(self.steps * self.denoising_strength) < 1:
            raise invalid("denoising_strength", f"{self.steps} steps x denoising_strength {self.denoising_strength:g} "
                                                "runs no step; raise either so that their product is at least 1",
                          self.denoising_strength)
        gen = super().generation(config)
        if gen.schedules:
            raise invalid("prompt", "weight schedules and expert splits are for txt2img (img2img runs the last "
                                    "steps only); give constant weights", sorted(gen.schedules))
        return replace(gen, init_images=tuple(self.init_images), strength=self.denoising_strength)


_SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")


class OpenAIImageRequest(BaseModel):
    """``POST /v1/images/generations``: the OpenAI images body. ``size`` is ``"WxH"`` (or ``"auto"``: the model's
    size); only ``response_format`` ``b64_json`` is served (no image hosting). Beyond OpenAI's fields, ``seed``,
    ``steps``, ``guidance_scale``, ``negative_prompt``, ``loras`` and ``scale`` may be sent (the ``openai``
    client's ``extra_body``).

    >>> OpenAIImageRequest(prompt="a cat", size="64x32", seed=1, steps=2).generation(ServeSettings(".")).width
    64
    """

    model_config = _COMPAT
    prompt: Prompt
    n: Annotated[int, Field(ge=1)] | None = 1
    size: Annotated[str, Field(max_length=16)] | None = None
    response_format: Literal["b64_json", "url"] | None = "b64_json"
    model: Annotated[str, Field(max_length=256)] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    steps: Annotated[int, Field(ge=1)] | None = None
    guidance_scale: Guidance | None = None
    negative_prompt: Prompt | None = None
    loras: dict[LoraName, Weight | KeyframeList | ExpertWeights] = Field(
        default_factory=dict, max_length=64, description="as /v1/images: a weight, keyframes, or {high, low}")
    scale: Weight = 1.0

    def generation(self, config: ServeSettings) -> Generation:
        """The request in the library's terms (422 for a size that is not ``WxH`` in multiples of 8).

        >>> OpenAIImageRequest(prompt="x", size="auto").generation(ServeSettings(".")).width is None
        True
        """
        if self.response_format == "url":
            raise invalid("response_format", "this server returns images inline only; ask for 'b64_json'", "url")
        width = height = None
        if self.size not in (None, "auto"):
            match = _SIZE.match(self.size)
            sides = [int(v) for v in match.groups()] if match else []
            if not sides or any(v < 8 or v > MAX_SIDE or v % 8 for v in sides):
                raise invalid("size", f"size {self.size!r}: write WIDTHxHEIGHT with multiples of 8 from 8 to "
                                      f"{MAX_SIDE}, e.g. '512x512'", self.size)
            width, height = sides
        steps = self.steps or config.default_steps
        n = self.n or 1
        _limits(config, steps, n, "n")
        prompt, mix, blocks, schedules = _mix(self.prompt, self.loras)
        return Generation(prompt, _seed(self.seed), steps, mix, self.negative_prompt or None, self.guidance_scale,
                          width, height, n, self.scale, blocks=blocks, schedules=schedules)


__all__ = ["ExpertWeights", "ImageRequest", "Img2ImgRequest", "LoraRegistration", "OpenAIImageRequest",
           "Txt2ImgRequest", "invalid"]
