"""``POST /sdapi/v1/img2img`` (tiny SD1.5, a real server on loopback, the ``webuiapi`` client): each image is
diffusers' img2img pipeline over the same components with the LoRA set the plain way (seed + i, within one 8-bit
level), the LoRA changes the result and ``<lora:x:0>`` equals no LoRA; the same on tiny SDXL and Flux; a bad init
image, a mask, a strength that runs no step and a family without an image-to-image pipeline (Wan) are 422s naming
the field."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_support import TOKEN, RunningServer, assert_same_image, decode_b64, library, world  # noqa: E402

__all__ = ["library", "world"]  # fixtures, imported for pytest to find
SIDE = 32


@pytest.fixture(scope="module")
def server(world):
    running = RunningServer(world, max_batch=4, max_steps=8, max_pixels=SIDE * SIDE)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def init():
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))  # resized to 32x32 by the server


def _img2img(library, init, mix: dict, seeds: list[int], strength: float = 0.5) -> list[np.ndarray]:
    """The library's images: diffusers' img2img pipeline over the library pipeline's components, torch noise."""
    from diffusers import AutoPipelineForImage2Image
    from PIL import Image

    library.pipe.set_adapters(list(mix), list(mix.values()))
    pipe = AutoPipelineForImage2Image.from_pipe(library.pipe.pipe)
    pipe.set_progress_bar_config(disable=True)
    image = init.convert("RGB").resize((SIDE, SIDE), Image.Resampling.LANCZOS)
    out = pipe(["a fox"] * len(seeds), image=[image] * len(seeds), strength=strength, num_inference_steps=4,
               guidance_scale=7.5, output_type="np", generator=[torch.Generator().manual_seed(s) for s in seeds])
    return list(out.images)


def test_webuiapi_img2img_equals_the_librarys_and_the_lora_applies(server, library, init):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    api.set_auth("user", TOKEN)
    kw = dict(images=[init], seed=11, steps=4, width=SIDE, height=SIDE, cfg_scale=7.5, denoising_strength=0.5)
    result = api.img2img(prompt="a fox <lora:ink:0.8>", batch_size=2, **kw)
    assert result.info["all_seeds"] == [11, 12]
    got = [np.asarray(image.convert("RGB"), np.float32) / 255 for image in result.images]
    for g, want, seed in zip(got, _img2img(library, init, {"ink": 0.8}, [11, 12]), (11, 12)):
        assert_same_image(g, want, f"seed {seed}")
    plain = np.asarray(api.img2img(prompt="a fox", **kw).image.convert("RGB"), np.float32) / 255
    zero = np.asarray(api.img2img(prompt="a fox <lora:ink:0>", **kw).image.convert("RGB"), np.float32) / 255
    assert_same_image(plain, _img2img(library, init, {}, [11])[0], "no LoRA")
    assert_same_image(zero, plain, "<lora:ink:0>")
    assert float(np.abs(got[0] - plain).max()) > 4 / 255  # the LoRA changed the image
    # the shared components (the scheduler's begin index included) leave txt2img as it was: the library's image
    after = api.txt2img(prompt="a fox <lora:ink:0.8>", seed=11, steps=4, width=SIDE, height=SIDE, cfg_scale=7.5)
    want = library.image("a fox", {"ink": 0.8}, 11, steps=4)[0]
    assert_same_image(np.asarray(after.image.convert("RGB"), np.float32) / 255, want, "txt2img after img2img")


def test_bad_img2img_requests_are_422s_naming_the_field(server, init):
    buffer = io.BytesIO()
    init.save(buffer, format="PNG")
    good = base64.b64encode(buffer.getvalue()).decode()
    body = {"prompt": "a fox", "init_images": [good], "steps": 4, "width": SIDE, "height": SIDE}
    cases = [({"init_images": ["not base64!"]}, "init_images", "not base64"),
             ({"init_images": [base64.b64encode(b"GIF89a broken").decode()]}, "init_images", "no image"),
             ({"init_images": []}, "init_images", ""),
             ({"mask": good}, "mask", "inpainting"),
             ({"denoising_strength": 0.1}, "denoising_strength", "runs no step"),
             ({"prompt": "a <lora:ink:1@0,0@0.5>"}, "prompt", "txt2img")]
    with server.client() as client:
        for change, field, says in cases:
            r = client.post("/sdapi/v1/img2img", json={**body, **change})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == field and says in r.text, r.text
        r = client.post("/sdapi/v1/img2img", json=body)
        assert r.status_code == 200 and decode_b64(r.json()["images"][0]).shape == (SIDE, SIDE, 3)


