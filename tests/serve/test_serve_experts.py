"""Wan 2.2 A14B's high / low expert split in a request (tiny ``wan22-a14b`` pipeline, a LoRA on both experts):
``"loras": {"x": {"high": 1.0, "low": 0.3}}`` and the prompt token ``<lora:x:1.0;0.3>`` (WanGP's phase
multipliers) each answer the image of per-expert ``set_adapters`` within one 8-bit level; a split request shares a
batch with another mix (per-sample weights), each image its own call's; on a one-denoiser pipeline the split is a
422 naming the field."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lorablend import DiffusionPipeline  # noqa: E402
from lorablend.fixtures.tiny_2026 import tiny_2026_pipeline  # noqa: E402
from lorablend.images.drawing import first_picture  # noqa: E402
from lorablend.serve import ServeSettings, create_app  # noqa: E402
from lorablend.serve.schemas import ImageRequest  # noqa: E402

AUTH = {"Authorization": "Bearer t"}
BODY = {"prompt": "a red circle", "seed": 3, "steps": 4, "width": 16, "height": 16}  # 4 steps: both experts run
LEVEL = 1.5 / 255  # one 8-bit level (PNG rounding) plus float noise


def _lora(path, pipe, seed: int, experts=("transformer", "transformer_2")) -> None:
    """A diffusers-format LoRA on the attention of the given experts (``transformer.…`` / ``transformer_2.…``)."""
    g, sd = torch.Generator().manual_seed(seed), {}
    for expert in experts:
        for name, m in getattr(pipe, expert).named_modules():
            if isinstance(m, torch.nn.Linear) and name.startswith("blocks.") and ".attn1." in name:
                sd[f"{expert}.{name}.lora_A.weight"] = torch.randn(2, m.in_features, generator=g) * 0.4
                sd[f"{expert}.{name}.lora_B.weight"] = torch.randn(m.out_features, 2, generator=g) * 0.4
    save_file(sd, str(path))


@pytest.fixture(scope="module")
def wan22(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    (root / "loras").mkdir()
    base = tiny_2026_pipeline("wan22-a14b")
    _lora(root / "loras" / "both.safetensors", base, 1)
    _lora(root / "loras" / "other.safetensors", base, 2)
    _lora(root / "loras" / "high_only.safetensors", base, 3, experts=("transformer",))
    pipe = DiffusionPipeline(base)
    pipe.set_progress_bar_config(disable=True)
    app = create_app(pipe, ServeSettings(lora_dir=root / "loras", token="t", max_batch=4))
    with TestClient(app) as client:
        yield root, app, client


def _library(root, weights: dict, seed: int, prompt: str = "a red circle") -> np.ndarray:
    """The library's picture: each LoRA loaded the plain way, per-expert weights through ``set_adapters``."""
    pipe = _library.pipe
    for name in weights:
        if name not in pipe.runtime.adapters:
            pipe.load_lora_weights(str(root / "loras" / f"{name}.safetensors"), adapter_name=name)
    pipe.set_adapters(list(weights), list(weights.values()))
    out = pipe(prompt=prompt, num_inference_steps=4, width=16, height=16, output_type="np",
               generator=np.random.Generator(np.random.PCG64(seed)))
    return np.clip(np.asarray(first_picture(out), dtype=np.float32), 0, 1)


def _png(answer) -> np.ndarray:
    assert answer.status_code == 200, answer.text
    return np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB"), dtype=np.float32) / 255


@pytest.fixture(scope="module")
def library():
    _library.pipe = DiffusionPipeline(tiny_2026_pipeline("wan22-a14b"))
    _library.pipe.set_progress_bar_config(disable=True)
    return _library


