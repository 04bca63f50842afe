"""Adapter -> the diffusers / PEFT LoRA format that ``pipe.load_lora_weights`` reads.

Keys are ``<component>.<module path>.lora_A.weight`` / ``.lora_B.weight`` (``unet.``, ``text_encoder.``,
``text_encoder_2.``; text-encoder paths keep ``text_model.``, which diffusers strips when the live CLIP lacks it).
Alpha travels in diffusers' ``lora_adapter_metadata`` header entry, one PEFT ``LoraConfig`` per component
flattened with a ``<component>.`` prefix (``unet.r``, ``unet.lora_alpha``, ``unet.rank_pattern``,
``unet.alpha_pattern``, ``unet.target_modules``), exactly as diffusers 0.42's ``save_lora_weights`` writes
it; diffusers builds the LoraConfig from it, so PEFT's scale ``lora_alpha / r`` is ours per module.

Pattern keys are module paths relative to the component (text encoders without ``text_model.``): PEFT matches
them as suffixes, so they fit both transformers 4 (``text_model.encoder…``) and 5 (``encoder…``) CLIP trees.

A LoRA's bias (``lora_B.bias``) and a bias difference beside a LoRA (lightx2v's ``diff_b``, written as
``lora_B.bias = diff_b / scale`` where that is exact, as diffusers' Wan converter reads it) set ``lora_bias`` in the
component's config: without it PEFT builds ``lora_B`` with no bias and diffusers drops the key.

Low-rank deltas fit (LoRA, LoCon, Tucker LoCon, the last contracted exactly into a k×k ``lora_A``), and PEFT
DoRA (``lora_magnitude_vector``, ``use_dora``) when a whole component is DoRA with per-output-row magnitudes.
LoHa, LoKr, full diffs, DoRA on those, per-input DoRA and DoRA mixed with plain LoRA in one component are
refused with an error that points to ``format="kohya"``, which holds them losslessly: expanding them to dense
"rank = min(out, in)" LoRAs would be exact but silently many times larger (and DoRA's rescaling needs the
base weight, so it cannot become a plain LoRA at all).
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterable

import torch

from ..adapter import Adapter
from ..kinds import written_alpha
from ..naming import TEXT_COMPONENTS, ModuleIndex


def _pattern_path(component: str, path: str) -> str:
    if component in TEXT_COMPONENTS and path.startswith("text_model."):
        return path[len("text_model."):]
    return path


def check_diffusers_compatible(adapter: Adapter) -> None:
    """Raise a ValueError naming the layers a diffusers LoRA file cannot hold, and the fix.

    It holds LoRA / LoCon / Tucker LoCon, and PEFT DoRA (a low-rank delta with per-output-row magnitudes)
    when every layer of that component is DoRA: PEFT's ``use_dora`` is one switch per component.
    """
    bad = [(k, why) for k, d in adapter.deltas.items() if (why := d.peft_problem()) is not None]
    if bad:
        kinds = collections.Counter(why for _, why in bad)
        first = {why: key for key, why in reversed(bad)}
        summary = ", ".join(f"{n} {why} (first: {first[why]})" for why, n in sorted(kinds.items()))
        if any(not adapter.deltas[key].has_lora_form for key, _ in bad):
            # a table / a norm's vector: no LoRA holds it, so no merge can make it one either
            fix = ("Save with format='ai-toolkit' (ComfyUI's diffusion_model. names, with diff_m / diff / diff_b as "
                   "lightx2v files have them; transformer families) or 'onetrainer'")
        elif any(adapter.deltas[key].changes_bias for key, _ in bad):  # merge keeps bias differences: no way out there
            fix = "Save with format='kohya' or 'ai-toolkit' (transformer families), which write diff_b as it is"
        else:
            fix = ("Save with format='kohya' (lossless; ComfyUI, A1111 and lorablend load it), or reduce it to a "
                   "low-rank LoRA first with lorablend.merge(..., method='svd')")
        raise ValueError(
            f"adapter {adapter.name!r} cannot be written in diffusers format: it has {summary} layer(s), and "
            f"diffusers' LoRA format holds only low-rank (lora_A/lora_B) layers and PEFT DoRA. {fix}"
        )
    for component in adapter.components():
        dora = [d.kind == "dora" for k, d in adapter.deltas.items() if k.split(".", 1)[0] == component]
        if any(dora) and not all(dora):
            raise ValueError(
                f"adapter {adapter.name!r} mixes DoRA and plain LoRA layers in {component}: diffusers / PEFT "
                f"switch DoRA on for a whole component (use_dora), which would change the plain layers. "
                f"Save with format='kohya', which holds the mix exactly"
            )


def diffusers_state_dict(
    adapter: Adapter, index: ModuleIndex | None = None, progress: Callable[[Iterable], Iterable] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, lora_adapter_metadata)`` for ``adapter``; ``index`` (optional) gives conv layers 4-D factors.

    >>> import torch
    >>> from lorablend import Adapter, LowRankDelta
    >>> a = Adapter("x", "sd1", {"unet.mid_block.attentions.0.proj_in":
    ...                          LowRankDelta(torch.zeros(4, 8), torch.zeros(8, 4), alpha=2.0)})
    >>> tensors, meta = diffusers_state_dict(a)
    >>> sorted(tensors)[0], meta["unet.r"], meta["unet.lora_alpha"]
    ('unet.mid_block.attentions.0.proj_in.lora_A.weight', 4, 2.0)
    """
    check_diffusers_compatible(adapter)
    tensors: dict[str, torch.Tensor] = {}
    per_component: dict[str, dict[str, tuple[int, float]]] = {}
    dora_components: set[str] = set()
    bias_components: set[str] = set()
    items: Iterable = adapter.deltas.items()
    if progress is not None:
        items = progress(items)
    for target_key, delta in items:
        component, path = target_key.split(".", 1)
        info = index.modules.get(target_key) if index is not None else None
        shape = info.weight_shape if info is not None else None
        peft = delta.peft_tensors(shape)
        # PEFT's DoRA key has no ".weight"; set_peft_model_state_dict maps it onto the DoRA layer
        if "lora_magnitude_vector" in peft:
            dora_components.add(component)
        if "lora_B.bias" in peft:  # PEFT builds lora_B without a bias unless the config says lora_bias
            bias_components.add(component)
        tensors.update({f"{target_key}.{suffix}": t for suffix, t in peft.items()})
        rank = int(peft["lora_A.weight"].shape[0])
        alpha = written_alpha(delta)
        if alpha is None:
            alpha = float(rank)  # no alpha = scale 1 = (alpha == rank), the PEFT spelling
        elif rank != delta.rank:  # Tucker core of another width: keep alpha / rank the same
            alpha = alpha * rank / delta.rank
        per_component.setdefault(component, {})[_pattern_path(component, path)] = (rank, alpha)

    metadata: dict[str, Any] = {}
    for component, layers in per_component.items():
        ranks = collections.Counter(r for r, _ in layers.values())
        alphas = collections.Counter(a for _, a in layers.values())
        r = ranks.most_common(1)[0][0]
        lora_alpha = alphas.most_common(1)[0][0]
        config = {
            "r": r,
            "lora_alpha": lora_alpha,
            "rank_pattern": {p: rk for p, (rk, _) in sorted(layers.items()) if rk != r},
            "alpha_pattern": {p: a for p, (_, a) in sorted(layers.items()) if a != lora_alpha},
            "target_modules": sorted(layers),
        }
        if component in dora_components:
            config["use_dora"] = True
        if component in bias_components:
            config["lora_bias"] = True
        metadata.update({f"{component}.{k}": v for k, v in config.items()})
    return tensors, metadata


__all__ = ["diffusers_state_dict", "check_diffusers_compatible"]
