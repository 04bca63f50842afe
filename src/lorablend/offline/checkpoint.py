"""Single-file SD1.x / SD2.x / SDXL checkpoints: what model a file holds, and which tensor holds each target layer.

A1111 / ComfyUI checkpoints keep the original (LDM / SGM) names: ``model.diffusion_model.input_blocks.4.1…`` for
the UNet, ``cond_stage_model.transformer.text_model.…`` (SD1.x CLIP-L, HF names), ``conditioner.embedders.0.…``
(SDXL CLIP-L) and OpenCLIP layouts for SD2.x and SDXL's second encoder (``….transformer.resblocks.K.attn.
in_proj_weight`` holds q, k and v stacked on dim 0; ``text_projection`` is stored transposed).

Names are never guessed from strings alone: the architecture is read off the header (block structure, widths,
depths), built on the meta device (no weights, no memory), and the module tree gives every canonical target
key with its LDM path (``naming``). Only the header is read here; tensors stay on disk.

>>> layout = checkpoint_layout("sd15.safetensors")                       # doctest: +SKIP
>>> layout.family, layout.placement("unet.down_blocks.1.attentions.0.proj_in").weight_key   # doctest: +SKIP
('sd1', 'model.diffusion_model.input_blocks.4.1.proj_in.weight')
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import LoraFormatError
from ..io.safetensors import FLOAT_DTYPES, SafetensorsHeader, read_header  # the one header reader (every check)
from ..naming import build_meta_components
from ..naming import family as naming_family  # the one family rule
from ..runtime.model_view import ModelView

UNET_PREFIX = "model.diffusion_model."

# family -> [(component, key prefix, layout)]; "hf" keeps transformers' CLIP names, "openclip" is the fused layout.
TEXT_LAYOUTS: dict[str, list[tuple[str, str, str]]] = {
    "sd1": [("text_encoder", "cond_stage_model.transformer.text_model.", "hf")],
    "sd2": [("text_encoder", "cond_stage_model.model.", "openclip")],
    "sdxl": [
        ("text_encoder", "conditioner.embedders.0.transformer.text_model.", "hf"),
        ("text_encoder_2", "conditioner.embedders.1.model.", "openclip"),
    ],
}

# ------------------------------------------------------------------------------------------- family


def checkpoint_family(header: SafetensorsHeader) -> str:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"`` from the checkpoint's key layout (by ``naming.detect_family``); a file
    that is no SD checkpoint raises.

    >>> checkpoint_family(read_header("sd_xl_base_1.0.safetensors"))           # doctest: +SKIP
    'sdxl'
    """
    names = header.by_name
    if not any(n.startswith(UNET_PREFIX) for n in names):
        hint = ""
        if any(n.startswith(("unet.", "lora_", "down_blocks.")) or ".lora_" in n for n in list(names)[:50]):
            hint = " (it looks like a LoRA or a diffusers component; pass a pipeline folder or an SD checkpoint)"
        raise LoraFormatError(
            f"{header.path}: not a single-file SD1.x/SDXL checkpoint (no 'model.diffusion_model.' tensors) nor a Flux / "
            f"SD3 transformer in BFL / SAI names (double_blocks.0.img_attn.qkv, joint_blocks.0.x_block.attn.qkv){hint}"
        )
    # The text encoder's layout names it (OpenCLIP-H is SD2.x's, CLIP-L in HF names SD1.x's), whatever the widths:
    # a tiny test checkpoint has the real layout with other widths.
    encoder = None
    if any(n.startswith("cond_stage_model.model.transformer.") for n in names):
        encoder = "openclip-h"
    elif any(n.startswith("cond_stage_model.transformer.") for n in names):
        encoder = "clip-l"
    evidence = naming_family.FamilyEvidence(
        second_text_encoder=any(n.startswith("conditioner.embedders.1.model.") for n in names),
        text_time_embedding=UNET_PREFIX + "label_emb.0.0.weight" in names,
        text_encoder=encoder,
    )
    family = naming_family.detect_family(evidence)
    if family is None:
        raise LoraFormatError(
            f"{header.path}: UNet tensors but no text encoder this tool knows (cond_stage_model.* for SD1.x/SD2.x, "
            "conditioner.embedders.* for SDXL); is it a UNet-only file?"
        )
    return family


