"""``load_adapter``: any LoRA source -> one canonical :class:`~lorablend.adapter.Adapter` with a full report.

The steps, each in its own module: read the bytes (:mod:`.files`), refuse positional legacy formats
(:mod:`.legacy`), detect the format and sort keys into modules (:mod:`.detect`, :mod:`.read_kohya`,
:mod:`.read_diffusers`), build one Delta per module (:mod:`.deltas`), then resolve each module's name through a
ModuleIndex and check its shape against the module's weight.

Names resolve against ``target``'s module tree when a target is given (its family is the target's), else
against the standard architecture of the family whose modules the file's tensors fit best (SD1.x, SD2.x,
SDXL, Flux.1, SD3, SD3.5 medium / large, decided by names and shapes: SD1 cross-attention reads 768-wide text, SD2
1024, SDXL 2048; Flux's joint attention is 3072 wide, SD3's 1536, SD3.5 large's 2432).

A name of a fused layer (Flux ``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1``, SD3
``joint_blocks.N.x_block.attn.qkv``) resolves to several modules, each with the rows it takes
(:meth:`~lorablend.naming.ModuleIndex.lookup_rows`); the module's Delta gives each its exact rows
(``delta.take_rows``). Each of the group's keys is then reported mapped to the first of those modules, the reason
naming all of them and their rows. A Flux control LoRA's ``img_in`` delta reads more input channels than the
plain model's ``x_embedder`` (the control image's latents): it is mapped, and ``adapter.widened_inputs`` says
which module needs how many input features, so that a control pipeline can widen it and a plain one can refuse.

Decisions:

* Every input key ends up in ``adapter.report`` as mapped (with its target key), unsupported (with why:
  an algorithm we do not apply, an embedding, a shape that does not fit, a layer the target lacks) or
  unknown (a name that is no layer of any model we know).
* With a target, layers that do not fit are reported, not raised: the runtime's ``strict`` decides.
  A file none of whose keys name a layer of any family we cover (``adapter.FAMILIES``) is not a LoRA we can read:
  :class:`~lorablend.errors.LoraFormatError`, with or without a target.
* Without a target, a file none of whose layers fits any standard family also raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from ..adapter import FAMILIES, Adapter, Delta
from ..errors import LoraFormatError
from ..naming import DENOISER_COMPONENTS, FamilyEvidence, ModuleIndex, detect_family, module_index, standard_index
from ..naming.family import uncovered_family
from ..naming.configs import DENOISER_ARCHITECTURES
from ..naming.fused import WIDENED_INPUTS
from ..report import LoadReport
from ..runtime.transfer import deltas_to
from .deltas import DeltaProblem, ModuleGroup, build_delta, delta_shape, shape_problem
from .detect import READ_FORMATS, detect_format, diagnose, embedding_reason, sort_keys
from .files import RawSource, check_finite, read_source
from .legacy import is_cloneofsimo, refuse_cloneofsimo
from .read_diffusers import parse_diffusers
from .read_kohya import parse_kohya
from .read_original import parse_original
from .write_kohya import architecture_family

_FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "flux": "Flux.1", "sd3": "SD3 medium",
                 "sd35-medium": "SD3.5 medium", "sd35-large": "SD3.5 large", "qwen-image": "Qwen-Image",
                 "wan-1.3b": "Wan 2.1 T2V 1.3B", "wan-14b": "Wan 14B (2.1 T2V, 2.2 A14B expert)",
                 "wan-i2v-14b": "Wan 2.1 I2V 14B", "wan-5b": "Wan 2.2 TI2V 5B", "flux2-dev": "Flux.2 dev",
                 "flux2-klein-4b": "Flux.2 klein 4B", "flux2-klein-9b": "Flux.2 klein 9B", "z-image": "Z-Image",
                 "chroma": "Chroma"}
_KNOWN = "SD1.x / SD2.x / SDXL / Flux.1 / SD3 / SD3.5 / Qwen-Image / Wan / Flux.2 / Z-Image / Chroma"
Targets = tuple[tuple[str, Any], ...]  # ((target key, source row spans or None), ...)


def load_adapter(
    source: Any,
    *,
    target: Any = None,
    format: str | None = None,
    name: str | None = None,
    weight_name: str | None = None,
    device: torch.device | str | None = None,
    family: str | None = None,
) -> Adapter:
    """Read a LoRA file, folder or state dict into an :class:`Adapter` whose report accounts for every key.

    ``source``: a ``.safetensors`` / ``.bin`` / ``.pt`` path, a folder with one weight file (``weight_name``
    picks one of several), or a dict of tensors (left unchanged). ``target``: a pipeline, a
    ``lorablend.DiffusionPipeline``, a model or a dict of components to resolve names against.
    ``format``: ``"diffusers"``, ``"kohya"`` or ``"original"`` to skip detection (never needed for a well-formed file).
    ``name`` defaults to the file's stem. ``device`` puts the adapter's tensors there (e.g. ``"cuda"``): the file
    is then mapped, not copied on the host, and goes to the device in one transfer per span of bytes.
    ``family`` (one of ``lorablend.adapter.FAMILIES``; without ``target``): read the file as that family's standard
    model. Needed only where the file cannot tell: its layers fit families of different models alike (an
    attention-only excerpt fits Flux.1, Qwen-Image and Flux.2 klein 4B), which is refused as ambiguous, never guessed.

    >>> adapter = load_adapter("pytorch_lora_weights.safetensors")           # doctest: +SKIP
    >>> adapter.family, adapter.report.counts()                             # doctest: +SKIP
    ('sd1', {'mapped': 256, 'unsupported': 0, 'unknown': 0})
    """
    device = torch.device(device) if device is not None else None
    raw = read_source(source, weight_name=weight_name, mapped=device is not None and device != torch.device("cpu"))
    keys = list(raw.tensors)
    if is_cloneofsimo(keys):
        refuse_cloneofsimo(keys, raw.label)
    check_finite(raw.tensors, raw.label)
    _refuse_uncovered(raw)
    fmt, groups, leftovers = _parse(raw, format)
    built = [_build(g, raw.tensors) for g in groups]

    family, idx, also_fits = _family_and_index(raw, groups, built, target, family)

    report = LoadReport(source=raw.label, format=fmt)
    status: dict[str, tuple[str, str | None, str]] = {k: (s, None, r) for k, s, r in leftovers}
    placed = _Placed()
    for group, (delta, problem) in zip(groups, built):
        targets = _targets(idx, group)
        if targets is None:
            record = _unresolved(group, idx, family, target is not None)
        elif "replace" in group.parts:
            record = placed.replace(group, raw.tensors[group.parts["replace"]], targets, idx)
        elif problem is not None:
            record = ("unsupported", None, problem)
        else:
            record = placed.place(group, delta, targets, idx)
        for key in group.all_keys():
            status[key] = record
    deltas = placed.deltas
    for key in keys:
        s, t, reason = status[key]
        report.add(key, s, target=t, reason=reason)
    if device is not None:  # one transfer for the whole adapter; the map of the file is dropped with ``raw``
        moved = deltas_to(list(deltas.values()), device)
        deltas = dict(zip(deltas, moved))
    return Adapter(
        name=name or raw.name,
        family=family,
        deltas=deltas,
        metadata=dict(raw.metadata),
        report=report,
        format=fmt,
        widened_inputs=placed.widened,
        replacements=placed.replacements,
        also_fits=also_fits,
    )


class _Placed:
    """The deltas placed so far: each target key once, the rows of a fused layer given to each of its modules."""

    def __init__(self) -> None:
        self.deltas: dict[str, Delta] = {}
        self.claimed: dict[str, str] = {}
        self.widened: dict[str, int] = {}
        self.replacements: dict[str, torch.Tensor] = {}

    def replace(self, group: ModuleGroup, value: torch.Tensor, targets: Targets,
                idx: ModuleIndex) -> tuple[str, str | None, str]:
        """A norm's whole new weight (diffusers' Flux norm keys): kept apart from the deltas, for the pipeline to
        put in place at load and take back on unload."""
        key = targets[0][0]
        info = idx.modules[key]
        if len(targets) > 1 or targets[0][1] is not None or info.kind != "norm":
            return ("unsupported", None, f"a whole weight for {key}, which is no norm: only a norm's weight is replaced")
        if tuple(value.shape) != tuple(info.weight_shape):
            return ("unsupported", None, f"a weight of shape {tuple(value.shape)} for {key}, which is "
                                         f"{tuple(info.weight_shape)}: made for another model")
        self.replacements[key] = value
        return ("mapped", key, "replaces the norm's weight (restored on unload_lora_weights), as diffusers does")

    def place(self, group: ModuleGroup, delta: Delta, targets: Targets, idx: ModuleIndex) -> tuple[str, str | None, str]:
        """Place one module's delta on its target(s) (all or none), and say what became of its keys."""
        pieces, widened, padded = {}, {}, {}
        rows = max((stop for _, spans in targets if spans for _, stop in spans), default=0)
        if rows and delta.out_features != rows:
            return ("unsupported", None, f"its ΔW has {delta.out_features} rows but {group.name} has {rows} "
                                         f"({', '.join(k for k, _ in targets)}): made for another model")
        for key, spans in targets:
            if key in self.claimed:
                return ("unsupported", None, f"{self.claimed[key]!r} in this file already targets {key}")
            try:
                piece = delta if spans is None else delta.take_rows(spans)
            except DeltaProblem as e:
                return ("unsupported", None, f"cannot split {group.name} into {key} …: {e}")
            shape = idx.modules[key].weight_shape
            why = shape_problem(piece, shape)
            if why is not None and _widens(idx, key, piece, shape):
                why, widened[key] = None, int(piece.shape[1])
            elif why is not None and _widens(idx, key, _Wider(shape), piece.shape):
                try:  # a plain LoRA on an input widened for a control image: zero columns, as diffusers pads it
                    piece, why, padded[key] = piece.pad_inputs(shape[1]), None, int(piece.shape[1])
                except DeltaProblem as e:
                    why = str(e)
            if why is not None:
                return ("unsupported", None, f"does not fit {key}: {why}")
            pieces[key] = piece
        self.deltas.update(pieces)
        self.claimed.update(dict.fromkeys(pieces, group.name))
        self.widened.update(widened)
        reason = "; ".join([n for n in [_mapped_reason(targets, widened, idx)] if n] + [
            f"zero-padded from {w} to {idx.modules[k].weight_shape[1]} input features ({k} is widened: the new "
            f"inputs carry {_widenable(idx).get(k.split('.', 1)[1], '')})" for k, w in padded.items()])
        return ("mapped", targets[0][0], reason)