def test_a_split_equals_per_expert_set_adapters(wan22, library):
    root, _, client = wan22
    want = library(root, {"both": {"transformer": 1.0, "transformer_2": 0.3}}, 3)
    got = _png(client.post("/v1/images", json={**BODY, "loras": {"both": {"high": 1.0, "low": 0.3}}}, headers=AUTH))
    assert got.shape == want.shape and np.abs(got - want).max() <= LEVEL
    token = _png(client.post("/v1/images", json={**BODY, "prompt": "a red circle <lora:both:1.0;0.3>"}, headers=AUTH))
    assert np.abs(token - want).max() <= LEVEL
    plain = library(root, {"both": 1.0}, 3)  # the low expert's weight did change the picture
    assert np.abs(plain - want).max() > 10 * LEVEL
    # a file on the high-noise expert only: a low weight would change nothing (422); low 0 is the plain weight
    r = client.post("/v1/images", json={**BODY, "loras": {"high_only": {"high": 1.0, "low": 0.3}}}, headers=AUTH)
    assert r.status_code == 422 and "no layer on the low-noise expert (transformer_2)" in r.text, r.text
    got = _png(client.post("/v1/images", json={**BODY, "prompt": "a red circle <lora:high_only:0.8;0>"}, headers=AUTH))
    assert np.abs(got - library(root, {"high_only": 0.8}, 3)).max() <= LEVEL


def test_a_split_shares_a_batch_with_another_mix(wan22, library):
    root, app, _ = wan22
    state = app.state.lorablend
    asks = [ImageRequest(**{**BODY, "loras": {"both": {"high": 0.2, "low": 1.1}}}),
            ImageRequest(**{**BODY, "seed": 4, "prompt": "a blue square", "loras": {"other": 0.7, "both": 0.5}})]
    gens = [state.check_size(a.generation(state.config)) for a in asks]
    entries = [state.adapters_for(list(g.loras)) for g in gens]
    gens = [state.check_experts(g, e) for g, e in zip(gens, entries)]
    with state.worker._cond:  # both queue before the worker takes the first
        jobs = [state.worker.submit(g, e) for g, e in zip(gens, entries)]
    results = [job.future.result(timeout=300) for job in jobs]
    assert [r.batch_images for r in results] == [2, 2]
    wants = [library(root, {"both": {"transformer": 0.2, "transformer_2": 1.1}}, 3),
             library(root, {"other": 0.7, "both": 0.5}, 4, "a blue square")]
    for result, want in zip(results, wants):
        assert result.images[0].shape == want.shape and np.abs(np.clip(result.images[0], 0, 1) - want).max() <= 1e-3


def test_a_split_on_one_denoiser_is_a_422_naming_the_field(tmp_path):
    (tmp_path / "loras").mkdir()
    base = tiny_2026_pipeline("wan")
    _lora(tmp_path / "loras" / "x.safetensors", base, 1, experts=("transformer",))
    app = create_app(DiffusionPipeline(base), ServeSettings(lora_dir=tmp_path / "loras", token="t"))
    with TestClient(app) as client:
        for body, field in (({**BODY, "loras": {"x": {"high": 1.0, "low": 0.3}}}, "loras"),
                            ({**BODY, "prompt": "a <lora:x:1;0.3>"}, "prompt")):
            r = client.post("/v1/images", json=body, headers=AUTH)
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field], r.text
            assert "two experts" in r.text and "give one weight" in r.text
        for bad in ("<lora:x:1;a>", "<lora:x:1;2;3>", "<lora:x:1;inf>"):
            r = client.post("/v1/images", json={**BODY, "prompt": bad}, headers=AUTH)
            assert r.status_code == 422 and "expert split" in r.text, r.text
        r = client.post("/v1/images", json={**BODY, "loras": {"x": {"high": 1.0}}}, headers=AUTH)
        assert r.status_code == 422 and "low" in r.text