def test_a_family_without_img2img_answers_422(tmp_path, init):
    from fastapi.testclient import TestClient

    from lorablend import DiffusionPipeline
    from lorablend.fixtures.tiny_2026 import tiny_2026_pipeline
    from lorablend.serve import ServeSettings, create_app

    (tmp_path / "loras").mkdir()
    app = create_app(DiffusionPipeline(tiny_2026_pipeline("wan")), ServeSettings(lora_dir=tmp_path / "loras", token="t"))
    buffer = io.BytesIO()
    init.save(buffer, format="PNG")
    with TestClient(app) as client:
        r = client.post("/sdapi/v1/img2img", headers={"Authorization": "Bearer t"}, json={
            "prompt": "x", "init_images": [base64.b64encode(buffer.getvalue()).decode()], "steps": 4, "width": 16,
            "height": 16})
    assert r.status_code == 422 and "no image-to-image pipeline" in r.text and "WanPipeline" in r.text, r.text


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_img2img_on_other_families_equals_diffusers_img2img(family, tmp_path, init):
    """SDXL (a UNet with two text encoders) and Flux (a transformer whose img2img takes height / width): the
    server's image is diffusers' img2img pipeline over the library pipeline with the LoRA set, within a level."""
    import inspect

    from diffusers import AutoPipelineForImage2Image
    from fastapi.testclient import TestClient
    from PIL import Image

    from lorablend import DiffusionPipeline
    from lorablend.fixtures.tiny_transformers import tiny_flux_pipeline
    from lorablend.fixtures.tiny_unets import random_adapter, tiny_pipeline
    from lorablend.io import save_adapter
    from lorablend.serve import ServeSettings, create_app

    build = {"sdxl": lambda: tiny_pipeline("sdxl"), "flux": tiny_flux_pipeline}[family]
    pipe = DiffusionPipeline(build())
    pipe.set_progress_bar_config(disable=True)
    (tmp_path / "loras").mkdir()
    adapter = random_adapter(pipe.pipe, "ink", rank=2, strength=1.0, targets="attn", components=[pipe.denoiser_name])
    save_adapter(adapter, tmp_path / "loras" / "ink.safetensors", format="diffusers", target=pipe.pipe)
    buffer = io.BytesIO()
    init.save(buffer, format="PNG")
    app = create_app(pipe, ServeSettings(lora_dir=tmp_path / "loras", token="t"))
    with TestClient(app) as client:
        r = client.post("/sdapi/v1/img2img", headers={"Authorization": "Bearer t"}, json={
            "prompt": "a fox <lora:ink:0.8>", "init_images": [base64.b64encode(buffer.getvalue()).decode()],
            "steps": 4, "width": SIDE, "height": SIDE, "seed": 3, "cfg_scale": 3.5, "denoising_strength": 0.6})
        assert r.status_code == 200, r.text
        after = client.post("/sdapi/v1/txt2img", headers={"Authorization": "Bearer t"}, json={
            "prompt": "a fox <lora:ink:0.8>", "steps": 4, "width": SIDE, "height": SIDE, "seed": 3, "cfg_scale": 3.5})
        assert after.status_code == 200, after.text
    ref = DiffusionPipeline(build())
    ref.load_lora_weights(str(tmp_path / "loras" / "ink.safetensors"), adapter_name="ink")
    ref.set_adapters(["ink"], [0.8])
    i2i = AutoPipelineForImage2Image.from_pipe(ref.pipe)
    i2i.set_progress_bar_config(disable=True)
    sized = {"height": SIDE, "width": SIDE} if "height" in inspect.signature(i2i.__call__).parameters else {}
    image = init.convert("RGB").resize((SIDE, SIDE), Image.Resampling.LANCZOS)
    want = i2i(["a fox"], image=[image], strength=0.6, num_inference_steps=4, guidance_scale=3.5, output_type="np",
               generator=[torch.Generator().manual_seed(3)], **sized).images[0]
    assert_same_image(decode_b64(r.json()["images"][0]), np.clip(want, 0, 1), family)
    ref.set_progress_bar_config(disable=True)  # txt2img after img2img on the shared scheduler: the library's image
    want = ref("a fox", num_inference_steps=4, width=SIDE, height=SIDE, guidance_scale=3.5, output_type="np",
               generator=np.random.Generator(np.random.PCG64(3))).images[0]
    assert_same_image(decode_b64(after.json()["images"][0]), np.clip(want, 0, 1), f"{family} txt2img after")


def test_an_init_image_too_large_is_refused_from_its_header():
    from PIL import Image

    from lorablend.serve.img2img import MAX_INIT_SIDE, decode_init_images

    buffer = io.BytesIO()
    Image.new("L", (MAX_INIT_SIDE + 8, 8)).save(buffer, format="PNG")  # small file, wide image
    with pytest.raises(ValueError, match=r"init_images\[0\]: 4104x8 pixels"):
        decode_init_images([base64.b64encode(buffer.getvalue()).decode()], 32, 32)
    (image,) = decode_init_images(["data:image/png;base64," + base64.b64encode(_png(Image.new("RGBA", (9, 7))))
                                   .decode()], 16, 8)
    assert image.mode == "RGB" and image.size == (16, 8)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