class _Wider:
    """A stand-in with a module's weight shape, so that ``_widens`` answers the reverse question: does the module
    read MORE inputs than the delta (a narrow LoRA on an input a control LoRA or a control model widened)?"""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)


def _widenable(idx: ModuleIndex) -> dict[str, str]:
    return WIDENED_INPUTS.get(DENOISER_ARCHITECTURES.get(idx.family or "", ""), {})


def _widens(idx: ModuleIndex, key: str, delta: Delta, shape: tuple[int, ...]) -> bool:
    """A delta that reads more input features than the module has, on an input a LoRA may widen (naming data)."""
    paths = _widenable(idx)
    natural = delta.shape
    return (key.split(".", 1)[1] in paths and len(natural) == 2 == len(shape) and natural[0] == shape[0]
            and natural[1] > shape[1])


def _mapped_reason(targets: Targets, widened: dict[str, int], idx: ModuleIndex) -> str:
    notes = []
    if len(targets) > 1 or targets[0][1] is not None:
        notes.append("rows of a fused layer: " + ", ".join(
            f"{k} rows {'+'.join(f'{a}:{b}' for a, b in spans)}" for k, spans in targets))
    for key, width in widened.items():
        have = idx.modules[key].weight_shape[1]
        why = _widenable(idx).get(key.split(".", 1)[1], "")
        notes.append(f"widens {key} from {have} to {width} input features ({why}): needs a control pipeline")
    return "; ".join(notes)


