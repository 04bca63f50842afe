"""ModuleIndex: every adaptable layer of a model, and every name other tools use for it.

Built from a real module tree (a live pipeline or model), or read from the shipped data of a standard
architecture (:mod:`.standard`, :mod:`.family_data`). Each Linear / Conv2d of the denoiser (UNet or Flux / SD3
transformer) and text encoders (CLIP, T5), and each norm weight of a transformer (RMSNorm q/k norms: BFL control
LoRAs and kohya diffs change them), gets a canonical target key and the aliases readers meet in files:

* diffusers dotted paths (``down_blocks.1.attentions.0.proj_in``), LDM/SGM dotted paths
  (``input_blocks.4.1.proj_in``), text-encoder paths with and without ``text_model.``;
* kohya flattened names (``lora_unet_input_blocks_4_1_proj_in``, ``lora_unet_down_blocks_…``,
  ``lora_te_…``, ``lora_te1_…``, ``lora_te2_…``, ``lora_te3_…``, ``lora_te2_text_projection``; OneTrainer's
  ``lora_transformer_<diffusers path>``);
* a transformer's original names (BFL Flux ``double_blocks.0.img_attn.qkv``, SAI MMDiT ``joint_blocks.0.x_block…``),
  dotted or kohya-flattened, each leading to one or more modules and the source rows each takes
  (:mod:`.fused`; :meth:`ModuleIndex.lookup_rows`).

Flattened names are looked up, never un-flattened by guessing where underscores were dots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .blocks import transformer_block_label
from .configs import DENOISER_ARCHITECTURES, DENOISER_CLASSES
from .family import FamilyEvidence, detect_family
from .fused import RowSpans, source_names
from .ldm import block_label, ldm_unet_path
from ..quant.formats import weight_shape

# Flux: text_encoder CLIP-L, text_encoder_2 T5-XXL. SD3 / SD3.5: CLIP-L, CLIP-G (OpenCLIP bigG), T5-XXL.
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")
# the component names a pipeline's denoisers go by, in this order: Wan 2.2 A14B has two experts, the high-noise
# `transformer` and the low-noise `transformer_2` (a LoRA pair: one file each); the first one held is "the" denoiser
DENOISER_COMPONENTS = ("unet", "transformer", "transformer_2")


def denoiser_component(components: Any) -> str | None:
    """Which of ``components`` (names, or a mapping / pipeline-like object with those attributes) denoises: the
    first of ``DENOISER_COMPONENTS`` it holds, or None. The one place that answers "unet or transformer".

    >>> denoiser_component(["text_encoder", "transformer"])
    'transformer'
    >>> denoiser_component({"text_encoder": 1}) is None
    True
    """
    if isinstance(components, (list, tuple, set, frozenset, Mapping)):
        names = set(components)
        return next((name for name in DENOISER_COMPONENTS if name in names), None)
    return next((name for name in DENOISER_COMPONENTS if isinstance(getattr(components, name, None), nn.Module)), None)
COMPONENTS = (*DENOISER_COMPONENTS, *TEXT_COMPONENTS)
_KOHYA_PREFIX = {
    "unet": ["lora_unet"],
    "transformer": ["lora_unet", "lora_transformer"],  # lora_transformer_: OneTrainer's Flux names
    "transformer_2": [],  # a file names no expert: one for the low-noise expert is loaded onto it as a whole
    "text_encoder": ["lora_te", "lora_te1"],
    "text_encoder_2": ["lora_te2"],
    "text_encoder_3": ["lora_te3"],
}
RowTarget = tuple[str, "RowSpans | None"]  # (target key, source rows it takes; None: all)


@dataclass(frozen=True)
class ModuleInfo:
    """One adaptable layer: its target key, where it lives in the live model, and its weight's shape."""

    target_key: str
    component: str
    live_path: str
    weight_shape: tuple[int, ...]
    # "linear" | "conv" | "norm" (a transformer's RMSNorm weight: replaced or diffed, never low-rank) | "table" (a
    # transformer's modulation table parameter, Wan's ``scale_shift_table``: diffed by distillation LoRAs' ``diff_m``)
    kind: str
    has_bias: bool
    ldm_path: str | None = None  # UNet modules only

    @property
    def path(self) -> str:
        """The canonical module path inside the component (after ``component.``)."""
        return self.target_key.split(".", 1)[1]