# ------------------------------------------------------------------------------------------- architecture


def _indices(names: Any, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for n in names if (m := rx.match(n))})


def _transformer_depth(names: Any, ldm_block: str) -> int:
    depth = _indices(names, re.escape(UNET_PREFIX + ldm_block) + r"\.transformer_blocks\.(\d+)\.")
    return len(depth) or 1


def unet_config(header: SafetensorsHeader) -> dict[str, Any]:
    """A ``UNet2DConditionModel`` config whose module tree has the shapes of this checkpoint's UNet.

    Only what shapes the Linear/Conv2d layers is read (block structure, widths, transformer depths, projection
    kind, cross-attention and embedding widths); head counts and norm groups do not change any weight shape,
    so they are set to values valid for every width.
    """
    names, shape, p = header.by_name, header.shape, UNET_PREFIX

    def need(key: str) -> tuple[int, ...]:
        s = shape(p + key)
        if s is None:
            raise LoraFormatError(f"{header.path}: no {p + key}; this is not an SD1.x/SD2.x/SDXL UNet this tool knows")
        _refuse_empty(header, p + key, s)
        return s

    c0, in_ch = need("input_blocks.0.0.weight")[:2]
    out_ch = need("out.2.weight")[0]
    blocks: list[list[int]] = [[]]
    for n in _indices(names, re.escape(p) + r"input_blocks\.(\d+)\.")[1:]:
        if p + f"input_blocks.{n}.0.op.weight" in names:
            blocks.append([])
        else:
            blocks[-1].append(n)
    blocks = [b for b in blocks if b]
    layers = {len(b) for b in blocks}
    if len(layers) != 1:
        raise LoraFormatError(f"{header.path}: UNet blocks have different numbers of layers {sorted(layers)}; unsupported")
    lpb = layers.pop()
    channels, down_types, depths = [], [], []
    for b in blocks:
        channels.append(need(f"input_blocks.{b[0]}.0.out_layers.3.weight")[0])
        attn = p + f"input_blocks.{b[0]}.1.proj_in.weight" in names
        down_types.append("CrossAttnDownBlock2D" if attn else "DownBlock2D")
        depths.append(_transformer_depth(names, f"input_blocks.{b[0]}.1") if attn else 1)
    up_types = []
    for i in range(len(blocks)):
        attn = p + f"output_blocks.{i * (lpb + 1)}.1.proj_in.weight" in names
        up_types.append("CrossAttnUpBlock2D" if attn else "UpBlock2D")
    proj = next((e.shape for n, e in names.items() if n.startswith(p) and n.endswith(".proj_in.weight")), None)
    to_k = next((e.shape for n, e in names.items() if n.startswith(p) and n.endswith("attn2.to_k.weight")), None)
    mid_attn = p + "middle_block.1.proj_in.weight" in names
    cfg: dict[str, Any] = {
        "in_channels": int(in_ch),
        "out_channels": int(out_ch),
        "block_out_channels": [int(c) for c in channels],
        "layers_per_block": lpb,
        "down_block_types": down_types,
        "up_block_types": up_types,
        "mid_block_type": "UNetMidBlock2DCrossAttn" if mid_attn else "UNetMidBlock2D",
        "transformer_layers_per_block": depths,
        "use_linear_projection": proj is not None and len(proj) == 2,
        "cross_attention_dim": int(to_k[1]) if to_k is not None else 768,
        "attention_head_dim": 1,  # one head of full width: every projection keeps its (width, width) shape
        "norm_num_groups": 1,  # GroupNorm(1, c) is valid for any width; norms are not LoRA targets
        "time_embedding_dim": int(need("time_embed.0.weight")[0]),
    }
    if mid_attn and _transformer_depth(names, "middle_block.1") != depths[-1]:
        raise LoraFormatError(f"{header.path}: the middle block's transformer depth differs from the last down block's; unsupported")
    label = shape(p + "label_emb.0.0.weight")
    if label is not None:
        cfg.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=int(label[1]),
                   addition_time_embed_dim=256)  # a sinusoid width: no weight depends on it
    return cfg


def _refuse_empty(header: SafetensorsHeader, name: str, shape: tuple[int, ...]) -> None:
    """A width of zero would build a model of empty layers (and divide by zero on the way): refuse it by name."""
    if 0 in shape:
        raise LoraFormatError(
            f"{header.path}: {name} has shape {list(shape)}, with a dimension of size 0; a model's weights are never "
            f"empty: download the checkpoint again"
        )