def _parse(raw: RawSource, forced: str | None) -> tuple[str, list[ModuleGroup], list[tuple[str, str, str]]]:
    keys = list(raw.tensors)
    leftovers: list[tuple[str, str, str]] = []
    rest = []
    for key in keys:
        why = embedding_reason(key)
        if why:
            leftovers.append((key, "unsupported", why))
        else:
            rest.append(key)
    if forced is not None:
        if forced not in READ_FORMATS:
            raise LoraFormatError(f"{raw.label}: format={forced!r} is not one we read; use one of {READ_FORMATS} or None")
        fmt = forced
        routed = {"kohya": [], "original": [], "diffusers": [], "other": []}
        routed[forced] = rest
    else:
        fmt = detect_format(rest)
        routed = sort_keys(rest)
        if fmt == "unknown":
            if not rest:
                raise LoraFormatError(
                    f"{raw.label}: holds only textual-inversion embeddings ({keys[:3]}), no LoRA layers; "
                    f"load it with the pipeline's load_textual_inversion"
                )
            raise LoraFormatError(
                f"{raw.label}: none of its {len(keys)} keys is spelled like a LoRA key of a format lorablend reads "
                f"(kohya lora_unet_…/lora_te…, diffusers/PEFT …lora_A/lora_B, …lora.down/up, BFL / ComfyUI "
                f"double_blocks…); first keys: {keys[:3]}.{diagnose(keys)}"
            )
    groups: list[ModuleGroup] = []
    readers = {"kohya": parse_kohya, "original": parse_original,
               "diffusers": lambda tensors: parse_diffusers(tensors, raw.metadata)}
    for fmt_name, parse in readers.items():
        if routed[fmt_name]:
            g, left = parse({k: raw.tensors[k] for k in routed[fmt_name]})
            groups += g
            leftovers += left
    other = routed["other"]
    for key in other:
        leftovers.append((key, "unknown", "not a key of any LoRA format lorablend reads"))
    return fmt, groups, leftovers


