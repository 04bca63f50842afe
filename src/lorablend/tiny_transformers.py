"""Tiny Flux.1 and SD3 diffusers pipelines built offline from config numbers, with random weights.

The numbers follow diffusers' own pipeline tests (``tests/pipelines/flux/test_pipeline_flux.py``,
``tests/pipelines/stable_diffusion_3/test_pipeline_stable_diffusion_3.py``): a transformer with the real module
tree at a few channels wide, CLIP text encoders 32 wide, a T5 encoder 32 wide, a one-block VAE. Module names are
the real models' (``transformer_blocks.N.attn.to_q``, ``single_transformer_blocks.N.proj_mlp``, …), so a LoRA file
with real names for the blocks that exist here loads onto it. The T5 tokenizer is generated (a word-piece-free
character vocabulary), like the CLIP one in ``demo.tiny_tokenizer``: nothing is downloaded.

>>> pipe = tiny_flux_pipeline()                                                   # doctest: +SKIP
>>> pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="np").images.shape  # doctest: +SKIP
(1, 32, 32, 3)
"""

from __future__ import annotations

import torch

FLUX_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 4,
    "num_layers": 2,  # double blocks (FLUX.1-dev: 19)
    "num_single_layers": 2,  # single blocks (FLUX.1-dev: 38)
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,  # = the T5 width
    "pooled_projection_dim": 32,  # = the CLIP projection
    "axes_dims_rope": [4, 4, 8],  # sums to attention_head_dim
}
SD3_TRANSFORMER = {
    "sample_size": 32,
    "patch_size": 1,
    "in_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "caption_projection_dim": 32,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 64,  # CLIP-L + CLIP-G pooled, 32 each
    "out_channels": 4,
}
T5_ENCODER = {
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 37,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "vocab_size": 1000,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": False,
    "decoder_start_token_id": 0,
    "pad_token_id": 0,
    "eos_token_id": 1,
}
FLUX_VAE = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (4,),
    "layers_per_block": 1,
    "latent_channels": 1,
    "norm_num_groups": 1,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "shift_factor": 0.0609,
    "scaling_factor": 1.5035,
}


def tiny_t5_tokenizer():
    """A T5-style fast tokenizer built in memory: one token per character (ids below 300), ``</s>`` appended.

    >>> tiny_t5_tokenizer()("ab").input_ids
    [99, 100, 1]
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({chr(i): i + 2 for i in range(1, 256) if chr(i) not in vocab})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")  # (an empty pattern never advances)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)


def _clip(seed: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .demo import CLIP_TEXT

    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(CLIPTextConfig(**CLIP_TEXT))


def _t5(seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(**T5_ENCODER))


def _vae(seed: int, **overrides):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**{**FLUX_VAE, **overrides})


def _finish(pipe, torch_dtype: torch.dtype):
    # Models built from a config start in training mode, and T5 has dropout 0.1: eval() as from_pretrained does,
    # or every call draws other dropout masks (images then differ by ~2e-3 between two identical calls).
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe if torch_dtype == torch.float32 else pipe.to(dtype=torch_dtype)


def tiny_flux_pipeline(*, seed: int = 0, kontext: bool = False, torch_dtype: torch.dtype = torch.float32):
    """A tiny ``FluxPipeline`` (or ``FluxKontextPipeline``): 2 double + 2 single blocks, CLIP-L and T5 32 wide.

    >>> type(tiny_flux_pipeline(kontext=True)).__name__                    # doctest: +SKIP
    'FluxKontextPipeline'
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline, FluxTransformer2DModel

    from .demo import tiny_tokenizer

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**FLUX_TRANSFORMER)
    cls = FluxKontextPipeline if kontext else FluxPipeline
    pipe = cls(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(seed),
        text_encoder=_clip(seed, with_projection=False),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=_t5(seed),
        tokenizer_2=tiny_t5_tokenizer(),
        transformer=transformer,
    )
    return _finish(pipe, torch_dtype)


def tiny_sd3_pipeline(*, seed: int = 0, torch_dtype: torch.dtype = torch.float32):
    """A tiny ``StableDiffusion3Pipeline``: 2 joint blocks, CLIP-L and CLIP-G 32 wide, T5 32 wide.

    >>> type(tiny_sd3_pipeline()).__name__                                 # doctest: +SKIP
    'StableDiffusion3Pipeline'
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from .demo import tiny_tokenizer

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**SD3_TRANSFORMER)
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(seed, latent_channels=4),
        text_encoder=_clip(seed, with_projection=True),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=_clip(seed + 1, with_projection=True),
        tokenizer_2=tiny_tokenizer(),
        text_encoder_3=_t5(seed),
        tokenizer_3=tiny_t5_tokenizer(),
        transformer=transformer,
    )
    return _finish(pipe, torch_dtype)


__all__ = ["FLUX_TRANSFORMER", "SD3_TRANSFORMER", "T5_ENCODER", "tiny_flux_pipeline", "tiny_sd3_pipeline",
           "tiny_t5_tokenizer"]
