"""The rows of the shared family suite (tests/families/test_families.py): one ``FamilySpec`` per model family.

Adding a family is adding a row to ``FAMILIES``: a function that builds its tiny pipeline offline (in
``lorablend.fixtures``), the suffixes of the denoiser / text-encoder layers its test LoRAs cover (real module names,
every block that has them), and the keyword diffusers takes the call-time LoRA scale in. Nothing else: the suite's
properties run on every row. Set ``oracle_reads_file=False`` where diffusers + PEFT cannot load a PEFT-named file of
that family (the parity test then says so and skips; every other property still runs).

>>> [spec.name for spec in FAMILIES][:2]
['sd1', 'sdxl']
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from lorablend.fixtures.tiny_transformers import tiny_flux_pipeline, tiny_sd3_pipeline
from lorablend.fixtures.tiny_unets import tiny_pipeline
from lorablend.naming import denoiser_component

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "conv2")
FLUX_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "proj_mlp", "proj_out",
                "ff.net.2", "ff_context.net.0.proj", "norm1.linear", "norm.linear")
SD3_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "to_add_out", "ff.net.2", "ff_context.net.0.proj",
               "norm1.linear", "norm1_context.linear")
TEXT_TARGETS = ("q_proj", "v_proj")


@dataclass(frozen=True)
class FamilySpec:
    """One family of the suite: its name, its tiny pipeline and what its test LoRAs touch."""

    name: str
    build: Callable[[], Any]  # -> a tiny fp32 diffusers pipeline, built offline (deterministic)
    targets: tuple[str, ...]  # suffixes of the denoiser's Linear / Conv2d names the LoRAs cover
    scale_kwarg: str  # where diffusers takes the call-time scale: cross_attention_kwargs / joint_attention_kwargs
    text_targets: tuple[str, ...] = TEXT_TARGETS  # suffixes in the first text encoder (() for none)
    oracle_reads_file: bool = True  # diffusers + PEFT load the suite's PEFT-named files for this family

    def lora_file(self, pipe: Any, path: Path, seed: int, rank: int = 4) -> str:
        """A diffusers / PEFT-named LoRA file over the targets of ``pipe`` (random, seeded), written to ``path``."""
        g, sd = torch.Generator().manual_seed(seed), {}
        covered = [(denoiser_component(pipe), self.targets), ("text_encoder", self.text_targets)]
        for component, suffixes in covered:
            for name, m in getattr(pipe, component).named_modules():
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(suffixes):
                    fan_in, kernel = m.weight.shape[1], tuple(m.weight.shape[2:])
                    sd[f"{component}.{name}.lora_A.weight"] = torch.randn(rank, fan_in, *kernel, generator=g) * 0.2
                    sd[f"{component}.{name}.lora_B.weight"] = (
                        torch.randn(m.weight.shape[0], rank, *(1,) * len(kernel), generator=g) * 0.2)
        save_file(sd, str(path))
        return str(path)


FAMILIES = [
    FamilySpec("sd1", lambda: tiny_pipeline("sd1"), UNET_TARGETS, "cross_attention_kwargs"),
    FamilySpec("sdxl", lambda: tiny_pipeline("sdxl"), UNET_TARGETS, "cross_attention_kwargs"),
    FamilySpec("flux", tiny_flux_pipeline, FLUX_TARGETS, "joint_attention_kwargs"),
    FamilySpec("sd3", tiny_sd3_pipeline, SD3_TARGETS, "joint_attention_kwargs"),
    FamilySpec("sd35-medium", lambda: tiny_sd3_pipeline(variant="sd35-medium"), SD3_TARGETS,
               "joint_attention_kwargs"),
]
