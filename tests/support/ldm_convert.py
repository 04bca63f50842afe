"""The tests' own diffusers -> LDM/SGM single-file converter (independent of lorablend.offline.checkpoint): tiny
pipelines written as the checkpoints users have, to bake into."""

from __future__ import annotations

import re

import torch

_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
        "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TEXT = {"sd1": [("text_encoder", "cond_stage_model.transformer.text_model.", "hf")],
         "sdxl": [("text_encoder", "conditioner.embedders.0.transformer.text_model.", "hf"),
                  ("text_encoder_2", "conditioner.embedders.1.model.", "openclip")]}


def _ldm_unet(name: str, up_has_attention: list[bool]) -> str:
    """diffusers UNet parameter name -> LDM name (layers_per_block = 2, as both tiny UNets)."""
    for k, v in _TOP.items():
        if name.startswith(k + "."):
            return v + name[len(k):]
    m = re.match(r"(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", name)
    side, i, kind, j, rest = m.group(1), int(m.group(2) or 0), m.group(3), int(m.group(4)), m.group(5)
    if kind == "resnets":
        head, _, tail = rest.partition(".")
        rest = _RES[head] + "." + tail
    if side == "mid_block":
        return f"middle_block.{1 if kind == 'attentions' else 2 * j}.{rest}"
    if side == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{3 * (i + 1)}.0.op.{rest.split('.', 1)[1]}"
        return f"input_blocks.{3 * i + j + 1}.{0 if kind == 'resnets' else 1}.{rest}"
    if kind == "upsamplers":
        return f"output_blocks.{3 * i + 2}.{2 if up_has_attention[i] else 1}.{rest}"
    return f"output_blocks.{3 * i + j}.{0 if kind == 'resnets' else 1}.{rest}"


def _openclip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in sd.items():
        if name == "text_projection.weight":
            out[prefix + "text_projection"] = t.t().contiguous()  # OpenCLIP multiplies x @ P: stored transposed
            continue
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)", name)
        if m:
            block, rest = f"{prefix}transformer.resblocks.{m.group(1)}.", m.group(2)
            q = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if q:
                if q.group(1) == "q":  # q, k, v stacked on dim 0, in that order
                    parts = [sd[f"text_model.encoder.layers.{m.group(1)}.self_attn.{x}_proj.{q.group(2)}"] for x in "qkv"]
                    out[block + f"attn.in_proj_{q.group(2)}"] = torch.cat(parts, 0)
                continue
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
                         ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2")):
                if rest.startswith(a + "."):
                    out[block + b + rest[len(a):]] = t
            continue
        simple = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                  "text_model.embeddings.position_embedding.weight": "positional_embedding",
                  "text_model.final_layer_norm.weight": "ln_final.weight",
                  "text_model.final_layer_norm.bias": "ln_final.bias"}
        out[prefix + simple[name]] = t
    return out


def to_ldm(pipe, family: str) -> dict[str, torch.Tensor]:
    """A pipeline's weights under single-file checkpoint names (VAE under first_stage_model.*, untouched by LoRAs)."""
    up_attn = [t.startswith("CrossAttn") for t in pipe.unet.config.up_block_types]
    sd = {"model.diffusion_model." + _ldm_unet(k, up_attn): v for k, v in pipe.unet.state_dict().items()}
    for comp, prefix, kind in _TEXT[family]:
        # transformers 5 names CLIPTextModel's parameters without "text_model."; checkpoints always have it
        te = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
              for k, v in getattr(pipe, comp).state_dict().items()}
        if kind == "hf":
            sd.update({prefix + k[len("text_model."):]: v for k, v in te.items() if k.startswith("text_model.")})
        else:
            sd.update(_openclip(te, prefix))
    sd.update({"first_stage_model." + k: v for k, v in pipe.vae.state_dict().items()})
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


# ------------------------------------------------------------------------------ fixtures
