"""The server on the 2025–26 families' tiny pipelines: a request with a LoRA answers the library's picture
(a Wan clip as its frame strip), defaults come from each pipeline's own ``__call__`` (Qwen-Image: no guidance),
and a negative prompt where the pipeline takes none is a 422 naming the field, not a 500."""

from __future__ import annotations

import inspect
import io
import re

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from lorablend import DiffusionPipeline  # noqa: E402
from lorablend.fixtures.tiny_2026 import tiny_2026_pipeline  # noqa: E402
from lorablend.fixtures.tiny_unets import random_adapter  # noqa: E402
from lorablend.images.drawing import first_picture  # noqa: E402
from lorablend.io import save_adapter  # noqa: E402
from lorablend.serve import ServeSettings, create_app  # noqa: E402

SIZES = {"qwen": 32, "flux2": 16, "zimage": 32, "wan": 16}


@pytest.mark.parametrize("family", sorted(SIZES))
def test_a_lora_request_answers_the_librarys_picture(family, tmp_path):
    pipe = DiffusionPipeline(tiny_2026_pipeline(family))
    pipe.set_progress_bar_config(disable=True)
    (tmp_path / "loras").mkdir()
    adapter = random_adapter(pipe.pipe, "ink", rank=2, strength=1.0, targets="attn",
                             components=[pipe.denoiser_name])
    save_adapter(adapter, tmp_path / "loras" / "ink.safetensors", format="diffusers", target=pipe.pipe)
    app = create_app(pipe, ServeSettings(lora_dir=tmp_path / "loras", token="t"))
    side = SIZES[family]
    extra = {"num_frames": 5} if family == "wan" else {}  # a clip's length is the request's (its default: 81)
    body = {"prompt": "a red circle", "loras": {"ink": 0.8}, "seed": 3, "steps": 2, "width": side, "height": side,
            **extra}
    with TestClient(app) as client:
        auth = {"Authorization": "Bearer t"}
        answer = client.post("/v1/images", json=body, headers=auth)
        assert answer.status_code == 200, answer.text
        got = np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB"), dtype=np.float32) / 255
        refusals = ({6: "1 more than a multiple of 4 \\(e.g. 5\\)", 85: "at most 81 \\(--max-frames\\)"}
                    if family == "wan" else {5: "makes images, not videos; leave num_frames out"})
        for frames, reason in refusals.items():
            refused = client.post("/v1/images", json={**body, "num_frames": frames}, headers=auth)
            assert refused.status_code == 422 and "num_frames" in refused.text, refused.text
            assert re.search(reason, refused.json()["detail"][0]["msg"]), refused.text
        if "negative_prompt" not in inspect.signature(pipe.pipe.__call__).parameters:
            refused = client.post("/v1/images", json={**body, "negative_prompt": "blurry"}, headers=auth)
            assert refused.status_code == 422 and "negative_prompt" in refused.text
    if "ink" not in pipe.runtime.adapters:  # (the server loaded it into this pipeline's runtime: reuse it)
        pipe.load_lora_weights(str(tmp_path / "loras" / "ink.safetensors"), adapter_name="ink")
    pipe.set_adapters(["ink"], [0.8])
    out = pipe(prompt="a red circle", num_inference_steps=2, width=side, height=side, output_type="np",
               generator=np.random.Generator(np.random.PCG64(3)), **extra)
    want = np.clip(np.asarray(first_picture(out), dtype=np.float32), 0, 1)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1.5 / 255  # one 8-bit level (PNG rounding) plus float noise


def _kohya_pair(module: str, rows: int, cols: int, rank: int = 2) -> dict:
    import torch

    return {f"lora_unet_{module}.lora_down.weight": torch.zeros(rank, cols),
            f"lora_unet_{module}.lora_up.weight": torch.zeros(rows, rank), f"lora_unet_{module}.alpha": torch.tensor(2.0)}


def test_the_catalog_names_the_family_of_each_file_before_it_is_parsed(tmp_path):
    # GET /v1/loras lists a file from its header alone: load_adapter's rule on its names and shapes (musubi-tuner's
    # kohya names at the real widths), not only the SD UNets' cross-attention width; an ambiguous file shows None
    from safetensors.torch import save_file

    loras = tmp_path / "loras"
    loras.mkdir()
    save_file({**_kohya_pair("transformer_blocks_0_img_mod_1", 18432, 3072),
               **_kohya_pair("transformer_blocks_0_attn_to_q", 3072, 3072)}, str(loras / "qwen.safetensors"))
    save_file({**_kohya_pair("blocks_0_self_attn_q", 5120, 5120), **_kohya_pair("blocks_0_ffn_0", 13824, 5120)},
              str(loras / "wan.safetensors"))
    save_file(_kohya_pair("blocks_0_self_attn_q", 1536, 1536), str(loras / "wan_small.safetensors"))
    save_file(_kohya_pair("transformer_blocks_0_attn_to_q", 3072, 3072), str(loras / "either.safetensors"))
    pipe = DiffusionPipeline(tiny_2026_pipeline("wan"))
    app = create_app(pipe, ServeSettings(lora_dir=loras, token="t"))
    with TestClient(app) as client:
        listed = client.get("/v1/loras", headers={"Authorization": "Bearer t"}).json()["loras"]
    families = {x["name"]: x["family"] for x in listed}
    assert families == {"qwen": "qwen-image", "wan": "wan-14b", "wan_small": "wan-1.3b", "either": None}