@dataclass
class ModuleIndex:
    """The adaptable layers of one model and the name tables that lead to them.

    >>> from lorablend.naming import module_index
    >>> idx = module_index(family="sdxl")
    >>> idx.lookup_kohya("lora_unet_input_blocks_4_1_proj_in")
    'unet.down_blocks.1.attentions.0.proj_in'
    """

    family: str | None
    modules: dict[str, ModuleInfo]
    unet_config: dict[str, Any] = field(default_factory=dict)
    _dotted: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)
    _kohya: dict[str, str] = field(default_factory=dict, repr=False)
    _sources: dict[str, tuple[RowTarget, ...]] = field(default_factory=dict, repr=False)
    _originals: dict[str, tuple[str, "RowSpans | None"]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index_aliases()
        self._index_sources()

    def _index_sources(self) -> None:
        """The transformer's original names (dotted and kohya-flat) -> the modules and rows they cover; a name
        whose modules this model lacks (Flux schnell has no guidance embedder) is left out."""
        denoiser = DENOISER_ARCHITECTURES.get(self.family or "")
        if denoiser is None or not any(i.component == "transformer" for i in self.modules.values()):
            return
        for name, pieces in source_names(denoiser, self.unet_config).items():
            targets = tuple((f"transformer.{p.path}", p.spans) for p in pieces)
            if all(key in self.modules for key, _ in targets):
                self._sources[name] = targets
                self._sources.setdefault("lora_unet_" + name.replace(".", "_"), targets)
                if ".processor." not in name:  # XLabs' spellings: their layers have BFL names too
                    for key, spans in targets:  # the table's first name of a layer is the one writers use
                        self._originals.setdefault(key, (name, spans))

    def _index_aliases(self) -> None:
        for key, info in self.modules.items():
            comp, path = info.component, info.path
            self._dotted[(comp, path)] = key
            self._dotted.setdefault((comp, info.live_path), key)
            if comp in TEXT_COMPONENTS and path.startswith("text_model."):
                self._dotted.setdefault((comp, path[len("text_model."):]), key)
            if info.ldm_path:
                self._dotted.setdefault((comp, info.ldm_path), key)
            for name in self._kohya_aliases(info):
                self._kohya.setdefault(name, key)

    def _kohya_aliases(self, info: ModuleInfo) -> Iterable[str]:
        paths = [info.path]
        if info.ldm_path:
            paths.append(info.ldm_path)
        if info.component in TEXT_COMPONENTS and info.path.startswith("text_model."):
            paths.append(info.path[len("text_model."):])
        prefixes = list(_KOHYA_PREFIX[info.component])
        if info.component == "text_encoder_2" and info.path.startswith("encoder."):
            prefixes.append("lora_te3")  # Flux's T5: sd-scripts names it lora_te3_, OneTrainer lora_te2_
        for prefix in prefixes:
            for p in paths:
                yield f"{prefix}_{p.replace('.', '_')}"

    @property
    def components(self) -> list[str]:
        return [c for c in COMPONENTS if any(i.component == c for i in self.modules.values())]

    def lookup(self, component: str, dotted_path: str) -> str | None:
        """Target key of a dotted module path (diffusers or LDM/SGM names, ``text_model.`` optional)."""
        return self._dotted.get((component, dotted_path))

    def lookup_kohya(self, flat_name: str) -> str | None:
        """Target key of a kohya flattened module name such as ``lora_te1_text_model_encoder_layers_0_mlp_fc1``."""
        return self._kohya.get(flat_name)

    def lookup_rows(self, name: str) -> tuple[RowTarget, ...] | None:
        """The modules an original transformer name covers, each with the source rows it takes (``None``: all):
        a BFL / SAI dotted name (``double_blocks.0.img_attn.qkv``) or its kohya flat form
        (``lora_unet_double_blocks_0_img_attn_qkv``). None for a name this model does not have.

        >>> from lorablend.naming import module_index
        >>> module_index(family="flux").lookup_rows("lora_unet_double_blocks_0_img_attn_qkv")[1]
        ('transformer.transformer_blocks.0.attn.to_k', ((3072, 6144),))
        """
        return self._sources.get(name)

    def source_names(self) -> list[str]:
        """Every original (BFL / SAI) dotted name :meth:`lookup_rows` knows, in the model's order."""
        return [n for n in self._sources if not n.startswith("lora_unet_")]

    def original_name(self, target_key: str) -> tuple[str, "RowSpans | None"] | None:
        """The inverse of :meth:`lookup_rows` for writers (a kohya-Flux file, a single-file checkpoint in BFL
        names): the original name of the layer a module is (part of), and the rows of it the module is (None: all);
        None for a module without one (a UNet's, a text encoder's).

        >>> from lorablend.naming import module_index
        >>> module_index(family="flux").original_name("transformer.single_transformer_blocks.2.proj_mlp")
        ('single_blocks.2.linear1', ((9216, 21504),))
        """
        return self._originals.get(target_key)

    def kohya_name(self, target_key: str, sgm: bool | None = None) -> str:
        """The kohya name a trainer would write for a target key.

        UNet names use SGM/LDM names for SDXL (as sd-scripts' SDXL trainer does) and diffusers names for
        SD1.x/SD2.x, unless ``sgm`` says otherwise. Text encoders: ``lora_te`` (SD1/2), ``lora_te1``/``lora_te2``
        (SDXL, Flux), ``lora_te3`` (SD3's T5). Transformer modules: OneTrainer's ``lora_transformer_<path>``.
        """
        info = self.modules[target_key]
        if info.component == "unet":
            use_sgm = (self.family == "sdxl") if sgm is None else sgm
            path = info.ldm_path if (use_sgm and info.ldm_path) else info.path
            return "lora_unet_" + path.replace(".", "_")
        if info.component == "transformer":
            return "lora_transformer_" + info.path.replace(".", "_")  # OneTrainer's names: one module each
        if info.component == "text_encoder":
            # SD1/2's one encoder is lora_te; where there are (or the family has) more, kohya numbers them
            prefix = "lora_te1" if {"text_encoder_2", "transformer"} & set(self.components) else "lora_te"
        else:
            prefix = _KOHYA_PREFIX[info.component][0]
        return f"{prefix}_{info.path.replace('.', '_')}"

    def block(self, target_key: str) -> str:
        """The block label of a target key: ``BASE`` for text encoders, else ``IN00``…, ``M00``, ``OUT00``…,
        ``TIME`` (time/label embeddings) or ``FINAL`` (conv_out) — the A1111 LoRA-Block-Weight vocabulary,
        which means the same for SD1.x and SDXL and covers resnets and samplers as well as attentions; for a
        transformer ``D00``… / ``S00``… (Flux double / single blocks), ``J00``… (SD3 joint blocks), ``TIME``,
        ``EMBED`` (patch and text embedders) and ``FINAL`` (see :func:`~lorablend.naming.blocks.transformer_block_label`)."""
        info = self.modules.get(target_key)
        if info is None:
            return "OTHER"
        if info.component in TEXT_COMPONENTS:
            return "BASE"
        if info.component in ("transformer", "transformer_2"):  # (both experts: one vocabulary)
            return transformer_block_label(info.path, DENOISER_ARCHITECTURES.get(self.family or "", ""))
        return block_label(info.ldm_path)

    def block_labels(self) -> list[str]:
        """All block labels of this model in UNet order: BASE, TIME, IN00…, M00, OUT00…, FINAL."""
        labels = {self.block(k) for k in self.modules}
        rank = {"BASE": 0, "TIME": 1, "EMBED": 2, "IN": 3, "D": 3, "J": 3, "B": 3, "NR": 3, "CR": 3.5, "L": 4,
                "M": 4, "S": 4, "OUT": 5, "FINAL": 6}

        def order(label: str) -> tuple[float, int]:
            head = label.rstrip("0123456789")
            tail = label[len(head):]
            return rank.get(head, 7), int(tail) if tail else 0

        return sorted(labels, key=order)


def _canonical_text_path(live_path: str, model: nn.Module) -> str:
    if not type(model).__name__.startswith("CLIP"):  # T5: its own paths (encoder.block.0.layer.0.SelfAttention.q)
        return live_path
    if live_path.startswith("text_model.") or live_path == "text_projection":
        return live_path
    return "text_model." + live_path


def _norm_weight(module: nn.Module) -> bool:
    """A transformer's affine norm (RMSNorm q/k norms): one 1-D weight, no Linear / Conv."""
    weight = getattr(module, "weight", None)
    return "Norm" in type(module).__name__ and isinstance(weight, torch.Tensor) and weight.dim() == 1


def _module_kind(component: str, module: nn.Module) -> str | None:
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if component.startswith("transformer") and _norm_weight(module):
        return "norm"
    return None


# the modulation tables a transformer adds to its timestep embedding (Wan's blocks and head: ``scale_shift_table``,
# ``modulation`` in Wan's own names): a parameter of its block, no Linear, that lightx2v / Kijai ``diff_m`` keys diff
TABLE_PARAMETERS = ("scale_shift_table",)


def _tables(component: str, model: nn.Module) -> dict[str, ModuleInfo]:
    """A transformer's modulation tables as layers of kind ``table``: target key ``<component>.<owner>.<param>``,
    live path the same dotted path (the runtime reaches the parameter through its owner)."""
    out: dict[str, ModuleInfo] = {}
    if component not in DENOISER_COMPONENTS or not component.startswith("transformer"):
        return out
    for owner_path, owner in model.named_modules():
        for name in TABLE_PARAMETERS:
            table = owner._parameters.get(name)
            if isinstance(table, torch.Tensor) and table.dim() == 3:
                path = f"{owner_path}.{name}" if owner_path else name
                out[f"{component}.{path}"] = ModuleInfo(f"{component}.{path}", component, path, tuple(table.shape),
                                                        "table", False)
    return out


def _index_component(component: str, model: nn.Module, unet_config: dict | None) -> dict[str, ModuleInfo]:
    out: dict[str, ModuleInfo] = _tables(component, model)
    # A weight tied to another module's (a language model's lm_head is its token embedding): a delta there would act
    # on one module unfused and on both fused; and no pipeline runs an LM head (Mistral / Qwen text encoders). Skipped.
    seen = [id(p) for _, p in model.named_parameters(remove_duplicate=False)]
    tied = {i for i in seen if seen.count(i) > 1} if len(seen) != len(set(seen)) else set()
    for live_path, module in model.named_modules():
        kind = _module_kind(component, module)
        if kind is None or id(module.weight) in tied:
            continue
        if component in DENOISER_COMPONENTS:
            path = live_path
            ldm = ldm_unet_path(path, unet_config or {}) if unet_config and component == "unet" else None
        else:
            path, ldm = _canonical_text_path(live_path, model), None
        key = f"{component}.{path}"
        out[key] = ModuleInfo(
            target_key=key,
            component=component,
            live_path=live_path,
            weight_shape=weight_shape(module),  # (a quantized linear: its logical out × in)
            kind=kind,
            has_bias=getattr(module, "bias", None) is not None,
            ldm_path=ldm,
        )
    return out


def _unet_config(unet: nn.Module) -> dict:
    cfg = getattr(unet, "config", None)
    return dict(cfg) if cfg is not None else {}


def _transformer_evidence(transformer: nn.Module) -> FamilyEvidence:
    cfg = _unet_config(transformer)
    heads, head_dim = cfg.get("num_attention_heads"), cfg.get("attention_head_dim")
    width = heads * head_dim if isinstance(heads, int) and isinstance(head_dim, int) else cfg.get("dim")
    name = type(transformer).__name__
    by_class = {cls: arch for arch, (_, cls) in DENOISER_CLASSES.items()}
    architecture = by_class.get(name) or ("flux" if "Flux" in name else "sd3" if "SD3" in name else None)
    return FamilyEvidence(
        transformer=architecture,
        transformer_width=width if isinstance(width, int) else None,
        dual_attention=bool(cfg.get("dual_attention_layers")),
        image_branch=bool(cfg.get("added_kv_proj_dim")) and architecture == "wan",
    )


def family_of_target(components: dict[str, nn.Module]) -> str | None:
    """Family of a live model, by :func:`~lorablend.naming.family.detect_family` from its configs (a UNet-less
    model's text width stands for the cross-attention width); SD1.x when they say nothing (a tiny test model).

    >>> family_of_target({})
    'sd1'
    """
    if "transformer" in components:
        return detect_family(_transformer_evidence(components["transformer"])) or "flux"
    unet = components.get("unet")
    cfg = _unet_config(unet) if unet is not None else {}
    width = cfg.get("cross_attention_dim")
    if unet is None and "text_encoder" in components:
        width = getattr(getattr(components["text_encoder"], "config", None), "hidden_size", None)
    evidence = FamilyEvidence(
        second_text_encoder="text_encoder_2" in components,
        text_time_embedding=cfg.get("addition_embed_type") == "text_time",
        cross_attention_width=width if isinstance(width, int) else None,
    )
    return detect_family(evidence) or "sd1"


def components_of(target: Any) -> dict[str, nn.Module]:
    """The adaptable components of a pipeline (diffusers or ours), a dict of modules, or one model."""
    inner = getattr(target, "pipe", None)  # lorablend.DiffusionPipeline wraps a diffusers pipeline
    if inner is not None and not isinstance(target, nn.Module):
        target = inner
    if isinstance(target, dict):
        return {k: v for k, v in target.items() if k in COMPONENTS and v is not None}
    if isinstance(target, nn.Module):
        name = type(target).__name__
        if "UNet" in name:
            return {"unet": target}
        if "Transformer2DModel" in name or "Transformer3DModel" in name:  # Flux, SD3, Qwen-Image, Wan …
            return {"transformer": target}
        if "CLIPText" in name:
            return {"text_encoder": target}
        raise TypeError(f"cannot tell which pipeline component a {name} is; pass a dict {{'unet': model, ...}}")
    # diffusers registers components as instance attributes; asking the instance for an absent one goes through
    # diffusers' slow __getattr__ (config lookups), so only a name the class itself defines (a property) is asked
    own = getattr(target, "__dict__", {})
    comps = {c: own[c] if c in own else (getattr(target, c, None) if hasattr(type(target), c) else None)
             for c in COMPONENTS}
    comps = {c: m for c, m in comps.items() if isinstance(m, nn.Module)}
    if not comps:
        raise TypeError(
            f"target must be a pipeline with unet / text_encoder components, a model or a dict of them; "
            f"got {type(target).__name__}"
        )
    return comps


def index_from_components(components: dict[str, nn.Module], family: str | None = None) -> ModuleIndex:
    """Index a live model's components (``{"unet": unet, "text_encoder": te, ...}``)."""
    modules: dict[str, ModuleInfo] = {}
    unet_cfg: dict = {}
    for comp in COMPONENTS:
        model = components.get(comp)
        if model is None:
            continue
        if comp in DENOISER_COMPONENTS:
            unet_cfg = _unet_config(model)  # the denoiser's config: a UNet's or a transformer's
        modules.update(_index_component(comp, model, unet_cfg if comp in DENOISER_COMPONENTS else None))
    return ModuleIndex(family=family or family_of_target(components), modules=modules, unet_config=unet_cfg)