def _build(group: ModuleGroup, tensors: dict[str, torch.Tensor]) -> tuple[Delta | None, str | None]:
    try:
        return build_delta(group, tensors), None
    except DeltaProblem as e:
        return None, str(e)


def _targets(idx: ModuleIndex, group: ModuleGroup) -> Targets | None:
    """The module(s) a group's name means in this index, each with the source rows it takes (None: all)."""
    kind = group.lookup[0]
    if kind == "kohya":
        key = idx.lookup_kohya(group.lookup[1])
        return ((key, None),) if key is not None else idx.lookup_rows(group.lookup[1])
    candidates = group.lookup[1]
    if kind == "original":
        rows = idx.lookup_rows(group.lookup[1])
        if rows is not None:
            return rows
        candidates = group.lookup[2]
    for component, path in candidates:
        key = idx.lookup(component, path)
        if key is not None:
            return ((key, None),)
    for component, path in candidates:  # a bare original name (DiffSynth's Wan, OneTrainer's Chroma approximator)
        rows = idx.lookup_rows(path) if component == "transformer" else None
        if rows is not None:
            return rows
    return None


def _resolve(idx: ModuleIndex, group: ModuleGroup) -> str | None:
    """The (first) target key of a group's name in this index."""
    targets = _targets(idx, group)
    return targets[0][0] if targets else None


def _unresolved(group: ModuleGroup, idx: ModuleIndex, family: str, has_target: bool) -> tuple[str, None, str]:
    where = "the target" if has_target else f"the {_FAMILY_NAMES[family]} model"
    for fam in FAMILIES:
        other = _resolve(standard_index(fam), group)
        if other is not None:
            return ("unsupported", None, f"{where} has no such layer (it names {other} of a {_FAMILY_NAMES[fam]} model)")
    return ("unknown", None, f"no layer named {group.name!r} in {where} or any {_KNOWN} model")


def _require_some_name(raw: RawSource, groups: list[ModuleGroup], idx: ModuleIndex) -> None:
    if any(_resolve(idx, g) for g in groups):
        return
    if any(_resolve(standard_index(f), g) for f in FAMILIES for g in groups):
        return
    _no_layer_error(raw)


def _no_layer_error(raw: RawSource) -> None:
    keys = list(raw.tensors)
    raise LoraFormatError(
        f"{raw.label}: none of its {len(keys)} keys names a layer of an {_KNOWN} model "
        f"(first key {keys[0]!r}), so there is nothing to load.{diagnose(keys)}"
    )


