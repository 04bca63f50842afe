"""diffusers UNet module paths <-> LDM / SGM (``input_blocks`` / ``middle_block`` / ``output_blocks``) paths.

kohya SDXL LoRAs, A1111/ComfyUI single-file checkpoints and LDM-style SD1 files name UNet modules the
original way. The mapping follows the block arithmetic of the original UNet: each down block contributes
``layers_per_block`` layers plus one downsampler slot, each up block ``layers_per_block + 1`` layers; inside
a layer, index 0 is the resnet, 1 the attention, and the up-sampler comes last.

>>> cfg = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
...        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 2}
>>> ldm_unet_path("down_blocks.1.attentions.0.proj_in", cfg)
'input_blocks.4.1.proj_in'
"""

from __future__ import annotations

import re

_RESNET_INNER = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")


def _layers(config: dict, n_blocks: int) -> list[int]:
    lpb = config.get("layers_per_block", 2)
    return list(lpb) if isinstance(lpb, (list, tuple)) else [int(lpb)] * n_blocks


def _inner(kind: str, rest: str | None) -> str:
    if not rest:
        return ""
    if kind == "resnets":
        head, _, tail = rest.partition(".")
        head = _RESNET_INNER.get(head, head)
        return "." + head + (("." + tail) if tail else "")
    return "." + rest


def ldm_unet_path(path: str, config: dict) -> str | None:
    """The LDM/SGM path of a diffusers UNet module path, or None when the module has no LDM name."""
    if path in _TOP_LEVEL:
        return _TOP_LEVEL[path]
    m = _MID.match(path)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        idx = 1 if kind == "attentions" else 2 * j
        return f"middle_block.{idx}{_inner(kind, rest)}"
    m = _BLOCK.match(path)
    if not m:
        return None
    side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    if side == "down_blocks":
        layers = _layers(config, len(config["down_block_types"]))
        start = 1 + sum(n + 1 for n in layers[:i])
        if kind == "downsamplers":
            if rest != "conv":
                return None
            return f"input_blocks.{start + layers[i]}.0.op"
        return f"input_blocks.{start + j}.{0 if kind == 'resnets' else 1}{_inner(kind, rest)}"
    layers = [n + 1 for n in _layers(config, len(config["up_block_types"]))]
    start = sum(layers[:i])
    if kind == "upsamplers":
        has_attention = "CrossAttn" in config["up_block_types"][i]
        return f"output_blocks.{start + layers[i] - 1}.{2 if has_attention else 1}.{rest}"
    return f"output_blocks.{start + j}.{0 if kind == 'resnets' else 1}{_inner(kind, rest)}"


def block_label(ldm_path: str | None) -> str:
    """The A1111 LoRA-Block-Weight label of an LDM UNet path: ``IN04``, ``M00``, ``OUT03``, ``TIME``, ``FINAL``."""
    if ldm_path is None:
        return "OTHER"
    m = re.match(r"^(input_blocks|output_blocks)\.(\d+)\.", ldm_path)
    if m:
        return ("IN" if m.group(1) == "input_blocks" else "OUT") + f"{int(m.group(2)):02d}"
    if ldm_path.startswith("middle_block."):
        return "M00"
    if ldm_path.startswith(("time_embed.", "label_emb.")):
        return "TIME"
    if ldm_path.startswith("out."):
        return "FINAL"
    return "OTHER"
