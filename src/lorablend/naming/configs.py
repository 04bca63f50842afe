"""Architecture numbers of the standard models (no weights): SD1.x, SD2.x, SDXL, Flux.1, SD3 and SD3.5, and the
2025-26 transformers: Qwen-Image, Wan 2.1 / 2.2, Flux.2 (dev, klein 4B / 9B), Z-Image and Chroma.

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

# --- the 2025-26 transformers (issue 19): their denoisers only. No LoRA layout in the material touches their text
# encoders (Qwen2.5-VL, UMT5, Mistral / Qwen3, T5), so none is built: a text-encoder key of these families is
# reported as a layer the model data lacks, never mapped by guess. Numbers: the real config.json files in
# ../shared/realdata/newfamily_loras/2026/configs/<model>/ (each with its SOURCE.md); fields that do not shape a
# module (rope, eps, theta) are left at diffusers' defaults.
QWEN_IMAGE_TRANSFORMER = {  # Qwen/Qwen-Image (also Qwen-Image-Edit / Edit-2509: the same tree)
    "attention_head_dim": 128, "guidance_embeds": False, "in_channels": 64, "joint_attention_dim": 3584,
    "num_attention_heads": 24, "num_layers": 60, "out_channels": 16, "patch_size": 2,
}
_WAN_COMMON = {"attention_head_dim": 128, "cross_attn_norm": True, "freq_dim": 256, "out_channels": 16,
               "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "text_dim": 4096}
WAN_1_3B_TRANSFORMER = {**_WAN_COMMON, "added_kv_proj_dim": None, "ffn_dim": 8960, "in_channels": 16,
                        "num_attention_heads": 12, "num_layers": 30}  # Wan 2.1 T2V 1.3B
# Wan 2.1 T2V 14B; Wan 2.2 T2V A14B and I2V A14B (each expert: the same Linear tree, the I2V patch embedding
# reads 36 channels, a Conv3d no LoRA layout adapts)
WAN_14B_TRANSFORMER = {**_WAN_COMMON, "added_kv_proj_dim": None, "ffn_dim": 13824, "in_channels": 16,
                       "num_attention_heads": 40, "num_layers": 40}
# Wan 2.1 I2V 14B (480p / 720p) and FLF2V 14B: the CLIP image branch (k_img / v_img / norm_k_img, img_emb)
WAN_I2V_14B_TRANSFORMER = {**WAN_14B_TRANSFORMER, "added_kv_proj_dim": 5120, "image_dim": 1280, "in_channels": 36}
WAN_5B_TRANSFORMER = {**_WAN_COMMON, "added_kv_proj_dim": None, "ffn_dim": 14336, "in_channels": 48,
                      "num_attention_heads": 24, "num_layers": 30, "out_channels": 48}  # Wan 2.2 TI2V 5B
_FLUX2_COMMON = {"attention_head_dim": 128, "in_channels": 128, "mlp_ratio": 3.0, "patch_size": 1,
                 "timestep_guidance_channels": 256}
FLUX2_DEV_TRANSFORMER = {**_FLUX2_COMMON, "joint_attention_dim": 15360, "num_attention_heads": 48, "num_layers": 8,
                         "num_single_layers": 48, "guidance_embeds": True}
FLUX2_KLEIN_4B_TRANSFORMER = {**_FLUX2_COMMON, "joint_attention_dim": 7680, "num_attention_heads": 24,
                              "num_layers": 5, "num_single_layers": 20, "guidance_embeds": False}
FLUX2_KLEIN_9B_TRANSFORMER = {**_FLUX2_COMMON, "joint_attention_dim": 12288, "num_attention_heads": 32,
                              "num_layers": 8, "num_single_layers": 24, "guidance_embeds": False}
Z_IMAGE_TRANSFORMER = {  # Tongyi-MAI/Z-Image(-Turbo)
    "all_f_patch_size": [1], "all_patch_size": [2], "cap_feat_dim": 2560, "dim": 3840, "in_channels": 16,
    "n_heads": 30, "n_kv_heads": 30, "n_layers": 30, "n_refiner_layers": 2, "qk_norm": True,
}
# lodestones/Chroma: no config in the material; diffusers' ChromaTransformer2DModel defaults are Chroma's numbers
# (FLUX.1-schnell's tree without the modulation Linears, plus the 5-layer distilled guidance approximator)
CHROMA_TRANSFORMER = {
    "approximator_hidden_dim": 5120, "approximator_layers": 5, "approximator_num_channels": 64,
    "attention_head_dim": 128, "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24,
    "num_layers": 19, "num_single_layers": 38, "patch_size": 1,
}
NEW_TRANSFORMERS = {  # family -> (config, architecture: naming.meta builds it, naming.fused names it)
    "qwen-image": (QWEN_IMAGE_TRANSFORMER, "qwen"),
    "wan-1.3b": (WAN_1_3B_TRANSFORMER, "wan"),
    "wan-14b": (WAN_14B_TRANSFORMER, "wan"),
    "wan-i2v-14b": (WAN_I2V_14B_TRANSFORMER, "wan"),
    "wan-5b": (WAN_5B_TRANSFORMER, "wan"),
    "flux2-dev": (FLUX2_DEV_TRANSFORMER, "flux2"),
    "flux2-klein-4b": (FLUX2_KLEIN_4B_TRANSFORMER, "flux2"),
    "flux2-klein-9b": (FLUX2_KLEIN_9B_TRANSFORMER, "flux2"),
    "z-image": (Z_IMAGE_TRANSFORMER, "zimage"),
    "chroma": (CHROMA_TRANSFORMER, "chroma"),
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
STANDARD.update({family: (config, []) for family, (config, _) in NEW_TRANSFORMERS.items()})
# the architecture of each family's denoiser, by the name naming.meta builds it from ("unet" where absent)
DENOISER_ARCHITECTURES = {"flux": "flux", "sd3": "sd3", "sd35-medium": "sd3", "sd35-large": "sd3",
                          **{family: arch for family, (_, arch) in NEW_TRANSFORMERS.items()}}

# each denoiser architecture's component and diffusers class (naming.meta builds it; naming.index tells it apart)
DENOISER_CLASSES = {"unet": ("unet", "UNet2DConditionModel"), "flux": ("transformer", "FluxTransformer2DModel"),
                    "sd3": ("transformer", "SD3Transformer2DModel"),
                    "qwen": ("transformer", "QwenImageTransformer2DModel"),
                    "wan": ("transformer", "WanTransformer3DModel"),
                    "flux2": ("transformer", "Flux2Transformer2DModel"),
                    "zimage": ("transformer", "ZImageTransformer2DModel"),
                    "chroma": ("transformer", "ChromaTransformer2DModel")}