def _family_hint(group: ModuleGroup, delta: Delta | None) -> str | None:
    """What one module says about the family (by ``naming.detect_family``): a layer of a second text encoder,
    or a cross-attention key projection, whose input width is the width of the text it reads."""
    kind, name = group.lookup[0], group.lookup[1]
    second_encoder = kind == "kohya" and name.startswith(("lora_te1_", "lora_te2_"))  # te1/te2: two encoders
    if kind == "dotted":
        component, name = name[0]
        second_encoder = second_encoder or component == "text_encoder_2"
    width = None
    if delta is not None and ("attn2_to_k" in name or "attn2.to_k" in name):
        shape = delta_shape(delta)
        width = shape[1] if len(shape) > 1 else None
    return detect_family(FamilyEvidence(second_text_encoder=second_encoder, cross_attention_width=width))


def _family_order(groups: list[ModuleGroup], built: list[tuple[Delta | None, str | None]]) -> list[str]:
    """Families in the order to prefer on a tie: the first hint the keys and shapes give, then sd1, sdxl, sd2,
    then the transformer families in FAMILIES' order (SD3 medium before SD3.5 medium: a file without attn2 layers
    or q/k norms fits both)."""
    hint = next((h for g, (d, _) in zip(groups, built) if (h := _family_hint(g, d))), None)
    return list(dict.fromkeys([h for h in (hint,) if h] + ["sd1", "sdxl", "sd2", *FAMILIES]))


def _fits(idx: ModuleIndex, delta: Delta, targets: Targets) -> bool:
    """Whether a delta fits the module(s) its name means: whole, or as the rows of a fused layer (the same
    input width as each module, as many rows as the pieces take)."""
    if len(targets) == 1 and targets[0][1] is None:
        return shape_problem(delta, idx.modules[targets[0][0]].weight_shape) is None
    rows = max(stop for _, spans in targets if spans for _, stop in spans)
    return delta.out_features == rows and all(
        tuple(idx.modules[key].weight_shape[1:]) == tuple(delta.shape[1:]) for key, _ in targets)


def _family_and_index(raw: RawSource, groups: list[ModuleGroup], built: list[tuple[Delta | None, str | None]],
                      target: Any, family: str | None) -> tuple[str, ModuleIndex, tuple[str, ...]]:
    """The family the file is read as, the index its names resolve against, and the families it fits as well: the
    target's, else the caller's ``family=``, else the one its layers fit best (a tie across models refused unless
    the file's ``modelspec.architecture`` settles it)."""
    if target is not None:
        idx = module_index(target)
        _require_some_name(raw, groups, idx)
        return (idx.family if idx.family in FAMILIES else "sd1"), idx, ()
    if family is not None:
        if family not in FAMILIES:
            raise ValueError(f"family={family!r} is not a family lorablend covers; choose one of {', '.join(FAMILIES)}")
        idx = standard_index(family)
        if not any(_resolve(idx, g) for g in groups):
            raise LoraFormatError(f"{raw.label}: none of its layers is a layer of {family} (family={family!r}); "
                                  "leave family out to let the file's names and shapes tell")
        return family, idx, ()
    family, also_fits = _choose_family(raw, groups, built)
    declared = architecture_family(raw.metadata.get("modelspec.architecture", "").split("/")[0])
    if declared in also_fits:  # a tie the file's own metadata settles (kohya / lorablend write model-spec ids)
        family, also_fits = declared, tuple(f for f in (family, *also_fits) if f != declared)
    idx = standard_index(family)
    if declared != family:
        _refuse_ambiguous(raw, family, also_fits, groups, idx)
    return family, idx, also_fits


def _lineage(family: str) -> str:
    """The model a family's LoRAs are for, as far as a tie between families is harmless: the same denoiser
    architecture (Wan 2.1 T2V / I2V 14B, SD3 / SD3.5 medium), and Chroma with Flux.1 (Flux.1 schnell retrained:
    the same block names and widths; an attention-only Flux.1 LoRA fits both). The UNet families tie as they always
    did, to SD1.x (a file of layers SD1.x and SD2.x share, e.g. resnets only, reads as sd1 with ``also_fits`` sd2:
    a known limit, left as it was)."""
    return "flux" if family == "chroma" else DENOISER_ARCHITECTURES.get(family, "unet")


