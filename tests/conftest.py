"""Shared fixtures: tiny SD1.5 and SDXL diffusers pipelines (built once per session), random LoRAs, the PEFT oracle.

The session pipelines are never mutated: a test that loads, fuses or moves anything takes a copy through
``make_pipe(family)`` (a deep copy: a few milliseconds). ``GEN_KW`` are the fast generation settings
(2 steps, 32x32 images, numpy output).
"""

from __future__ import annotations

import copy
import logging
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lorablend.fixtures.tiny_unets import random_adapter, tiny_pipeline

# the tests' shared helpers (realdata, hostile_corpus, serve_support, ...) import by their plain names
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

GEN_KW = dict(prompt="a bowl of ramen shaped like a bear", num_inference_steps=2, output_type="np", height=32, width=32)


def pytest_configure(config):
    # diffusers/transformers/peft log load reports and warnings at length on every oracle load.
    for name in ("diffusers", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*peft_config.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - older transformers
        pass


@pytest.fixture(scope="session")
def tiny_pipes() -> dict:
    """{"sd1": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}, fp32, built once. Do not mutate."""
    return {"sd1": tiny_pipeline("sd1"), "sdxl": tiny_pipeline("sdxl")}


@pytest.fixture
def make_pipe(tiny_pipes):
    """``make_pipe("sd1")`` -> a fresh deep copy of the session pipeline that a test may change freely."""

    def make(family: str = "sd1", dtype: torch.dtype = torch.float32):
        pipe = copy.deepcopy(tiny_pipes[family])
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)

    return make


@pytest.fixture
def make_adapter(tiny_pipes):
    """``make_adapter("sd1", "a", seed=1, ...)`` -> a random LoRA Adapter for the tiny pipeline of that family."""

    def make(family: str, name: str, **kwargs):
        return random_adapter(tiny_pipes[family], name, **kwargs)

    return make


def peft_state_dict(adapter) -> dict[str, torch.Tensor]:
    """The diffusers/PEFT-format state dict of a LowRankDelta adapter (``<target key>.lora_A/B.weight``).

    With no alpha in the dict, diffusers gives every module ``lora_alpha = r`` (scale 1), so an adapter
    must have ``alpha`` None or equal to its rank to compare.
    """
    out = {}
    for key, d in adapter.deltas.items():
        assert d.alpha in (None, d.rank), "diffusers-format dicts carry no alpha: use alpha=None or rank"
        out[f"{key}.lora_A.weight"] = d.down.clone()
        out[f"{key}.lora_B.weight"] = d.up.clone()
    return out


def params_of(pipe) -> dict[str, torch.Tensor]:
    """Every parameter of the adaptable components, cloned: ``{component.name: tensor}``."""
    out = {}
    for comp in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
        model = getattr(pipe, comp, None)
        if model is not None:
            out.update({f"{comp}.{n}": p.detach().clone() for n, p in model.named_parameters()})
    return out


# Bits are claimed only for tensors we write (weights after unfuse, fused weights, files). Anything computed from
# them (images, activations, a dense ΔW from factors) on tensors at other addresses, by other kernels or thread
# counts, differs in its last bits between CPUs (1.4e-6 on an image seen on an AMD EPYC), so it is compared with
# this tolerance: far above rounding noise, far below any real change of weights (LoRA effects here are ≥ 1e-3).
COMPUTED_TOL = dict(rtol=1e-5, atol=1e-5)


def assert_same_computed(got, expected, msg: str = "") -> None:
    """Two results computed from bit-equal weights (images, activations, ΔW) agree within COMPUTED_TOL."""
    got = torch.as_tensor(got, dtype=torch.float64) if not isinstance(got, torch.Tensor) else got.double()
    expected = torch.as_tensor(expected, dtype=torch.float64) if not isinstance(expected, torch.Tensor) else expected.double()
    torch.testing.assert_close(got, expected, **COMPUTED_TOL, msg=msg or None)


def assert_params_equal(pipe, reference: dict[str, torch.Tensor]) -> None:
    now = params_of(pipe)
    assert now.keys() == reference.keys()
    bad = [k for k in now if not torch.equal(now[k], reference[k])]
    assert not bad, f"{len(bad)} parameters changed, e.g. {bad[:3]}"
