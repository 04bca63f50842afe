"""serve/batch.py: what a request asks for (Generation), which requests run as one batch (batch_key), progress."""

from __future__ import annotations

from types import SimpleNamespace

from lorablend.serve.batch import Generation, Progress, batch_key


def _entry(name, low_rank=True):
    return SimpleNamespace(name=name, version=1, low_rank=low_rank)


def test_images_share_the_requests_generator_or_each_take_seed_plus_i():
    assert Generation("a cat", seed=3, steps=2).seeds(3) == [3, 3, 3]  # one generator, drawn in order
    assert Generation("a cat", seed=3, steps=2, seed_per_image=True).seeds(3) == [3, 4, 5]  # A1111's all_seeds


def test_equal_settings_and_mixes_batch_together_and_other_settings_never():
    a = Generation("a cat", seed=1, steps=2, loras={"ink": 0.5})
    b = Generation("a dog", seed=9, steps=2, loras={"ink": 0.5})
    c = Generation("a dog", seed=9, steps=3, loras={"ink": 0.5})
    ink = [_entry("ink")]
    assert batch_key(a, ink, mixed=False) == batch_key(b, ink, mixed=False) != batch_key(c, ink, mixed=False)
    assert batch_key(Generation("x", 1, 2, negative_prompt=""), [], mixed=False) != batch_key(
        Generation("x", 1, 2), [], mixed=False)  # None and "" encode differently (SDXL)


def test_other_mixes_batch_together_only_when_every_adapter_takes_per_sample_weights():
    a = Generation("a", seed=1, steps=2, loras={"ink": 0.5})
    b = Generation("a", seed=1, steps=2, loras={"ink": 1.0})
    assert batch_key(a, [_entry("ink")], mixed=True) == batch_key(b, [_entry("ink")], mixed=True)
    assert batch_key(a, [_entry("ink")], mixed=False) != batch_key(b, [_entry("ink")], mixed=False)
    loha = [_entry("ink", low_rank=False)]
    assert batch_key(a, loha, mixed=True) != batch_key(b, loha, mixed=True)


def test_the_eta_follows_the_pace_so_far():
    assert Progress(steps=20, done=5, started=0.0).eta(now=10.0) == 30.0
    assert Progress(steps=20, done=0, started=0.0).eta(now=10.0) == 0.0