def _refuse_ambiguous(raw: RawSource, family: str, also_fits: tuple[str, ...], groups: list[ModuleGroup],
                      idx: ModuleIndex) -> None:
    """A file whose every layer fits families of different models just as well is refused, never read as the first
    of them (a Qwen-Image excerpt read as Flux.1 would half-apply to the wrong model). A file of text-encoder layers
    only is not: those encoders (CLIP-L, OpenCLIP bigG) are the same module in every family that has them."""
    others = [f for f in also_fits if _lineage(f) != _lineage(family)]
    denoises = any((key := _resolve(idx, g)) and key.split(".", 1)[0] in DENOISER_COMPONENTS for g in groups)
    if others and denoises:
        fits = ", ".join([family, *also_fits])
        raise LoraFormatError(
            f"{raw.label}: ambiguous: its layers fit {fits} alike (the same names and shapes in each), so the file "
            f"cannot tell which model it is for. Pass family=… (load_adapter(file, family={others[0]!r}), one of "
            f"{fits}; on the command line --family {others[0]}) or load it into its pipeline "
            "(pipeline.load_lora_weights(file))")


def _refuse_uncovered(raw: RawSource) -> None:
    """A LoRA of a model family lorablend knows of but does not cover (HiDream, HunyuanVideo) is refused by name,
    never read as the covered family that shares some of its layer names (naming.family.UNCOVERED_FAMILIES)."""
    found = uncovered_family(raw.tensors)
    if found is not None:
        name, key = found
        raise LoraFormatError(
            f"{raw.label}: a {name} LoRA (its key {key!r} names a layer only {name} has); lorablend does not cover "
            f"{name} (it reads {_KNOWN}), so nothing is loaded rather than part of it applied to another model"
        )


_BLOCK_INDEX = re.compile(r"(blocks[._])(\d+)(?=[._])")


def _refuse_blocks_beyond(raw: RawSource, groups: list[ModuleGroup],
                          built: list[tuple[Delta | None, str | None]], family: str) -> None:
    """Refuse a file that names a block the chosen transformer family does not have while the same layer of its
    block 0 fits the shape: a LoRA of a deeper model with the same block names and widths (HunyuanVideo: 40 single
    blocks at Flux.1's width, Flux.1 has 38), which would otherwise half-apply. UNet families are left out: their
    blocks differ from one another by design."""
    if DENOISER_ARCHITECTURES.get(family, "unet") == "unet":
        return
    idx = standard_index(family)
    for group, (delta, _) in zip(groups, built):
        if delta is None or _targets(idx, group) is not None or not _BLOCK_INDEX.search(group.name):
            continue
        first = ModuleGroup(group.name, group.parts, _at_block_zero(group.lookup))
        targets = _targets(idx, first)
        if targets is not None and _fits(idx, delta, targets):
            raise LoraFormatError(
                f"{raw.label}: its layer {group.name!r} is in a block the {_FAMILY_NAMES[family]} model does not "
                f"have, though the same layer of block 0 fits its shape: a LoRA of a deeper model with "
                f"{_FAMILY_NAMES[family]}'s names and widths (HunyuanVideo has 40 single blocks at Flux.1's width), so "
                "nothing is loaded rather than part of it applied. If it is for this model, remove the keys of the "
                "blocks it lacks"
            )


def _at_block_zero(lookup: Any) -> Any:
    """A group's lookup with every block index set to 0 (``single_blocks.38.linear2`` -> ``single_blocks.0.linear2``)."""
    if isinstance(lookup, str):
        return _BLOCK_INDEX.sub(r"\g<1>0", lookup)
    if isinstance(lookup, (tuple, list)):
        return type(lookup)(_at_block_zero(x) for x in lookup)
    return lookup


