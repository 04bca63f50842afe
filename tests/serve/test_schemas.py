"""serve/schemas.py: request bodies checked by pydantic (422 naming the field) and what each becomes."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lorablend.serve.config import ServeSettings
from lorablend.serve.schemas import ImageRequest, Txt2ImgRequest


def test_a_native_request_becomes_one_generation_with_its_prompt_tokens_in_the_mix(tmp_path):
    gen = ImageRequest(prompt="a cat <lora:ink:0.5>", loras={"paper": 1.0}, seed=2).generation(ServeSettings(tmp_path))
    assert gen.loras == {"ink": 0.5, "paper": 1.0} and "<lora" not in gen.prompt and gen.seed == 2
    assert gen.steps == ServeSettings(tmp_path).default_steps


@pytest.mark.parametrize("body", [dict(prompt="a", loras={"ink": float("nan")}), dict(prompt="a", seed=-1),
                                  dict(prompt="a", steps=0), dict(prompt="a", extra_field=1)])
def test_a_bad_field_is_refused(body):
    with pytest.raises(ValidationError):
        ImageRequest(**body)


def test_the_servers_limits_refuse_what_pydantic_lets_through(tmp_path):
    settings = ServeSettings(tmp_path, max_steps=10)
    with pytest.raises(Exception, match="steps"):
        ImageRequest(prompt="a", steps=11).generation(settings)


def test_an_a1111_body_speaks_the_same_generation(tmp_path):
    gen = Txt2ImgRequest(prompt="a cat <lora:ink:0.7>", seed=5, steps=3).generation(ServeSettings(tmp_path))
    assert gen.loras == {"ink": 0.7} and gen.seed == 5 and gen.steps == 3


def test_expert_splits_and_their_refusals(tmp_path):
    from lorablend.runtime.schedule import ExpertSplit

    settings = ServeSettings(tmp_path)
    gen = ImageRequest(prompt="a <lora:ink:1;0.25>", loras={"paper": {"high": 0.5, "low": 2.0}}).generation(settings)
    assert gen.loras == {"ink": 1.0, "paper": 1.0}
    assert gen.schedules == {"ink": ExpertSplit(1.0, 0.25), "paper": ExpertSplit(0.5, 2.0)}
    assert gen.schedules["ink"].given == "prompt" and gen.schedules["paper"].given == "loras"
    for body, says in ((dict(prompt="a <lora:ink:1;0.3> <lora:ink:0.5>"), "give a schedule once"),
                       (dict(prompt="a <lora:ink:1;0.3>", loras={"ink": 1.0}), "give a schedule once"),
                       (dict(prompt="a <lora:ink:1;11>"), "weights in"),
                       (dict(prompt="a <lora:ink:1;0.3> <lora:paper:0.5:lbw=IN04>"), "cannot share a request")):
        with pytest.raises(Exception, match=says):
            ImageRequest(**body).generation(settings)
    with pytest.raises(ValidationError):
        ImageRequest(prompt="a", loras={"ink": {"high": 1.0, "low": 0.3, "mid": 1.0}})


def test_the_openai_body_takes_the_native_loras_values(tmp_path):
    from lorablend.runtime.schedule import ExpertSplit
    from lorablend.serve.schemas import OpenAIImageRequest

    gen = OpenAIImageRequest(prompt="a", loras={"ink": [[0, 1.0], [1, 0.0]], "paper": {"high": 1.0, "low": 0.5},
                                                "moss": 0.3}).generation(ServeSettings(tmp_path))
    assert gen.loras == {"ink": 1.0, "paper": 1.0, "moss": 0.3}
    assert gen.schedules == {"ink": ((0.0, 1.0), (1.0, 0.0)), "paper": ExpertSplit(1.0, 0.5)}
