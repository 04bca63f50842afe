"""Seeded noise from numpy generators for diffusers pipelines: the same seed gives the same initial latents on
every device, for images and videos, whichever shape (packed or not, with frames or not) a pipeline draws.

``DiffusionPipeline.__call__`` uses these when given a ``np.random.Generator`` (or one per image).

>>> host_normal(np.random.Generator(np.random.PCG64(0)), 2, (3,)).shape
(2, 3)
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import numpy as np
import torch


def is_numpy_generator(generator: Any) -> bool:
    """Whether ``generator`` is a numpy generator or a non-empty list of them (one per image).

    >>> is_numpy_generator([np.random.default_rng(0)]), is_numpy_generator(None)
    (True, False)
    """
    if isinstance(generator, np.random.Generator):
        return True
    return isinstance(generator, (list, tuple)) and bool(generator) and all(
        isinstance(g, np.random.Generator) for g in generator
    )


def host_normal(generator: Any, batch: int, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal noise ``(batch, *shape)`` from one numpy generator or one per image.

    >>> host_normal([np.random.default_rng(0), np.random.default_rng(1)], 2, (4,)).shape
    (2, 4)
    """
    if isinstance(generator, np.random.Generator):
        return generator.standard_normal((batch, *shape))
    if len(generator) != batch:
        raise ValueError(f"got {len(generator)} numpy generators for {batch} images; pass one per image")
    return np.stack([g.standard_normal(shape) for g in generator])


def seeded_for_the_rest(generator: Any, device: torch.device) -> torch.Generator:
    """A torch generator for what else a transformer pipeline draws (a control image's VAE sample), seeded from a
    child of the (first) numpy generator: the latents' stream stays the one the seed alone gives.

    >>> type(seeded_for_the_rest(np.random.default_rng(0), "cpu")).__name__
    'Generator'
    """
    first = generator if isinstance(generator, np.random.Generator) else generator[0]
    return torch.Generator(device=device).manual_seed(int(first.spawn(1)[0].integers(2**63)))


# prepare_latents' module global ``randn_tensor`` is swapped for the length of one prepare_latents call; one swap at a
# time, so two pipelines of one class generating in two threads never draw from each other's generator
_RANDN_SWAP = threading.Lock()


@contextlib.contextmanager
def host_noise_in_prepare_latents(pipe: Any, generator: Any):
    """For one call, the initial noise the pipeline's ``prepare_latents`` draws comes from ``generator`` on the host:
    diffusers' ``randn_tensor`` there is answered with ``generator.standard_normal(shape)`` in the very shape the
    pipeline asks for — before it packs 2×2 patches (Flux, Chroma, Qwen-Image, Flux.2), with the frames axis of a
    video (Wan), after a Kontext image's auto-resize — so each pipeline's latents come from the seed alone.

    >>> with host_noise_in_prepare_latents(pipe, np.random.default_rng(0)):        # doctest: +SKIP
    ...     frames = pipe("a cat", num_frames=5).frames
    """
    original, host = pipe.prepare_latents, generator
    namespace = original.__func__.__globals__
    if "randn_tensor" not in namespace:
        raise TypeError(f"{type(pipe).__name__}.prepare_latents draws no randn_tensor; pass a torch.Generator instead")

    def host_randn(shape: Any, generator: Any = None, device: Any = None, dtype: Any = None, **_: Any):
        noise = torch.from_numpy(host_normal(host, int(shape[0]), tuple(int(n) for n in shape[1:])))
        return noise.to(device=device, dtype=dtype)

    def prepare_latents(*args: Any, **kwargs: Any):
        with _RANDN_SWAP:
            drawn_by = namespace["randn_tensor"]
            namespace["randn_tensor"] = host_randn
            try:
                return original(*args, **kwargs)
            finally:
                namespace["randn_tensor"] = drawn_by

    pipe.__dict__["prepare_latents"] = prepare_latents  # (an instance attribute: the class's method stays)
    try:
        yield
    finally:
        pipe.__dict__.pop("prepare_latents", None)


__all__ = ["host_noise_in_prepare_latents", "host_normal", "is_numpy_generator", "seeded_for_the_rest"]