def _choose_family(raw: RawSource, groups: list[ModuleGroup],
                   built: list[tuple[Delta | None, str | None]]) -> tuple[str, tuple[str, ...]]:
    """The standard family whose modules the most layers fit (by name and shape), ties to the hints; and the other
    families that every layer fits just as well (the file alone cannot tell them apart)."""
    scores: dict[str, tuple[int, int]] = {}
    for fam in _family_order(groups, built):
        idx = standard_index(fam)
        fit = named = 0
        for group, (delta, _) in zip(groups, built):
            targets = _targets(idx, group)
            if targets is None:
                continue
            named += 1
            if delta is not None and _fits(idx, delta, targets):
                fit += 1
        scores[fam] = (fit, named)
    best = max(scores, key=lambda f: scores[f])  # max keeps the first of equals: the hint order
    fit, named = scores[best]
    if fit:
        _refuse_blocks_beyond(raw, groups, built, best)
        return best, tuple(f for f in scores if f != best and scores[f] == scores[best])
    if not named:
        _no_layer_error(raw)
    problems = sorted({p for _, p in built if p})
    if problems and all(d is None for d, _ in built):
        raise LoraFormatError(
            f"{raw.label}: none of its {len(groups)} modules can be applied: {'; '.join(problems[:3])}"
        )
    idx = standard_index(best)
    example = next(
        (f"{g.name}: its ΔW is {d.shape}, {k} is {idx.modules[k].weight_shape}"
         for g, (d, _) in zip(groups, built) if d is not None and (k := _resolve(idx, g))),
        "",
    )
    raise LoraFormatError(
        f"{raw.label}: its layers name modules we know but their shapes fit no {_KNOWN} model "
        f"(e.g. {example}); it was made for another model"
    )


@dataclass
class UnplacedLayers:
    """A LoRA file read as far as it can be without knowing its model: its format, one Delta per module of the
    file (keyed by the file's own module name), why some modules make no Delta, the keys no reader took, and how
    many of its module names each known family has (its names may be known while its shapes are not)."""

    label: str
    format: str
    metadata: dict[str, str]
    deltas: dict[str, Delta]
    problems: dict[str, str]
    leftovers: list[tuple[str, str, str]]
    names_known: dict[str, int]


def family_from_header(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str] | None = None) -> str | None:
    """The family ``load_adapter`` reads a file as, from its key names and shapes alone (no tensor read: what a
    listing shows before a file is parsed); None where it would refuse the file (no family places it, an uncovered
    or an ambiguous one).

    >>> family_from_header({"transformer.blocks.0.attn1.to_q.lora_A.weight": (4, 5120),
    ...                     "transformer.blocks.0.attn1.to_q.lora_B.weight": (5120, 4)})
    'wan-14b'
    """
    # every tensor on the meta device (shapes only); a scalar (an alpha) as a real one: its value decides no family
    tensors = {k: torch.ones(()) if len(s) == 0 else torch.empty(tuple(s), device="meta") for k, s in shapes.items()}
    raw = RawSource(tensors, dict(metadata or {}), label="<header>")
    try:
        _refuse_uncovered(raw)
        _, groups, _ = _parse(raw, None)
        built = [_build(g, tensors) for g in groups]
        return _family_and_index(raw, groups, built, None, None)[0]
    except (LoraFormatError, ValueError):
        return None


def read_layers(source: Any, *, format: str | None = None, weight_name: str | None = None) -> UnplacedLayers:
    """Read a LoRA file's layers without placing them on any model: what ``lorablend inspect`` shows for a file
    whose family is not known. Raises ``LoraFormatError`` for what is no LoRA at all (unreadable bytes, NaN /
    Inf, keys of no LoRA format), exactly as :func:`load_adapter` does.

    >>> layers = read_layers("tiny_sdxl_lora.safetensors")                  # doctest: +SKIP
    >>> layers.format, len(layers.deltas), layers.names_known               # doctest: +SKIP
    ('diffusers', 140, {'sdxl': 140, 'sd1': 96})
    """
    raw = read_source(source, weight_name=weight_name)
    keys = list(raw.tensors)
    if is_cloneofsimo(keys):
        refuse_cloneofsimo(keys, raw.label)
    check_finite(raw.tensors, raw.label)
    fmt, groups, leftovers = _parse(raw, format)
    built = [_build(g, raw.tensors) for g in groups]
    named = {fam: sum(_targets(standard_index(fam), g) is not None for g in groups) for fam in FAMILIES}
    return UnplacedLayers(
        label=raw.label, format=fmt, metadata=dict(raw.metadata),
        deltas={g.name: d for g, (d, _) in zip(groups, built) if d is not None},
        problems={g.name: p for g, (_, p) in zip(groups, built) if p is not None},
        leftovers=leftovers,
        names_known={fam: n for fam, n in sorted(named.items(), key=lambda kv: -kv[1]) if n},
    )
