"""Architecture numbers of the standard models (no weights): SD1.x, SD2.x, SDXL, Flux.1, SD3 and SD3.5.

The SD1.5 and SDXL values are those of the published ``config.json`` files (runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-xl-base-1.0); SD2.1 those of stabilityai/stable-diffusion-2-1; FLUX.1-dev those of
black-forest-labs/FLUX.1-dev (``../shared/realdata/configs/flux1-dev``); SD3 / SD3.5 and T5 see their comments. Only the
fields that shape the module tree are kept: ``scripts/make_family_data.py`` builds the models from them on the
meta device and writes their modules to ``naming/families/*.json``, so names always come from the real module
trees, never from string guessing, and offline work reads the files without building anything. Change a
number here, then regenerate the files (``tests/test_naming_family_data.py`` fails until they agree).
"""

from __future__ import annotations

SD1_UNET = {
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2,
    "in_channels": 4,
    "out_channels": 4,
    "sample_size": 64,
}

SD2_UNET = {
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2,
    "in_channels": 4,
    "out_channels": 4,
    "sample_size": 96,
    "use_linear_projection": True,
}

SDXL_UNET = {
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
    "in_channels": 4,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
}

CLIP_L = {  # SD1.x text_encoder and SDXL text_encoder (openai/clip-vit-large-patch14)
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "vocab_size": 49408,
    "max_position_embeddings": 77,
}

OPENCLIP_H = {  # SD2.x text_encoder (OpenCLIP ViT-H/14, penultimate layer dropped: 23 layers)
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
    "hidden_act": "gelu",
    "vocab_size": 49408,
    "max_position_embeddings": 77,
}

OPENCLIP_BIGG = {  # SDXL text_encoder_2 (OpenCLIP ViT-bigG/14, CLIPTextModelWithProjection)
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "hidden_act": "gelu",
    "vocab_size": 49408,
    "max_position_embeddings": 77,
}

# black-forest-labs/FLUX.1-dev transformer/config.json (schnell: guidance_embeds false, else the same tree;
# Kontext-dev: the same numbers). Fields left at diffusers' defaults there (out_channels, axes_dims_rope) are
# not repeated: they do not change a module's name or shape.
FLUX_DEV_TRANSFORMER = {
    "attention_head_dim": 128,
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}

# stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json. The SD3.5 numbers are those of
# stabilityai/stable-diffusion-3.5-medium and -3.5-large transformer/config.json, as mirrored verbatim in public
# code that builds the models offline (e.g. GitHub search for '"caption_projection_dim": 2432' / '"dual_attention_layers":
# [0, 1, …, 12]'); SD3.5 medium adds the second ("dual") attention in layers 0-12 and both add RMS q/k norms.
SD3_MEDIUM_TRANSFORMER = {
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "sample_size": 128,
}
SD35_MEDIUM_TRANSFORMER = {
    **SD3_MEDIUM_TRANSFORMER,
    "dual_attention_layers": list(range(13)),
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
}
SD35_LARGE_TRANSFORMER = {
    **SD3_MEDIUM_TRANSFORMER,
    "caption_projection_dim": 2432,
    "num_attention_heads": 38,
    "num_layers": 38,
    "qk_norm": "rms_norm",
}

# google/t5-v1_1-xxl as shipped in FLUX.1-dev/text_encoder_2 and SD3's text_encoder_3 (T5EncoderModel): only the
# fields that shape its module tree.
T5_XXL = {
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "feed_forward_proj": "gated-gelu",
    "vocab_size": 32128,
    "relative_attention_num_buckets": 32,
}

# family -> (denoiser config, [(component, text config, encoder)]); encoder: False CLIPTextModel, True
# CLIPTextModelWithProjection, "t5" T5EncoderModel. The denoiser's class is DENOISER_ARCHITECTURES[family] ("unet" if absent).
STANDARD = {
    "sd1": (SD1_UNET, [("text_encoder", CLIP_L, False)]),
    "sd2": (SD2_UNET, [("text_encoder", OPENCLIP_H, False)]),
    "sdxl": (SDXL_UNET, [("text_encoder", CLIP_L, False), ("text_encoder_2", OPENCLIP_BIGG, True)]),
    "flux": (FLUX_DEV_TRANSFORMER, [("text_encoder", CLIP_L, False), ("text_encoder_2", T5_XXL, "t5")]),
    **{
        family: (config, [("text_encoder", CLIP_L, True), ("text_encoder_2", OPENCLIP_BIGG, True),
                          ("text_encoder_3", T5_XXL, "t5")])
        for family, config in (("sd3", SD3_MEDIUM_TRANSFORMER), ("sd35-medium", SD35_MEDIUM_TRANSFORMER),
                               ("sd35-large", SD35_LARGE_TRANSFORMER))
    },
}
# the architecture of each family's denoiser, by the name naming.meta builds it from ("unet" where absent)
DENOISER_ARCHITECTURES = {"flux": "flux", "sd3": "sd3", "sd35-medium": "sd3", "sd35-large": "sd3"}