def test_split_requests_on_the_compiled_denoiser_make_no_new_graph(tmp_path, library):
    """``serve --compile`` on Wan 2.2 A14B (the high-noise ``transformer`` compiled, dynamo with the eager backend):
    split requests batched with another mix give their own calls' images, and a second round of other splits and
    weights makes no new graph."""
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    (tmp_path / "loras").mkdir()
    base = tiny_2026_pipeline("wan22-a14b")
    _lora(tmp_path / "loras" / "both.safetensors", base, 1)
    _lora(tmp_path / "loras" / "other.safetensors", base, 2)
    pipe = DiffusionPipeline(base)
    pipe.set_progress_bar_config(disable=True)
    dynamo.reset()
    backend = CompileCounterWithBackend("eager")  # dynamo's tracing and guards, without inductor's C++ build
    app = create_app(pipe, ServeSettings(lora_dir=tmp_path / "loras", token="t", max_batch=4),
                     compiled=pipe.compile_denoiser(backend=backend, per_sample=True))
    rounds = [[{"both": {"high": 1.0, "low": 0.3}}, {"other": 0.7}],
              [{"both": {"high": -0.5, "low": 1.2}, "other": 0.4}, {"both": 0.9}]]
    try:
        with TestClient(app):
            state = app.state.lorablend
            for r, mixes in enumerate(rounds):
                gens = [state.check_experts(state.check_size(ImageRequest(**{**BODY, "seed": 5 + i, "loras": m})
                                                             .generation(state.config))) for i, m in enumerate(mixes)]
                entries = [state.adapters_for(list(g.loras)) for g in gens]
                with state.worker._cond:
                    jobs = [state.worker.submit(g, e) for g, e in zip(gens, entries)]
                results = [job.future.result(timeout=300) for job in jobs]
                assert [res.batch_images for res in results] == [2, 2]
                graphs = backend.frame_count if r == 0 else graphs
                for i, (mix, res) in enumerate(zip(mixes, results)):
                    weights = {n: ({"transformer": w["high"], "transformer_2": w["low"]} if isinstance(w, dict) else w)
                               for n, w in mix.items()}
                    want = library(tmp_path, weights, 5 + i)
                    assert np.abs(np.clip(res.images[0], 0, 1) - want).max() <= 1e-3, f"round {r}, request {i}"
        assert backend.frame_count == graphs >= 1  # compiled once, in round 0
    finally:
        dynamo.reset()


def test_a_pair_folder_is_one_lora_each_file_on_its_expert(tmp_path, library):
    """``--lora-dir/lightning/{high,low}.safetensors`` (a Lightning-style pair: two files with the same keys, one
    per expert) is served as ``lightning``; a split request equals ``load_lora_weights(high=, low=)`` with
    per-expert ``set_adapters``; on a one-denoiser pipeline the pair is a 422."""
    base = tiny_2026_pipeline("wan22-a14b")
    (tmp_path / "loras" / "lightning").mkdir(parents=True)
    for side, seed in (("high", 5), ("low", 6)):  # both files name `transformer` modules, as real pairs do
        _lora(tmp_path / "loras" / "lightning" / f"{side}.safetensors", base, seed, experts=("transformer",))
    pipe = DiffusionPipeline(base)
    pipe.set_progress_bar_config(disable=True)
    app = create_app(pipe, ServeSettings(lora_dir=tmp_path / "loras", token="t"))
    with TestClient(app) as client:
        assert [row["name"] for row in client.get("/v1/loras", headers=AUTH).json()["loras"]] == ["lightning"]
        body = {**BODY, "loras": {"lightning": {"high": 1.0, "low": 0.4}}}
        got = _png(client.post("/v1/images", json=body, headers=AUTH))
    ref = DiffusionPipeline(tiny_2026_pipeline("wan22-a14b"))
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(high=str(tmp_path / "loras" / "lightning" / "high.safetensors"),
                          low=str(tmp_path / "loras" / "lightning" / "low.safetensors"), adapter_name="lightning")
    ref.set_adapters(["lightning"], [{"transformer": 1.0, "transformer_2": 0.4}])
    out = ref(prompt="a red circle", num_inference_steps=4, width=16, height=16, output_type="np",
              generator=np.random.Generator(np.random.PCG64(3)))
    assert np.abs(got - np.clip(np.asarray(first_picture(out), dtype=np.float32), 0, 1)).max() <= LEVEL
    one = create_app(DiffusionPipeline(tiny_2026_pipeline("wan")),
                     ServeSettings(lora_dir=tmp_path / "loras", token="t"))
    with TestClient(one) as client:
        r = client.post("/v1/images", json={**BODY, "loras": {"lightning": 1.0}}, headers=AUTH)
        assert r.status_code == 422 and "one denoiser" in r.text, r.text
