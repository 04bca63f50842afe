"""The original (BFL Flux, SAI MMDiT) names of transformer layers -> diffusers modules and the rows they take.

Flux and SD3 were released with their own module names (``double_blocks.3.img_attn.qkv``,
``joint_blocks.3.x_block.attn.qkv``) and trainers (kohya sd-scripts, ai-toolkit / ComfyUI, XLabs, LyCORIS, BFL's
control LoRAs) still write LoRAs in them. Several of those layers are *fused*: one weight whose output rows are
several diffusers modules (``qkv`` = ``to_q`` / ``to_k`` / ``to_v``; Flux ``single_blocks.N.linear1`` = q / k / v /
``proj_mlp``), and the final modulation stores its rows as (shift, scale) where diffusers' ``AdaLayerNormContinuous``
reads (scale, shift) (diffusers' ``swap_scale_shift`` in its Flux and SD3 converters). The double / single
block modulations (``img_mod.lin``, ``modulation.lin``, ``adaLN_modulation.1``) are in the same
shift / scale / gate order as diffusers' ``AdaLayerNormZero`` / ``AdaLayerNormZeroSingle`` / ``SD35AdaLayerNormZeroX``
chunks, so they map whole; SD3's last ``context_block`` is pre-only (``AdaLayerNormContinuous``), so it swaps too.

This module is that table, built from a transformer config: source name -> ``RowPiece``\\ s, each the diffusers
module path and the source rows that make its rows, in order (``None``: all of them). The reader takes a Delta's
rows with ``delta.take_rows(spans)`` (the kinds own how), so a LoRA over fused rows stays a LoRA, exactly.

>>> table = flux_source_names({"num_attention_heads": 2, "attention_head_dim": 4, "num_layers": 1,
...                            "num_single_layers": 1, "guidance_embeds": False})
>>> [(p.path, p.spans) for p in table["double_blocks.0.img_attn.qkv"]]
[('transformer_blocks.0.attn.to_q', ((0, 8),)), ('transformer_blocks.0.attn.to_k', ((8, 16),)), ('transformer_blocks.0.attn.to_v', ((16, 24),))]
>>> [(p.path, p.spans) for p in table["final_layer.adaLN_modulation.1"]]
[('norm_out.linear', ((8, 16), (0, 8)))]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

RowSpans = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class RowPiece:
    """One diffusers module (``path`` inside the transformer) and the source rows, in order, that are its rows
    (``spans``; ``None`` when it takes the source whole).

    >>> RowPiece("transformer_blocks.0.attn.to_k", ((8, 16),)).source_rows
    16
    """

    path: str
    spans: RowSpans | None = None

    @property
    def source_rows(self) -> int:
        """The least number of rows the source must have for this piece (0 when it takes the source whole)."""
        return max((stop for _, stop in self.spans), default=0) if self.spans else 0


SourceTable = dict[str, tuple[RowPiece, ...]]


def _whole(path: str) -> tuple[RowPiece, ...]:
    return (RowPiece(path),)


def _split(paths: list[str], sizes: list[int]) -> tuple[RowPiece, ...]:
    pieces, start = [], 0
    for path, size in zip(paths, sizes):
        pieces.append(RowPiece(path, ((start, start + size),)))
        start += size
    return tuple(pieces)


def _swapped(path: str, half: int) -> tuple[RowPiece, ...]:
    # source rows are (shift, scale); diffusers' AdaLayerNormContinuous reads (scale, shift)
    return (RowPiece(path, ((half, 2 * half), (0, half))),)


def _width(config: dict[str, Any]) -> int:
    return int(config["num_attention_heads"]) * int(config["attention_head_dim"])


def flux_source_names(config: dict[str, Any]) -> SourceTable:
    """BFL names of a Flux.1 transformer (also XLabs' ``processor.qkv_lora1`` … spellings) -> diffusers modules.

    >>> t = flux_source_names({"num_attention_heads": 24, "attention_head_dim": 128, "num_layers": 19,
    ...                        "num_single_layers": 38, "guidance_embeds": True})
    >>> [(p.path.split(".")[-1], p.spans) for p in t["single_blocks.0.linear1"]][-1]
    ('proj_mlp', ((9216, 21504),))
    """
    h = _width(config)
    mlp = 4 * h  # diffusers' FluxSingleTransformerBlock: mlp_ratio 4.0
    table: SourceTable = {}
    for i in range(int(config["num_layers"])):
        s, t = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        img_qkv = _split([t + "attn.to_q", t + "attn.to_k", t + "attn.to_v"], [h, h, h])
        txt_qkv = _split([t + "attn.add_q_proj", t + "attn.add_k_proj", t + "attn.add_v_proj"], [h, h, h])
        table.update({
            s + "img_attn.qkv": img_qkv, s + "processor.qkv_lora1": img_qkv,
            s + "txt_attn.qkv": txt_qkv, s + "processor.qkv_lora2": txt_qkv,
            s + "img_attn.proj": _whole(t + "attn.to_out.0"), s + "processor.proj_lora1": _whole(t + "attn.to_out.0"),
            s + "txt_attn.proj": _whole(t + "attn.to_add_out"), s + "processor.proj_lora2": _whole(t + "attn.to_add_out"),
            s + "img_mlp.0": _whole(t + "ff.net.0.proj"), s + "img_mlp.2": _whole(t + "ff.net.2"),
            s + "txt_mlp.0": _whole(t + "ff_context.net.0.proj"), s + "txt_mlp.2": _whole(t + "ff_context.net.2"),
            s + "img_mod.lin": _whole(t + "norm1.linear"), s + "txt_mod.lin": _whole(t + "norm1_context.linear"),
            s + "img_attn.norm.query_norm": _whole(t + "attn.norm_q"),
            s + "img_attn.norm.key_norm": _whole(t + "attn.norm_k"),
            s + "txt_attn.norm.query_norm": _whole(t + "attn.norm_added_q"),
            s + "txt_attn.norm.key_norm": _whole(t + "attn.norm_added_k"),
        })
    for i in range(int(config["num_single_layers"])):
        s, t = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        qkv = [t + "attn.to_q", t + "attn.to_k", t + "attn.to_v"]
        table.update({
            s + "linear1": _split([*qkv, t + "proj_mlp"], [h, h, h, mlp]),
            s + "processor.qkv_lora": _split(qkv, [h, h, h]),  # XLabs: the q/k/v rows of linear1 only
            s + "linear2": _whole(t + "proj_out"), s + "processor.proj_lora": _whole(t + "proj_out"),
            s + "modulation.lin": _whole(t + "norm.linear"),
            s + "norm.query_norm": _whole(t + "attn.norm_q"), s + "norm.key_norm": _whole(t + "attn.norm_k"),
        })
    embedders = {"time_in": "timestep_embedder", "vector_in": "text_embedder"}
    if config.get("guidance_embeds"):
        embedders["guidance_in"] = "guidance_embedder"
    for source, target in embedders.items():
        table[f"{source}.in_layer"] = _whole(f"time_text_embed.{target}.linear_1")
        table[f"{source}.out_layer"] = _whole(f"time_text_embed.{target}.linear_2")
    table.update({
        "img_in": _whole("x_embedder"), "txt_in": _whole("context_embedder"),
        "final_layer.linear": _whole("proj_out"),
        "final_layer.adaLN_modulation.1": _swapped("norm_out.linear", h),
    })
    return table


def sd3_source_names(config: dict[str, Any]) -> SourceTable:
    """SAI MMDiT names of an SD3 / SD3.5 transformer (kohya sd-scripts' SD3 LoRAs) -> diffusers modules.

    >>> t = sd3_source_names({"num_attention_heads": 24, "attention_head_dim": 64, "num_layers": 24})
    >>> [(p.path, p.spans) for p in t["joint_blocks.23.context_block.adaLN_modulation.1"]]
    [('transformer_blocks.23.norm1_context.linear', ((1536, 3072), (0, 1536)))]
    """
    h = _width(config)
    layers = int(config["num_layers"])
    dual = set(config.get("dual_attention_layers") or ())
    table: SourceTable = {}
    for i in range(layers):
        x, c, t = f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block.", f"transformer_blocks.{i}."
        table.update({
            x + "attn.qkv": _split([t + "attn.to_q", t + "attn.to_k", t + "attn.to_v"], [h, h, h]),
            x + "attn.proj": _whole(t + "attn.to_out.0"),
            x + "mlp.fc1": _whole(t + "ff.net.0.proj"), x + "mlp.fc2": _whole(t + "ff.net.2"),
            x + "adaLN_modulation.1": _whole(t + "norm1.linear"),
            x + "attn.ln_q": _whole(t + "attn.norm_q"), x + "attn.ln_k": _whole(t + "attn.norm_k"),
            c + "attn.qkv": _split([t + "attn.add_q_proj", t + "attn.add_k_proj", t + "attn.add_v_proj"], [h, h, h]),
            c + "attn.ln_q": _whole(t + "attn.norm_added_q"), c + "attn.ln_k": _whole(t + "attn.norm_added_k"),
        })
        if i in dual:
            table.update({
                x + "attn2.qkv": _split([t + "attn2.to_q", t + "attn2.to_k", t + "attn2.to_v"], [h, h, h]),
                x + "attn2.proj": _whole(t + "attn2.to_out.0"),
                x + "attn2.ln_q": _whole(t + "attn2.norm_q"), x + "attn2.ln_k": _whole(t + "attn2.norm_k"),
            })
        if i < layers - 1:
            table.update({
                c + "attn.proj": _whole(t + "attn.to_add_out"),
                c + "mlp.fc1": _whole(t + "ff_context.net.0.proj"), c + "mlp.fc2": _whole(t + "ff_context.net.2"),
                c + "adaLN_modulation.1": _whole(t + "norm1_context.linear"),
            })
        else:  # the last context block is pre-only: AdaLayerNormContinuous, (scale, shift) in diffusers
            table[c + "adaLN_modulation.1"] = _swapped(t + "norm1_context.linear", h)
    table.update({
        "x_embedder.proj": _whole("pos_embed.proj"), "context_embedder": _whole("context_embedder"),
        "t_embedder.mlp.0": _whole("time_text_embed.timestep_embedder.linear_1"),
        "t_embedder.mlp.2": _whole("time_text_embed.timestep_embedder.linear_2"),
        "y_embedder.mlp.0": _whole("time_text_embed.text_embedder.linear_1"),
        "y_embedder.mlp.2": _whole("time_text_embed.text_embedder.linear_2"),
        "final_layer.linear": _whole("proj_out"),
        "final_layer.adaLN_modulation.1": _swapped("norm_out.linear", h),
    })
    return table


def wan_source_names(config: dict[str, Any]) -> SourceTable:
    """Wan 2.1 / 2.2's own names (Wan-Video, musubi-tuner, DiffSynth-Studio, ComfyUI / lightx2v / Kijai files) ->
    diffusers' ``WanTransformer3DModel``. Nothing is fused; the names differ: ``self_attn`` / ``cross_attn`` are
    ``attn1`` / ``attn2``, the I2V image keys ``k_img`` / ``v_img`` / ``norm_k_img`` are ``add_k_proj`` /
    ``add_v_proj`` / ``norm_added_k``, ``norm3`` (the affine norm before cross-attention) is diffusers' ``norm2``,
    ``head.head`` is ``proj_out`` (diffusers' ``_convert_non_diffusers_wan_lora_to_diffusers`` and its model converter);
    a block's and the head's ``modulation`` table is ``scale_shift_table`` (distillation LoRAs name it by its owner:
    ``blocks.N.diff_m``, ``head.diff_m``).

    >>> t = wan_source_names({"num_layers": 1})
    >>> t["blocks.0.cross_attn.k_img"][0].path, t["head.head"][0].path
    ('blocks.0.attn2.add_k_proj', 'proj_out')
    """
    table: SourceTable = {}
    for i in range(int(config["num_layers"])):
        s = f"blocks.{i}."
        for attn, diffusers_attn in (("self_attn", "attn1"), ("cross_attn", "attn2")):
            for o, c in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"),
                         ("norm_q", "norm_q"), ("norm_k", "norm_k")):
                table[f"{s}{attn}.{o}"] = _whole(f"{s}{diffusers_attn}.{c}")
        table.update({
            s + "cross_attn.k_img": _whole(s + "attn2.add_k_proj"), s + "cross_attn.v_img": _whole(s + "attn2.add_v_proj"),
            s + "cross_attn.norm_k_img": _whole(s + "attn2.norm_added_k"),
            s + "ffn.0": _whole(s + "ffn.net.0.proj"), s + "ffn.2": _whole(s + "ffn.net.2"),
            s + "norm3": _whole(s + "norm2"),
            f"blocks.{i}": _whole(s + "scale_shift_table"),  # the block's modulation table: its diff_m keys
        })
    embed = "condition_embedder."
    table.update({
        "text_embedding.0": _whole(embed + "text_embedder.linear_1"),
        "text_embedding.2": _whole(embed + "text_embedder.linear_2"),
        "time_embedding.0": _whole(embed + "time_embedder.linear_1"),
        "time_embedding.2": _whole(embed + "time_embedder.linear_2"),
        "time_projection.1": _whole(embed + "time_proj"),
        "img_emb.proj.0": _whole(embed + "image_embedder.norm1"),
        "img_emb.proj.1": _whole(embed + "image_embedder.ff.net.0.proj"),
        "img_emb.proj.3": _whole(embed + "image_embedder.ff.net.2"),
        "img_emb.proj.4": _whole(embed + "image_embedder.norm2"),
        "head.head": _whole("proj_out"),
        "head": _whole("scale_shift_table"),  # the head's modulation table (head.modulation): head.diff_m
    })
    return table


def flux2_source_names(config: dict[str, Any]) -> SourceTable:
    """BFL names of a Flux.2 transformer (dev, klein) -> diffusers' ``Flux2Transformer2DModel``. The double
    blocks' ``img_attn.qkv`` / ``txt_attn.qkv`` split by rows into q / k / v; a single block's ``linear1`` stays
    whole (diffusers keeps it fused: ``attn.to_qkv_mlp_proj``). musubi's ComfyUI converter writes HunyuanVideo's
    spellings ``img_attn_qkv`` / ``img_attn_proj`` for these layers: read as the same layers.

    >>> t = flux2_source_names({"num_attention_heads": 2, "attention_head_dim": 4, "num_layers": 1,
    ...                         "num_single_layers": 1, "guidance_embeds": False})
    >>> [(p.path, p.spans) for p in t["double_blocks.0.txt_attn_qkv"]][2]
    ('transformer_blocks.0.attn.add_v_proj', ((16, 24),))
    >>> t["single_blocks.0.linear1"][0].path
    'single_transformer_blocks.0.attn.to_qkv_mlp_proj'
    """
    h = _width(config)
    table: SourceTable = {}
    for i in range(int(config["num_layers"])):
        s, t = f"double_blocks.{i}.", f"transformer_blocks.{i}.attn."
        img_qkv = _split([t + "to_q", t + "to_k", t + "to_v"], [h, h, h])
        txt_qkv = _split([t + "add_q_proj", t + "add_k_proj", t + "add_v_proj"], [h, h, h])
        for sep in (".", "_"):  # BFL img_attn.qkv; musubi's ComfyUI output img_attn_qkv
            table.update({
                f"{s}img_attn{sep}qkv": img_qkv, f"{s}txt_attn{sep}qkv": txt_qkv,
                f"{s}img_attn{sep}proj": _whole(t + "to_out.0"), f"{s}txt_attn{sep}proj": _whole(t + "to_add_out"),
            })
        b = f"transformer_blocks.{i}."
        table.update({
            s + "img_mlp.0": _whole(b + "ff.linear_in"), s + "img_mlp.2": _whole(b + "ff.linear_out"),
            s + "txt_mlp.0": _whole(b + "ff_context.linear_in"), s + "txt_mlp.2": _whole(b + "ff_context.linear_out"),
            s + "img_attn.norm.query_norm": _whole(t + "norm_q"), s + "img_attn.norm.key_norm": _whole(t + "norm_k"),
            s + "txt_attn.norm.query_norm": _whole(t + "norm_added_q"),
            s + "txt_attn.norm.key_norm": _whole(t + "norm_added_k"),
        })
    for i in range(int(config["num_single_layers"])):
        s, t = f"single_blocks.{i}.", f"single_transformer_blocks.{i}.attn."
        table.update({
            s + "linear1": _whole(t + "to_qkv_mlp_proj"), s + "linear2": _whole(t + "to_out"),
            s + "norm.query_norm": _whole(t + "norm_q"), s + "norm.key_norm": _whole(t + "norm_k"),
        })
    embed = "time_guidance_embed."
    table.update({
        "img_in": _whole("x_embedder"), "txt_in": _whole("context_embedder"),
        "time_in.in_layer": _whole(embed + "timestep_embedder.linear_1"),
        "time_in.out_layer": _whole(embed + "timestep_embedder.linear_2"),
        "guidance_in.in_layer": _whole(embed + "guidance_embedder.linear_1"),
        "guidance_in.out_layer": _whole(embed + "guidance_embedder.linear_2"),
        "double_stream_modulation_img.lin": _whole("double_stream_modulation_img.linear"),
        "double_stream_modulation_txt.lin": _whole("double_stream_modulation_txt.linear"),
        "single_stream_modulation.lin": _whole("single_stream_modulation.linear"),
        "final_layer.linear": _whole("proj_out"),
        # BFL's final layer is (shift, scale); diffusers' AdaLayerNormContinuous reads (scale, shift), as for Flux.1
        "final_layer.adaLN_modulation.1": _swapped("norm_out.linear", h),
    })
    return table


def chroma_source_names(config: dict[str, Any]) -> SourceTable:
    """Chroma's names: Flux.1's BFL names (a name whose module Chroma lacks, such as a modulation Linear, is left
    out by the index) and its distilled guidance approximator, whose ``layers.N.in_layer`` / ``out_layer``
    diffusers calls ``linear_1`` / ``linear_2`` (OneTrainer writes the former).

    >>> chroma_source_names({"num_attention_heads": 1, "attention_head_dim": 4, "num_layers": 0,
    ...                      "num_single_layers": 0, "approximator_layers": 1})[
    ...     "distilled_guidance_layer.layers.0.in_layer"][0].path
    'distilled_guidance_layer.layers.0.linear_1'
    """
    table = flux_source_names({**config, "guidance_embeds": False})
    g = "distilled_guidance_layer."
    table.update({g + "in_proj": _whole(g + "in_proj"), g + "out_proj": _whole(g + "out_proj")})
    for i in range(int(config.get("approximator_layers", 5))):
        table.update({
            f"{g}layers.{i}.in_layer": _whole(f"{g}layers.{i}.linear_1"),
            f"{g}layers.{i}.out_layer": _whole(f"{g}layers.{i}.linear_2"),
            f"{g}norms.{i}": _whole(f"{g}norms.{i}"),
        })
    return table


def zimage_source_names(config: dict[str, Any]) -> SourceTable:
    """Z-Image's own (ComfyUI-native) names -> diffusers' ``ZImageTransformer2DModel``: ``attention.qkv`` is fused
    (q / k / v rows, ``dim`` each: ComfyUI's fused LoRA has a block-sparse up whose rows split exactly),
    ``attention.out`` is ``attention.to_out.0``, ``q_norm`` / ``k_norm`` are ``norm_q`` / ``norm_k``; the one
    patch size's embedder and final layer are ``all_x_embedder.2-1`` / ``all_final_layer.2-1``.

    >>> t = zimage_source_names({"dim": 8, "n_layers": 1, "n_refiner_layers": 1})
    >>> [(p.path, p.spans) for p in t["layers.0.attention.qkv"]][1]
    ('layers.0.attention.to_k', ((8, 16),))
    """
    h = int(config["dim"])
    refiners = int(config.get("n_refiner_layers", 2))
    table: SourceTable = {}
    stacks = (("layers", int(config["n_layers"])), ("noise_refiner", refiners), ("context_refiner", refiners))
    for stack, count in stacks:
        for i in range(count):
            a = f"{stack}.{i}.attention."
            table.update({
                a + "qkv": _split([a + "to_q", a + "to_k", a + "to_v"], [h, h, h]),
                a + "out": _whole(a + "to_out.0"),
                a + "q_norm": _whole(a + "norm_q"), a + "k_norm": _whole(a + "norm_k"),
            })
            same = [f"{stack}.{i}.{m}" for m in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
                                                  "adaLN_modulation.0", "attention_norm1", "attention_norm2",
                                                  "ffn_norm1", "ffn_norm2")]
            table.update({m: _whole(m) for m in same})  # the rest keeps its name (and is written by it)
    table.update({m: _whole(m) for m in ("t_embedder.mlp.0", "t_embedder.mlp.2", "cap_embedder.0", "cap_embedder.1")})
    patch = f"{(config.get('all_patch_size') or [2])[0]}-{(config.get('all_f_patch_size') or [1])[0]}"
    table.update({
        "x_embedder": _whole(f"all_x_embedder.{patch}"),
        "final_layer.linear": _whole(f"all_final_layer.{patch}.linear"),
        "final_layer.adaLN_modulation.1": _whole(f"all_final_layer.{patch}.adaLN_modulation.1"),
    })
    return table


def qwen_source_names(config: dict[str, Any]) -> SourceTable:
    """Qwen-Image was released in diffusers' names, so its original names ARE the module paths (ComfyUI's
    ``diffusion_model.transformer_blocks.0.img_mod.1``, musubi's ``lora_unet_transformer_blocks_0_img_mod_1``): the
    table maps each to itself, so that writers name every module in the ComfyUI and kohya layouts.

    >>> qwen_source_names({"num_layers": 1})["transformer_blocks.0.img_mlp.net.0.proj"][0].path
    'transformer_blocks.0.img_mlp.net.0.proj'
    """
    block = ("img_mod.1", "txt_mod.1", "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
             "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "attn.norm_q", "attn.norm_k", "attn.norm_added_q",
             "attn.norm_added_k", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
    paths = [f"transformer_blocks.{i}.{m}" for i in range(int(config["num_layers"])) for m in block]
    paths += ["time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2", "txt_norm",
              "img_in", "txt_in", "norm_out.linear", "proj_out"]
    return {p: _whole(p) for p in paths}


# Inputs a LoRA may widen, per denoiser: module path -> why. BFL's control LoRAs (FLUX.1 Depth / Canny) give
# img_in (x_embedder) more input features than the plain model has (64 latent channels + 64 for the control
# image's latents); diffusers widens the module with zero columns when a control pipeline loads one.
WIDENED_INPUTS = {"flux": {"x_embedder": "the control image's latents (a Flux control LoRA: FLUX.1 Depth / Canny)"}}

# which table a family's transformer uses
SOURCE_TABLES = {"flux": flux_source_names, "sd3": sd3_source_names, "wan": wan_source_names,
                 "flux2": flux2_source_names, "chroma": chroma_source_names, "zimage": zimage_source_names,
                 "qwen": qwen_source_names}


def source_names(denoiser: str | None, config: dict[str, Any]) -> SourceTable:
    """The original-name table of a transformer (``denoiser`` ``"flux"`` / ``"sd3"``); empty for a UNet.

    >>> source_names("unet", {})
    {}
    """
    build = SOURCE_TABLES.get(denoiser or "")
    return build(config) if build is not None else {}


__all__ = ["RowPiece", "RowSpans", "SOURCE_TABLES", "WIDENED_INPUTS", "SourceTable", "chroma_source_names",
           "flux2_source_names", "flux_source_names", "qwen_source_names", "sd3_source_names", "source_names",
           "wan_source_names",
           "zimage_source_names"]
