"""The rows of the shared family suite (tests/families/test_families.py): one ``FamilySpec`` per model family.

Adding a family is adding a row to ``FAMILIES``: a function that builds its tiny pipeline offline (in
``lorablend.fixtures``), the suffixes of the denoiser / text-encoder layers its test LoRAs cover (real module names,
every block that has them), the keyword diffusers takes the call-time LoRA scale in, and what a call of that
pipeline needs beyond the suite's own arguments (``call_kwargs``: an input image, a size the VAE divides). Nothing
else: the suite's properties run on every row. Set ``oracle_reads_file=False`` where diffusers + PEFT cannot load a
PEFT-named file of that family (the parity test then says so and skips; every other property still runs).

>>> [spec.name for spec in FAMILIES][:2]
['sd1', 'sdxl']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from lorablend.fixtures.tiny_2026 import call_kwargs, input_image, tiny_2026_pipeline
from lorablend.fixtures.tiny_transformers import tiny_flux_pipeline, tiny_sd3_pipeline
from lorablend.fixtures.tiny_unets import tiny_pipeline
from lorablend.naming import denoiser_component

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "conv2")
FLUX_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "proj_mlp", "proj_out",
                "ff.net.2", "ff_context.net.0.proj", "norm1.linear", "norm.linear")
SD3_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "to_add_out", "ff.net.2", "ff_context.net.0.proj",
               "norm1.linear", "norm1_context.linear")
TEXT_TARGETS = ("q_proj", "v_proj")
# the 2025-26 transformers (issue 19): attention, feed-forward and modulation Linears of every block; their LoRAs
# adapt the transformer only (diffusers' loaders of these families read no text-encoder keys)
QWEN_TARGETS = ("attn.to_q", "attn.to_k", "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "img_mlp.net.2",
                "txt_mlp.net.0.proj", "img_mod.1")
WAN_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
               "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2", "proj_out")
# Wan 2.1 I2V / FLF2V 14B: the CLIP image branch of cross-attention too (Wan's k_img / v_img)
WAN_I2V_TARGETS = (*WAN_TARGETS, "attn2.add_k_proj", "attn2.add_v_proj")
FLUX2_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_v_proj", "attn.to_out.0",
                 "attn.to_add_out", "attn.to_qkv_mlp_proj", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
                 "ff_context.linear_out", "attn.to_out", "proj_out")
ZIMAGE_TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
                  "feed_forward.w2", "adaLN_modulation.0")


@dataclass(frozen=True)
class FamilySpec:
    """One family of the suite: its name, its tiny pipeline and what its test LoRAs touch."""

    name: str
    build: Callable[[], Any]  # -> a tiny fp32 diffusers pipeline, built offline (deterministic)
    targets: tuple[str, ...]  # suffixes of the denoiser's Linear / Conv2d names the LoRAs cover
    scale_kwarg: str  # where diffusers takes the call-time scale: cross_attention_kwargs / joint_attention_kwargs
    text_targets: tuple[str, ...] = TEXT_TARGETS  # suffixes in the first text encoder (() for none)
    oracle_reads_file: bool = True  # diffusers + PEFT load the suite's PEFT-named files for this family
    call_kwargs: dict[str, Any] = field(default_factory=dict)  # added to (and over) the suite's call arguments

    def lora_file(self, pipe: Any, path: Path, seed: int, rank: int = 4) -> str:
        """A diffusers / PEFT-named LoRA file over the targets of ``pipe`` (random, seeded), written to ``path``."""
        g, sd = torch.Generator().manual_seed(seed), {}
        covered = [(denoiser_component(pipe), self.targets), ("text_encoder", self.text_targets)][:2 if self.text_targets else 1]
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
    FamilySpec("qwen-image", lambda: tiny_2026_pipeline("qwen"), QWEN_TARGETS, "attention_kwargs", ()),
    FamilySpec("wan", lambda: tiny_2026_pipeline("wan"), WAN_TARGETS, "attention_kwargs", ()),
    FamilySpec("wan22-a14b", lambda: tiny_2026_pipeline("wan22-a14b"), WAN_TARGETS, "attention_kwargs", ()),
    FamilySpec("wan22-ti2v-5b", lambda: tiny_2026_pipeline("wan22-ti2v-5b"), WAN_TARGETS, "attention_kwargs", ()),
    # image-to-video (WanImageToVideoPipeline): Wan 2.1 I2V 14B's structure, Wan 2.2 I2V A14B's two experts
    FamilySpec("wan-i2v", lambda: tiny_2026_pipeline("wan-i2v"), WAN_I2V_TARGETS, "attention_kwargs", (),
               call_kwargs={"image": input_image(32, 32)}),
    FamilySpec("wan22-i2v-a14b", lambda: tiny_2026_pipeline("wan22-i2v-a14b"), WAN_TARGETS, "attention_kwargs", (),
               call_kwargs={"image": input_image(32, 32)}),
    # Qwen-Image-Edit (QwenImageEditPipeline) and Edit-2509 (QwenImageEditPlusPipeline): Qwen-Image's transformer,
    # an input image through the text encoder's vision tower and the VAE; 128 x 128 px out
    FamilySpec("qwen-image-edit", lambda: tiny_2026_pipeline("qwen-edit"), QWEN_TARGETS, "attention_kwargs", (),
               call_kwargs=call_kwargs("qwen-edit")),
    FamilySpec("qwen-image-edit-2509", lambda: tiny_2026_pipeline("qwen-edit-2509"), QWEN_TARGETS,
               "attention_kwargs", (), call_kwargs=call_kwargs("qwen-edit-2509")),
    FamilySpec("flux2", lambda: tiny_2026_pipeline("flux2"), FLUX2_TARGETS, "attention_kwargs", ()),
    FamilySpec("flux2-klein", lambda: tiny_2026_pipeline("flux2-klein"), FLUX2_TARGETS, "attention_kwargs", ()),
    FamilySpec("z-image", lambda: tiny_2026_pipeline("zimage"), ZIMAGE_TARGETS, "joint_attention_kwargs", ()),
    FamilySpec("chroma", lambda: tiny_2026_pipeline("chroma"), FLUX_TARGETS, "joint_attention_kwargs", ()),
]
