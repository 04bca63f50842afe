"""images/noise.py: numpy-seeded initial noise in the shape each pipeline draws (packed or not, video frames)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from lorablend.fixtures.tiny_2026 import CALL_KW, tiny_2026_pipeline
from lorablend.images.noise import host_noise_in_prepare_latents, host_normal, is_numpy_generator


def _seed(seed: int = 0) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def test_one_generator_or_one_per_image():
    assert is_numpy_generator(_seed()) and is_numpy_generator([_seed(), _seed(1)])
    assert not is_numpy_generator([]) and not is_numpy_generator(torch.Generator())
    both = host_normal([_seed(0), _seed(1)], 2, (3, 4))
    assert np.array_equal(both[1], _seed(1).standard_normal((3, 4)))
    with pytest.raises(ValueError, match="one per image"):
        host_normal([_seed()], 2, (3,))


@pytest.mark.parametrize("family", ["wan", "zimage"])
def test_the_seed_gives_the_latents_the_pipeline_would_take(family):
    """Unpacked latents (a video's frames too): the seed's standard normals in the pipeline's own latent shape;
    the module's randn_tensor is diffusers' own again afterwards."""
    pipe = tiny_2026_pipeline(family)
    kw = CALL_KW[family]
    if family == "wan":
        frames = (kw["num_frames"] - 1) // pipe.vae_scale_factor_temporal + 1
        shape = (1, 16, frames, kw["height"] // pipe.vae_scale_factor_spatial, kw["width"] // pipe.vae_scale_factor_spatial)
    else:
        shape = (1, 16, 2 * (kw["height"] // (pipe.vae_scale_factor * 2)), 2 * (kw["width"] // (pipe.vae_scale_factor * 2)))
    namespace = type(pipe).prepare_latents.__globals__
    theirs = namespace["randn_tensor"]
    with host_noise_in_prepare_latents(pipe, _seed()):
        got = pipe(prompt="a cat", num_inference_steps=1, output_type="latent", **kw)
    assert namespace["randn_tensor"] is theirs and "prepare_latents" not in pipe.__dict__
    given = pipe(prompt="a cat", num_inference_steps=1, output_type="latent",
                 latents=torch.from_numpy(_seed().standard_normal(shape)).float(), **kw)
    key = "frames" if family == "wan" else "images"
    torch.testing.assert_close(getattr(got, key), getattr(given, key), rtol=0, atol=1e-6)


def test_two_threads_draw_each_from_its_own_seed():
    pipe = tiny_2026_pipeline("zimage")
    kw = dict(prompt="a cat", num_inference_steps=1, output_type="latent", **CALL_KW["zimage"])
    alone = {}
    for seed in (0, 1):
        with host_noise_in_prepare_latents(pipe, _seed(seed)):
            alone[seed] = pipe(**kw).images
    pipes = {seed: tiny_2026_pipeline("zimage") for seed in (0, 1)}
    got = {}

    def run(seed):
        with host_noise_in_prepare_latents(pipes[seed], _seed(seed)):
            got[seed] = pipes[seed](**kw).images

    threads = [threading.Thread(target=run, args=(s,)) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed in (0, 1):
        torch.testing.assert_close(got[seed], alone[seed], rtol=0, atol=1e-6)
