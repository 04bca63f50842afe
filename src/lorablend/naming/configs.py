"""Architecture numbers of the standard SD1.x, SD2.x and SDXL models (no weights).

The SD1.5 and SDXL values are those of the published ``config.json`` files (runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-xl-base-1.0); SD2.1 those of stabilityai/stable-diffusion-2-1. Only the
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

# family -> (unet config, [(component, text config, with_projection)])
STANDARD = {
    "sd1": (SD1_UNET, [("text_encoder", CLIP_L, False)]),
    "sd2": (SD2_UNET, [("text_encoder", OPENCLIP_H, False)]),
    "sdxl": (SDXL_UNET, [("text_encoder", CLIP_L, False), ("text_encoder_2", OPENCLIP_BIGG, True)]),
}