def _clip_config(header: SafetensorsHeader, prefix: str, layout: str) -> dict[str, Any]:
    names, shape = header.by_name, header.shape
    if layout == "hf":
        tok, pos = shape(prefix + "embeddings.token_embedding.weight"), shape(prefix + "embeddings.position_embedding.weight")
        layers = _indices(names, re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
        fc1 = shape(prefix + "encoder.layers.0.mlp.fc1.weight")
        proj = None
    else:
        tok, pos = shape(prefix + "token_embedding.weight"), shape(prefix + "positional_embedding")
        layers = _indices(names, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
        fc1 = shape(prefix + "transformer.resblocks.0.mlp.c_fc.weight")
        proj = shape(prefix + "text_projection")
    if tok is None or pos is None or fc1 is None or not layers:
        raise LoraFormatError(f"{header.path}: the text encoder under {prefix!r} is incomplete (no embeddings or layers)")
    for what, s in (("token embedding", tok), ("position embedding", pos), ("first MLP", fc1), ("text projection", proj)):
        if s is not None:
            _refuse_empty(header, f"{prefix} {what}", s)
    cfg = {
        "vocab_size": int(tok[0]),
        "hidden_size": int(tok[1]),
        "intermediate_size": int(fc1[0]),
        "num_hidden_layers": layers[-1] + 1,
        "num_attention_heads": 1,  # as for the UNet: heads do not change any weight shape
        "max_position_embeddings": int(pos[0]),
    }
    if proj is not None:
        cfg["projection_dim"] = int(proj[1])
    return cfg


def build_components(header: SafetensorsHeader, family: str) -> dict[str, nn.Module]:
    """The UNet and text encoders of this checkpoint on the meta device (module tree and shapes, no storage)."""
    text_specs = []
    for component, prefix, layout in TEXT_LAYOUTS[family]:
        cfg = _clip_config(header, prefix, layout)
        text_specs.append((component, cfg, "projection_dim" in cfg))
    return build_meta_components(unet_config(header), text_specs)


# ------------------------------------------------------------------------------------------- placements


@dataclass(frozen=True)
class Placement:
    """Where one target layer's weight (and bias) lives in the checkpoint.

    ``rows`` is a row range of a fused tensor (OpenCLIP ``in_proj_weight``: q, k, v stacked on dim 0);
    ``transposed`` marks a tensor stored as the transpose of the module's weight (OpenCLIP ``text_projection``).
    """

    target_key: str
    weight_key: str
    bias_key: str | None = None
    rows: tuple[int, int] | None = None
    transposed: bool = False
    spans: tuple[tuple[int, int], ...] | None = None  # several row spans, in the module's order (Flux final_layer)

    @property
    def row_spans(self) -> tuple[tuple[int, int], ...] | None:
        """The stored rows that make the module's rows, in order (None: the whole tensor)."""
        return self.spans or ((self.rows,) if self.rows is not None else None)


_OPENCLIP = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc1|mlp\.fc2)$")
_OPENCLIP_NAMES = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


@dataclass
class CheckpointLayout:
    """A checkpoint's family, its meta-device model view (module index) and the target-key -> tensor map."""

    header: SafetensorsHeader
    family: str
    view: ModelView
    prefix: str = UNET_PREFIX  # a transformer's tensors: "" (BFL's own files) or "model.diffusion_model." (ComfyUI)
    _sources: dict | None = None

    def placement(self, target_key: str) -> Placement | None:
        """Where ``target_key``'s weight is stored, or None when this layout has no tensor for it."""
        info = self.view.index.modules.get(target_key)
        if info is None:
            return None
        if info.component == "transformer":
            return self._transformer_placement(target_key)
        if info.component == "unet":
            if info.ldm_path is None:
                return None
            stem = UNET_PREFIX + info.ldm_path
            return Placement(target_key, stem + ".weight", self._bias(stem + ".bias"))
        layout = next(((p, l) for c, p, l in TEXT_LAYOUTS.get(self.family, []) if c == info.component), None)
        if layout is None:
            return None
        prefix, kind = layout
        path = info.path
        if kind == "hf":
            if not path.startswith("text_model."):
                return None
            stem = prefix + path[len("text_model."):]
            return Placement(target_key, stem + ".weight", self._bias(stem + ".bias"))
        if path == "text_projection":
            return Placement(target_key, prefix + "text_projection", None, transposed=True)
        m = _OPENCLIP.match(path)
        if m is None:
            return None
        block, sub = prefix + f"transformer.resblocks.{m.group(1)}.", m.group(2)
        if sub in _OPENCLIP_NAMES:
            stem = block + _OPENCLIP_NAMES[sub]
            return Placement(target_key, stem + ".weight", self._bias(stem + ".bias"))
        width = info.weight_shape[0]
        i = "qkv".index(sub[len("self_attn.")])
        rows = (i * width, (i + 1) * width)
        return Placement(target_key, block + "attn.in_proj_weight", self._bias(block + "attn.in_proj_bias"), rows=rows)

    def _transformer_placement(self, target_key: str) -> Placement | None:
        """A Flux / SD3 module in the original (BFL / SAI) names: a fused tensor's rows, ``.scale`` for Flux's
        RMSNorms (SAI's are ``.weight``), ``.modulation`` for Wan's tables."""
        from ..io.write_original import source_of  # the one reverse of the original-name table

        if self._sources is None:
            self._sources = source_of(self.view.index)
        where = self._sources.get(target_key)
        if where is None:
            return None
        name, spans = where
        stem = self.prefix + name
        # a weight; a BFL RMSNorm's ``.scale``; a Wan block's or head's modulation table (its ``diff_m`` target)
        weight = next((stem + s for s in (".weight", ".modulation") if stem + s in self.header.by_name), stem + ".scale")
        rows = spans[0] if spans is not None and len(spans) == 1 else None
        multi = tuple(spans) if spans is not None and len(spans) > 1 else None
        return Placement(target_key, weight, self._bias(stem + ".bias"), rows=rows, spans=multi)

    def _bias(self, key: str) -> str | None:
        return key if key in self.header.by_name else None

    def problem(self, placement: Placement) -> str | None:
        """Why ``placement`` does not match the file (missing tensor, wrong shape, not float), or None."""
        entry = self.header.by_name.get(placement.weight_key)
        if entry is None:
            return f"no tensor {placement.weight_key!r} in {self.header.path.name}"
        if entry.dtype not in FLOAT_DTYPES + ("F8_E4M3", "F8_E5M2"):  # (fp8: fused by quantized_files.fused_fp8)
            return f"{placement.weight_key} is {entry.dtype}, not a float tensor"
        want = tuple(self.view.index.modules[placement.target_key].weight_shape)
        have = entry.shape
        if placement.transposed:
            have = tuple(reversed(have))
        spans = placement.row_spans
        if spans is not None:
            if len(have) != len(want) or max(b for _, b in spans) > have[0]:
                return f"{placement.weight_key} of shape {have} has no rows {list(spans)} of shape {want}"
            have = (sum(b - a for a, b in spans), *have[1:])
        if have != want:
            return f"{placement.weight_key} has shape {entry.shape}, the layer needs {want}"
        return None


# ------------------------------------------------------------------------------------------- Flux / SD3


_TRANSFORMER_PREFIXES = ("", UNET_PREFIX)  # BFL's / SAI's own transformer files; ComfyUI's all-in-one checkpoints
# one tensor only that architecture's single files have (Flux.2 and Chroma before Flux.1: they share its BFL blocks)
_TRANSFORMER_MARKS = {"flux2": "double_stream_modulation_img.lin.weight", "chroma": "distilled_guidance_layer.in_proj.weight",
                      "flux": "double_blocks.0.img_attn.qkv.weight", "sd3": "joint_blocks.0.x_block.attn.qkv.weight",
                      "wan": "blocks.0.self_attn.q.weight", "qwen": "transformer_blocks.0.img_mod.1.weight",
                      "zimage": "layers.0.attention.qkv.weight"}


def _flux_config(header: SafetensorsHeader, p: str) -> dict[str, Any]:
    """A ``FluxTransformer2DModel`` config with this file's shapes (widths, depths, inputs, guidance embedder)."""
    names, shape = header.by_name, header.shape
    width, in_channels = shape(p + "img_in.weight")
    head_dim = shape(p + "double_blocks.0.img_attn.norm.query_norm.scale")[0]
    return {
        "patch_size": 1, "in_channels": int(in_channels), "out_channels": int(shape(p + "final_layer.linear.weight")[0]),
        "num_layers": len(_indices(names, re.escape(p) + r"double_blocks\.(\d+)\.")),
        "num_single_layers": len(_indices(names, re.escape(p) + r"single_blocks\.(\d+)\.")),
        "attention_head_dim": int(head_dim), "num_attention_heads": int(width) // int(head_dim),
        "joint_attention_dim": int(shape(p + "txt_in.weight")[1]),
        "pooled_projection_dim": int(shape(p + "vector_in.in_layer.weight")[1]),
        "guidance_embeds": p + "guidance_in.in_layer.weight" in names,
        "axes_dims_rope": [int(head_dim) // 8, int(head_dim) * 7 // 16, int(head_dim) - int(head_dim) // 8 - int(head_dim) * 7 // 16],
    }


def _sd3_config(header: SafetensorsHeader, p: str) -> dict[str, Any]:
    """An ``SD3Transformer2DModel`` config with this file's shapes (SAI MMDiT names: SD3 medium, SD3.5 medium with
    its dual-attention blocks, SD3.5 large with q/k norms). SAI's heads are 64 wide where no q/k norm says."""
    names, shape = header.by_name, header.shape
    width, in_channels, patch, _ = shape(p + "x_embedder.proj.weight")
    blocks = _indices(names, re.escape(p) + r"joint_blocks\.(\d+)\.")
    norm = shape(p + "joint_blocks.0.x_block.attn.ln_q.weight")
    # without q/k norms the head width shapes no weight: SAI's 64, or one head of the whole width (a tiny model)
    head_dim = int(norm[0]) if norm is not None else 64 if int(width) % 64 == 0 else int(width)
    context = shape(p + "context_embedder.weight")
    return {
        "sample_size": 128, "patch_size": int(patch), "in_channels": int(in_channels), "num_layers": len(blocks),
        "attention_head_dim": head_dim, "num_attention_heads": int(width) // head_dim,
        "joint_attention_dim": int(context[1]), "caption_projection_dim": int(context[0]),
        "pooled_projection_dim": int(shape(p + "y_embedder.mlp.0.weight")[1]),
        "out_channels": int(shape(p + "final_layer.linear.weight")[0]) // int(patch) ** 2,
        "pos_embed_max_size": math.isqrt(int(shape(p + "pos_embed")[1])),
        "dual_attention_layers": tuple(i for i in blocks if f"{p}joint_blocks.{i}.x_block.attn2.qkv.weight" in names),
        "qk_norm": "rms_norm" if norm is not None else None,
    }


def _rope_axes(head_dim: int) -> list[int]:
    """Rotary axes (even, summing to the head width) in Qwen-Image's proportions (16, 56, 56 for 128): they shape
    no weight, only the meta model's constructor checks them."""
    a, b = 2 * (head_dim // 16), 2 * (head_dim * 7 // 32)
    return [a, b, head_dim - a - b]


def _wan_config(header: SafetensorsHeader, p: str) -> dict[str, Any]:
    """A ``WanTransformer3DModel`` config with this file's shapes (Wan's own names: ``blocks.0.self_attn.q``).
    Wan's q/k norms span all heads, so the head width shapes no weight: Wan's 128, or one head (a tiny model)."""
    names, shape = header.by_name, header.shape
    width = int(shape(p + "blocks.0.self_attn.q.weight")[0])
    patch = shape(p + "patch_embedding.weight")  # (width, in, t, h, w)
    head_dim = 128 if width % 128 == 0 else width
    image = shape(p + "img_emb.proj.1.weight")
    return {
        "patch_size": [int(d) for d in patch[2:]], "in_channels": int(patch[1]),
        "out_channels": int(shape(p + "head.head.weight")[0]) // math.prod(int(d) for d in patch[2:]),
        "num_attention_heads": width // head_dim, "attention_head_dim": head_dim,
        "num_layers": len(_indices(names, re.escape(p) + r"blocks\.(\d+)\.")),
        "ffn_dim": int(shape(p + "blocks.0.ffn.0.weight")[0]), "text_dim": int(shape(p + "text_embedding.0.weight")[1]),
        "freq_dim": int(shape(p + "time_embedding.0.weight")[1]), "cross_attn_norm": p + "blocks.0.norm3.weight" in names,
        "qk_norm": "rms_norm_across_heads" if p + "blocks.0.self_attn.norm_q.weight" in names else None,
        "added_kv_proj_dim": width if p + "blocks.0.cross_attn.k_img.weight" in names else None,
        "image_dim": int(image[1]) if image is not None else None,
    }


def _qwen_config(header: SafetensorsHeader, p: str) -> dict[str, Any]:
    """A ``QwenImageTransformer2DModel`` config with this file's shapes (its names are diffusers' own)."""
    shape = header.shape
    width, in_channels = shape(p + "img_in.weight")
    head_dim = int(shape(p + "transformer_blocks.0.attn.norm_q.weight")[0])
    return {
        "patch_size": 2, "in_channels": int(in_channels), "out_channels": int(shape(p + "proj_out.weight")[0]) // 4,
        "num_layers": len(_indices(header.by_name, re.escape(p) + r"transformer_blocks\.(\d+)\.")),
        "attention_head_dim": head_dim, "num_attention_heads": int(width) // head_dim,
        "joint_attention_dim": int(shape(p + "txt_in.weight")[1]), "guidance_embeds": False,
        "axes_dims_rope": _rope_axes(head_dim),
    }


def _bfl_head(header: SafetensorsHeader, p: str) -> int:
    """The head width of a BFL-named file: its first q norm's (``.scale`` in BFL's files, ``.weight`` in some)."""
    stem = p + "double_blocks.0.img_attn.norm.query_norm."
    return int((header.shape(stem + "scale") or header.shape(stem + "weight"))[0])


def _flux2_config(header: SafetensorsHeader, p: str) -> dict[str, Any]:
    """A ``Flux2Transformer2DModel`` config with this file's shapes (BFL names; SwiGLU MLPs: ``img_mlp.0`` holds
    twice the hidden width)."""
    names, shape = header.by_name, header.shape
    width, in_channels = shape(p + "img_in.weight")
    head_dim = _bfl_head(header, p)
    return {
        "patch_size": 1, "in_channels": int(in_channels), "out_channels": int(shape(p + "final_layer.linear.weight")[0]),
        "num_layers": len(_indices(names, re.escape(p) + r"double_blocks\.(\d+)\.")),
        "num_single_layers": len(_indices(names, re.escape(p) + r"single_blocks\.(\d+)\.")),
        "attention_head_dim": head_dim, "num_attention_heads": int(width) // head_dim,
        "joint_attention_dim": int(shape(p + "txt_in.weight")[1]),
        "timestep_guidance_channels": int(shape(p + "time_in.in_layer.weight")[1]),
        "mlp_ratio": int(shape(p + "double_blocks.0.img_mlp.0.weight")[0]) / 2 / int(width),
        "guidance_embeds": p + "guidance_in.in_layer.weight" in names, "axes_dims_rope": [head_dim // 4] * 4,
    }


def _chroma_config(header: SafetensorsHeader, p: str) -> dict[str, Any]:
    """A ``ChromaTransformer2DModel`` config with this file's shapes (Flux.1's BFL blocks, no modulation Linears,
    the distilled guidance approximator)."""
    names, shape = header.by_name, header.shape
    width, in_channels = shape(p + "img_in.weight")
    head_dim = _bfl_head(header, p)
    hidden, channels = shape(p + "distilled_guidance_layer.in_proj.weight")
    return {
        "patch_size": 1, "in_channels": int(in_channels), "out_channels": int(shape(p + "final_layer.linear.weight")[0]),
        "num_layers": len(_indices(names, re.escape(p) + r"double_blocks\.(\d+)\.")),
        "num_single_layers": len(_indices(names, re.escape(p) + r"single_blocks\.(\d+)\.")),
        "attention_head_dim": head_dim, "num_attention_heads": int(width) // head_dim,
        "joint_attention_dim": int(shape(p + "txt_in.weight")[1]), "axes_dims_rope": _rope_axes(head_dim),
        "approximator_num_channels": int(channels), "approximator_hidden_dim": int(hidden),
        "approximator_layers": len(_indices(names, re.escape(p) + r"distilled_guidance_layer\.layers\.(\d+)\.")),
    }


def _zimage_config(header: SafetensorsHeader, p: str) -> dict[str, Any]:
    """A ``ZImageTransformer2DModel`` config with this file's shapes (Z-Image's own names: fused ``attention.qkv``,
    ``q_norm``; one patch size, 2 x 2 by 1 frame)."""
    names, shape = header.by_name, header.shape
    dim = int(shape(p + "layers.0.attention.qkv.weight")[1])
    norm = shape(p + "layers.0.attention.q_norm.weight")
    head_dim = int(norm[0]) if norm is not None else 128 if dim % 128 == 0 else dim
    a, b = head_dim // 4, head_dim * 3 // 8
    return {
        "all_patch_size": [2], "all_f_patch_size": [1], "dim": dim,
        "in_channels": int(shape(p + "x_embedder.weight")[1]) // 4,
        "n_layers": len(_indices(names, re.escape(p) + r"layers\.(\d+)\.")),
        "n_refiner_layers": len(_indices(names, re.escape(p) + r"noise_refiner\.(\d+)\.")),
        "n_heads": dim // head_dim, "n_kv_heads": dim // head_dim, "qk_norm": norm is not None,
        "cap_feat_dim": int(shape(p + "cap_embedder.1.weight")[1]), "axes_dims": [a, b, head_dim - a - b],
    }


_CONFIGS = {"flux": _flux_config, "sd3": _sd3_config, "wan": _wan_config, "qwen": _qwen_config,
            "flux2": _flux2_config, "chroma": _chroma_config, "zimage": _zimage_config}


def transformer_layout(header: SafetensorsHeader) -> CheckpointLayout | None:
    """The layout of a single-file Flux.1 transformer in BFL names (``double_blocks.0.img_attn.qkv.weight``), an
    SD3 / SD3.5 one in SAI names (``joint_blocks.0.x_block.attn.qkv.weight``), a Flux.2 / Chroma one (BFL), a Wan,
    Qwen-Image or Z-Image one in its own names (``naming/fused.py``), with or without the
    ``model.diffusion_model.`` prefix (SAI's and ComfyUI's all-in-one files), or None for any other file. Its
    config is read off the header and the transformer built on the meta device, as for a UNet; every target key
    is placed at its original tensor and rows (``naming/fused.py``). Text encoders in the file are not indexed:
    their LoRA layers are refused (``strict``) or skipped.

    >>> transformer_layout(read_header("flux1-dev.safetensors")).family      # doctest: +SKIP
    'flux'
    """
    found = [(fam, p) for p in _TRANSFORMER_PREFIXES for fam, mark in _TRANSFORMER_MARKS.items()
             if p + mark in header.by_name]
    if not found:
        return None
    denoiser, prefix = found[0]
    try:
        config = _CONFIGS[denoiser](header, prefix)
    except TypeError:  # a shape() that was None: a tensor the layout needs is missing
        raise LoraFormatError(f"{header.path}: {denoiser} transformer names but not the whole transformer (its patch "
                              f"and text embedders, final layer, and Flux's q/k norms are needed)") from None
    components = build_meta_components(config, [], denoiser=denoiser)
    view = ModelView.of(components)  # the family from the transformer's class and widths (SD3 / SD3.5 told apart)
    family = view.index.family
    return CheckpointLayout(header, family, view, prefix=prefix)


def checkpoint_layout(path: str | os.PathLike, header: SafetensorsHeader | None = None) -> CheckpointLayout:
    """Read a single-file checkpoint's header and build its layout (family, module index, tensor map).

    >>> checkpoint_layout("v1-5-pruned-emaonly.safetensors").family            # doctest: +SKIP
    'sd1'
    """
    header = header or read_header(path)
    transformer = transformer_layout(header)
    if transformer is not None:
        return transformer
    family = checkpoint_family(header)
    components = build_components(header, family)
    view = ModelView.of(components)
    view.index.family = family  # the file's layout decides; the meta model's widths may be a tiny test model's
    return CheckpointLayout(header, family, view)


detect_family = checkpoint_family  # the old name of this module's public function, kept for callers

__all__ = [
    "CheckpointLayout",
    "Placement",
    "build_components",
    "checkpoint_family",
    "checkpoint_layout",
    "detect_family",
    "transformer_layout",
    "unet_config",
]
