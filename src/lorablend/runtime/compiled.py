"""Static mode: the denoiser under ``torch.compile``, switching LoRA mixes with no graph break and no recompile.

The eager runtime gives each touched layer a forward hook that is added and removed as adapters come and go,
reads the call-time scale from a context variable and rebuilds its term lazily after a version check: all of
that is Python state that dynamo must either guard on (a recompile per switch) or leave (a graph break per
layer). Static mode turns what a switch changes into DATA in tensors that never change shape:

* every adaptable layer of the denoiser gets, once, a fixed forward (``module.forward`` replaced by a
  ``_PairLayer`` / ``_DenseLayer`` method) and fixed buffers: a low-rank pair of capacity ``R`` —
  ``up (out, R)``, ``down (R, in·kh·kw)`` and row ``i`` of one shared ``svecs (layers, R)`` table — or, where
  a pair of that capacity would cost as much as the matrix, one dense ``ΔW`` of the weight's shape;
* a switch (``set_adapters``, load, delete, enable/disable, fuse/unfuse) writes the blended factors of the new
  mix into those buffers IN PLACE, zeros in the unused capacity; a weights-only switch rewrites ``svecs`` with
  one copy. The call-time scale is a shared 0-d tensor written before each call;
* the writing happens in a forward pre-hook of the denoiser, which stays eager: only the denoiser's own
  ``forward`` is compiled, so the traced region holds no Python branch on mutable state and dynamo's guards
  never change.

Each layer picks, at trace time from the (static) input shape, the cheaper exact formula: ``(W + U·diag(s)·D) x``
(one small GEMM on the weight: cheap when many tokens pass) or ``W x + U·diag(s)·(D x)`` (cheap for few tokens).

Per-sample weights (a batch of different mixes, or weights that change per step: ``runtime.call_sample_weights``,
``pipeline(..., lora_schedule=…)``) are data too: the pre-hook writes an ``(images, layers, R)`` table of each
image's weight vectors (its rows tiled over classifier-free guidance's doubled batch inside the graph) and points
the layers at it; the next step's weights are one copy into the same table, so a new mix or a new step never
recompiles (one graph per batch size, as for any input shape). Per-sample weights need every touched layer to be a
pair: ``per_sample=True`` makes them so up front, else the first per-sample call remakes the buffers (one recompile).

Kinds: a LoRA/LoCon is a low-rank pair; LoHa/LoKr use their exact factors (rank ``r1·r2``) when they fit the
capacity; a full diff, a DoRA, or a bias change is represented exactly on dense layers only, and refused on a
pair layer (fuse such an adapter: a fused adapter is part of the weights, which the compiled graph reads).

Quantized layers (``lorablend.quant``): the static layer calls the layer's own quantized forward and adds the term,
cast to its output dtype; buffers take the logical ``out × in``; the weight is never folded into (there is no
float weight). diffusers' layerwise casting is refused (it re-types weights in place per call: untraceable).

>>> handle = pipeline.compile_denoiser(max_rank=64)                         # doctest: +SKIP
>>> pipeline.set_adapters(["ikea", "feng"], [0.7, 0.8])                     # doctest: +SKIP
>>> image = pipeline(prompt, num_inference_steps=30)[0][0]                  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .fusion import concat_factors, delta_weight_fp32, low_rank_factors
from ..errors import CapacityError
from ..kinds import Delta
from ..quant import format_of, weight_shape
from ..quant.fuse import dequantized_weight
from ..naming import DENOISER_COMPONENTS, denoiser_component

logger = logging.getLogger(__name__)

def denoiser_name(components: Sequence[str]) -> str:
    """The denoiser among ``components`` (``naming.denoiser_component``); an error where there is none.

    >>> denoiser_name(["text_encoder", "unet"])
    'unet'
    """
    name = denoiser_component(list(components))
    if name is None:
        raise ValueError(f"no denoiser among the components {list(components)}: static mode compiles one of "
                         f"{DENOISER_COMPONENTS}")
    return name


@dataclass(eq=False)
class _Shared:
    """What every static layer of one denoiser reads: the call-time scale and the weight vectors (row per layer)."""

    scale: torch.Tensor  # 0-d, the weight dtype
    uniform: torch.Tensor  # (1, pair layers, R): each contributor's weight over its rank, zeros in unused capacity
    svecs: torch.Tensor = None  # what the layers read this call: ``uniform``, or one of ``per_sample``'s tables
    per_sample: dict = field(default_factory=dict)  # images -> (images, pair layers, R): each image's own vectors

    def __post_init__(self) -> None:
        if self.svecs is None:
            self.svecs = self.uniform


def _run(m: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The module's own operation with another weight and bias."""
    if isinstance(m, nn.Conv2d):
        return m._conv_forward(x, weight, bias)  # (its padding mode included)
    return F.linear(x, weight, bias)


def _placement(m: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype a layer's static buffers live: its weight's, or for a quantized layer the dtype its
    forward computes in (its packed storage is bytes)."""
    fmt = format_of(m)
    return m.weight.device, (m.weight.dtype if fmt is None else fmt.compute_dtype(m))


def _quantized_base(m: nn.Module, own: Callable | None) -> Callable | None:
    """A quantized layer's own forward (its instance forward, e.g. diffusers' layerwise-casting hook, else its
    class's): the static layer adds its term to what that returns, never to a dequantized weight. None for a float
    layer (its static forward computes with ``m.weight`` itself)."""
    if format_of(m) is None:
        return None
    return own if own is not None else type(m).forward.__get__(m, type(m))


def _tokens(m: nn.Module, x: torch.Tensor) -> int:
    """How many output positions the layer computes (rows of its GEMM); an estimate for strided convs."""
    if isinstance(m, nn.Conv2d):
        return x.shape[0] * (x.shape[-2] // m.stride[0]) * (x.shape[-1] // m.stride[1])
    return x.numel() // x.shape[-1]


@dataclass(eq=False)
class _PairLayer:
    """A layer whose term is ``up · diag(svec · scale) · down`` at a fixed capacity ``R`` (unused columns zero)."""

    key: str
    module: nn.Module
    shared: _Shared
    row: int
    up: torch.Tensor  # (out, R)
    down: torch.Tensor  # (R, in·kh·kw)
    written: tuple = ()  # the deltas whose factors the buffers hold, in order
    ranks: tuple = ()  # each one's rank: its block of columns
    used: int = 0  # how many rank columns they fill
    base: Callable | None = None  # a quantized layer's own forward (``_quantized_base``); None: a float weight
    shape: tuple = ()  # the logical weight shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        sv = self.shared.svecs[:, self.row] * self.shared.scale  # (1, R): one mix; (images, R): each its own
        out_f, rank = self.up.shape
        in_flat = self.down.shape[1]
        # Shapes are static inside a graph, so these choices are made once per trace (dynamo guards on the shapes
        # anyway): folding the pair into the weight costs out·in·R, applying it to x costs tokens·R·(in+out).
        # A quantized layer has no float weight to fold into: its own forward, plus the term in the compute dtype.
        if sv.shape[0] == 1:
            sv = sv[0]
            if self.base is None and out_f * in_flat * (rank + 1) <= _tokens(m, x) * rank * (in_flat + out_f):
                weight = m.weight
                merged = torch.addmm(weight.reshape(out_f, in_flat), self.up * sv, self.down)
                return _run(m, x, merged.view(weight.shape), m.bias)
        else:  # each row of x gets its image's vector; CFG's [uncond; cond] sees the images twice
            if x.shape[0] % sv.shape[0]:
                raise ValueError(f"{self.key}: a forward of {x.shape[0]} rows does not tile the {sv.shape[0]} "
                                 "images given per-sample weights; pass one weight row per image of the call")
            sv = sv.repeat(x.shape[0] // sv.shape[0], 1)
        if self.base is not None:
            out = self.base(x)
            x = x.to(self.down.dtype)
        else:
            out = _run(m, x, m.weight, m.bias)
        if isinstance(m, nn.Conv2d):
            h = F.conv2d(x, self.down.view(rank, *self.shape[1:]), None, m.stride, m.padding, m.dilation)
            term = F.conv2d(h * sv[..., None, None], self.up.view(out_f, rank, 1, 1))
        else:
            h = F.linear(x, self.down)
            if sv.dim() == 2:
                sv = sv.view(sv.shape[0], *([1] * (h.dim() - 2)), rank)
            term = F.linear(h * sv, self.up)
        return out + (term if self.base is None else term.to(out.dtype))


@dataclass(eq=False)
class _DenseLayer:
    """A layer whose term is one dense ``ΔW`` (and ``Δb``) times the scale: exact for every kind."""

    key: str
    module: nn.Module
    shared: _Shared
    delta: torch.Tensor  # the weight's shape and dtype
    dbias: torch.Tensor | None  # (out,) when the module has a bias
    written: tuple = ()  # ((delta, weight), ...) the buffers hold
    base: Callable | None = None  # a quantized layer's own forward; None: a float weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, scale = self.module, self.shared.scale
        if self.base is not None:  # its own forward + ΔW x (+ Δb) in the compute dtype
            out = self.base(x)
            term = _run(m, x.to(self.delta.dtype), self.delta * scale, None if self.dbias is None else self.dbias * scale)
            return out + term.to(out.dtype)
        bias = m.bias if self.dbias is None else m.bias + self.dbias * scale
        return _run(m, x, m.weight + self.delta * scale, bias)


def _pair_fits(module: nn.Module, rank: int, always: bool = False) -> bool:
    """The layer is one the pair formulas cover, and a pair of capacity ``rank`` is cheaper than the matrix (or
    ``always``: per-sample weights need a pair wherever one can be)."""
    shape = weight_shape(module)  # (a quantized layer's logical out × in, not its packed bytes)
    out_f, in_flat = int(shape[0]), int(torch.Size(shape[1:]).numel())
    if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
        return False
    return always or rank * (out_f + in_flat) < out_f * in_flat


def _factors_of(delta: Delta) -> tuple[torch.Tensor, torch.Tensor] | None:
    """2-D fp32 ``(up, down)`` that give ``delta``'s ΔW exactly, scale folded in, or None (no such pair)."""
    if delta.needs_base or delta.changes_bias:
        return None
    return delta.low_rank_factors() or delta.exact_factors()


def _same(a: tuple, b: tuple) -> bool:
    """Two tuples of deltas (or (delta, weight) pairs) are the same objects and numbers."""
    return len(a) == len(b) and all(x is y or x == y for x, y in zip(a, b))


class StaticDenoiser:
    """Static mode on one denoiser component: fixed forwards and buffers, written in place on every switch.

    Made by :func:`compile_denoiser`; ``sync()`` writes the current mix now (else the next forward does),
    ``close()`` hands the layers back to the eager hooks and un-compiles the component. ``capacity`` is the rank
    every pair layer holds; ``memory()`` the bytes of the buffers.

    >>> static = compile_denoiser(pipeline.runtime, max_rank=32)               # doctest: +SKIP
    >>> static.sync(); static.capacity                                          # doctest: +SKIP
    32
    """

    def __init__(self, table: Any, modules: dict[str, nn.Module], model: nn.Module, *,
                 component: str, max_rank: int, grow: bool, per_sample: bool = False) -> None:
        if int(max_rank) < 1:
            raise ValueError(f"compile_denoiser: max_rank must be at least 1, got {max_rank}")
        if not modules:
            raise ValueError(f"compile_denoiser: the {component} has no adaptable Linear/Conv2d layer")
        copies = [k for k, m in modules.items() if "lorablend_fused_weight" in m._buffers]
        if copies:  # (a float-copy fuse computes through its own instance forward, which static mode would replace)
            raise ValueError(f"compile_denoiser: {copies[0]} (and {len(copies) - 1} more) is fused into a float copy "
                             "(quantized_fuse_dtype); unfuse_lora() first, or fuse with quantized_fuse_dtype=None "
                             "(requantized fused weights work compiled)")
        cast = next((n for n, m in model.named_modules()
                     if "layerwise_casting" in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})), None)
        if cast is not None:  # (its hook re-types the module's parameters in place around every forward: untraceable)
            raise ValueError(f"compile_denoiser: the {component} uses diffusers' layerwise casting ({cast or 'itself'}"
                             ", …), which converts its weights in place around each forward; torch.compile cannot "
                             "trace that. Store fp8 weights with lorablend.quant.convert.quantize_model(denoiser, "
                             "'scaled-fp8') instead (it compiles), or run uncompiled")
        self.table, self.modules, self.model = table, modules, model
        self.component, self.capacity, self.grow = component, int(max_rank), bool(grow)
        self.per_sample = bool(per_sample)  # every layer that can be a pair is one (per-sample weights need it)
        self.layers: dict[str, _PairLayer | _DenseLayer] = {}
        self._own_forwards = {k: m.__dict__.get("forward") for k, m in modules.items()}
        self._model_forward = model.__dict__.get("forward")
        self._hook: Any = None
        self._allocate()

    # ------------------------------------------------------------------------------- buffers
    def _allocate(self) -> None:
        """(Re)make every layer's buffers at the current capacity, on the weights' device and dtype, and point
        each module's forward at its static layer. A compiled graph made before sees new objects: one recompile."""
        kinds = {_placement(m) for m in self._placed_by()}
        if len(kinds) != 1:
            raise ValueError(f"compile_denoiser: the {self.component}'s layers are on several devices/dtypes "
                             f"{sorted(map(str, kinds))}; move it to one (pipe.to(device, dtype)) first")
        ((device, dtype),) = kinds
        pair_keys = [k for k, m in self.modules.items() if _pair_fits(m, self.capacity, self.per_sample)]
        zeros = dict(device=device, dtype=dtype)
        self.shared = _Shared(torch.zeros((), **zeros), torch.zeros(1, len(pair_keys), self.capacity, **zeros))
        self.layers = {}
        rows = {k: i for i, k in enumerate(pair_keys)}
        for key, m in self.modules.items():
            shape, base = weight_shape(m), _quantized_base(m, self._own_forwards[key])
            if key in rows:
                layer: Any = _PairLayer(key, m, self.shared, rows[key], torch.zeros(shape[0], self.capacity, **zeros),
                                        torch.zeros(self.capacity, torch.Size(shape[1:]).numel(), **zeros),
                                        base=base, shape=shape)
            else:
                layer = _DenseLayer(key, m, self.shared, torch.zeros(shape, **zeros),
                                    None if m.bias is None else torch.zeros(shape[0], **zeros), base=base)
            self.layers[key] = layer
            m.forward = layer.forward  # (an instance attribute: the module's state_dict is unchanged)
        if device.type == "cuda":  # CUDA graphs (mode="reduce-overhead") read them in place instead of copying
            for t in self._tensors():
                torch._dynamo.mark_static_address(t)
        self.built_for = (device, dtype)
        self._shapes = {k: weight_shape(m) for k, m in self.modules.items()}
        self._version: int | None = None
        self._scale_value: float | None = None
        self._gather: torch.Tensor | None = None
        self._values: torch.Tensor | None = None  # each contributor's set weight, pair layers in row order, then 0
        self._columns: list[str] = []  # the adapter of each of those values ("" for the 0)
        self._samples_written: dict = {}  # images -> what its per-sample table holds (SampleWeights, generation, …)

    def _placed_by(self) -> list[nn.Module]:
        """The layers whose device / dtype the buffers take: the float ones (the activations' dtype; a quantized
        layer's own compute dtype may differ, e.g. bnb int8's fp16, and its term is cast to its output), else all."""
        if not hasattr(self, "_floats"):
            self._floats = [m for m in self.modules.values() if format_of(m) is None]
        return self._floats or list(self.modules.values())

    @property
    def pair_layers(self) -> int:
        """How many layers hold factor buffers (the others hold a dense ΔW)."""
        return sum(isinstance(layer, _PairLayer) for layer in self.layers.values())

    def memory(self) -> int:
        """Bytes held by the static buffers (factors, weight vectors, dense deltas).

        >>> static.memory() > 0                                                     # doctest: +SKIP
        True
        """
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self) -> list[torch.Tensor]:
        return [self.shared.scale, self.shared.uniform, *self.shared.per_sample.values()] + [t for layer in self.layers.values() for t in (
            (layer.up, layer.down) if isinstance(layer, _PairLayer) else (layer.delta, layer.dbias)) if t is not None]

    # ------------------------------------------------------------------------------- writing the mix
    def sync(self) -> None:
        """Write the current mix and call-time scale into the buffers (nothing when they are current).

        >>> static.sync()                                                           # doctest: +SKIP
        """
        place = _placement(self._placed_by()[0])
        if place != self.built_for:
            logger.info("static %s: moved to %s / %s: buffers remade (one recompile)", self.component, *place)
            self._allocate()
        if self._version != self.table.version:
            if any(weight_shape(m) != self._shapes[k] for k, m in self.modules.items()):
                logger.warning("static %s: a layer's weight changed shape: buffers remade (one recompile)",
                               self.component)
                self._allocate()  # (e.g. an input layer widened for a control LoRA)
            self._write_mix()  # (first: growing the capacity remakes every buffer, the scale's too)
            self._version = self.table.version
        scale = float(self.table.scale_var.get())
        if scale != self._scale_value:
            self.shared.scale.fill_(scale)
            self._scale_value = scale
        samples = self.table.sample_var.get()
        self.shared.svecs = self.shared.uniform if samples is None else self._write_samples(samples)

    def _write_samples(self, samples: Any) -> torch.Tensor:
        """The ``(images, pair layers, R)`` table of ``samples`` (a ``sample_weights.SampleWeights``): image ``b``'s
        vector is each contributor's set weight times ``samples.matrix[b, its column]`` (0 where the adapter has no
        column), laid out as the uniform vectors are. Rewritten in place when the weights or the mix move."""
        if not self.per_sample:
            dense = [k for k, layer in self.layers.items() if isinstance(layer, _DenseLayer) and self._contributors(k)]
            if dense:  # a dense ΔW is one mix for the whole batch: make every layer that can be a pair one
                logger.info("static %s: per-sample weights: every layer a pair from now on (one recompile)",
                            self.component)
                self.per_sample = True
                self._allocate()
                self.sync()  # (writes the mix into the new buffers, then this table)
                return self.shared.svecs
        for key, layer in self.layers.items():
            if isinstance(layer, _DenseLayer) and self._contributors(key):
                raise ValueError(f"compiled {self.component}: {key} holds a dense ΔW (a grouped conv), which is one mix "
                                 "for the whole batch; run such mixes one at a time (no per-sample weights)")
        images = int(samples.matrix.shape[0])
        table = self.shared.per_sample.get(images)
        if table is None:
            table = torch.zeros(images, *self.shared.uniform.shape[1:], dtype=self.shared.uniform.dtype,
                                device=self.shared.uniform.device)
            if table.device.type == "cuda":
                torch._dynamo.mark_static_address(table)
            self.shared.per_sample[images] = table
        hit = self._samples_written.get(images)
        if self._gather is None or (hit is not None and hit[0] is samples and hit[1] == samples.generation):
            return table
        cols = torch.tensor([samples.columns.get(n, len(samples.columns)) for n in self._columns])
        padded = torch.cat([samples.matrix.float(), samples.matrix.new_zeros(images, 1, dtype=torch.float32)], 1)
        per = padded.index_select(1, cols) * self._values  # (images, contributors + 1): the last one is the 0
        with torch.no_grad():
            table.view(images, -1).copy_(per[:, self._gather])
        self._samples_written[images] = (samples, samples.generation)
        return table

    def _contributors(self, key: str) -> tuple[tuple[str, Delta], ...]:
        state = self.table.by_key.get(key)
        return state.contributors if state is not None else ()

    def _write_mix(self) -> None:
        """Validate the whole mix against the buffers, then write it (factors where the deltas changed, dense
        deltas where deltas or weights changed, every weight vector in one copy)."""
        weights = self.table.weights
        for key, state in self.table.by_key.items():
            if state.component == self.component and key not in self.layers and state.contributors:
                name = state.contributors[0][0]
                raise ValueError(
                    f"compiled {self.component}: adapter {name!r} changes {key}, a norm's scale or a modulation "
                    f"table, which static mode has no buffer for. Fuse it (fuse_lora(adapter_names=[{name!r}])): fused weights work compiled")
        todo: list[tuple[_PairLayer, tuple, list]] = []
        need, worst = 0, ""
        for key, layer in self.layers.items():
            contribs = self._contributors(key)
            if isinstance(layer, _PairLayer):
                deltas = tuple(d for _, d in contribs)
                if _same(deltas, layer.written):
                    continue
                pairs = [_factors_of(d) for d in deltas]
                self._refuse_unpaired(layer, contribs, pairs)
                rank = sum(int(p[0].shape[1]) for p in pairs)
                if rank > need:
                    need, worst = rank, key
                todo.append((layer, deltas, pairs))
        if need > self.capacity:
            self._over_capacity(need, worst)
            return self._write_mix()  # grown: every buffer is new, write them all
        with torch.no_grad():
            for layer, deltas, pairs in todo:
                self._write_pair(layer, deltas, pairs)
            for key, layer in self.layers.items():
                if isinstance(layer, _DenseLayer):
                    terms = tuple((d, weights[name][key]) for name, d in self._contributors(key))
                    if not _same(terms, layer.written):
                        self._write_dense(layer, terms)
            self._write_vectors(bool(todo))
        return None

    def _refuse_unpaired(self, layer: _PairLayer, contribs: tuple, pairs: list) -> None:
        for (name, delta), pair in zip(contribs, pairs):
            if pair is None:
                raise ValueError(
                    f"compiled {self.component}: adapter {name!r} gives {layer.key} a {delta.kind} delta with no exact "
                    "low-rank form (a full diff, DoRA, a bias change, or a LoHa/LoKr of too high a product rank), and "
                    f"that layer holds rank-{self.capacity} factor buffers. Fuse it "
                    f"(fuse_lora(adapter_names=[{name!r}])): fused weights work compiled; or close() the compiled "
                    "denoiser to run it through the eager hooks")

    def _over_capacity(self, need: int, key: str) -> None:
        if not self.grow:
            raise CapacityError(
                f"compiled {self.component}: the active mix needs rank {need} on {key}, over the buffers' capacity "
                f"max_rank={self.capacity}. Compile with compile_denoiser(max_rank={need}) or more, grow=True, or "
                "activate fewer/smaller adapters")
        new = max(need, 2 * self.capacity)
        logger.warning("compiled %s: the mix needs rank %d on %s; capacity %d -> %d (one recompile)",
                       self.component, need, key, self.capacity, new)
        self.capacity = new
        self._allocate()

    def _write_pair(self, layer: _PairLayer, deltas: tuple, pairs: list) -> None:
        rank = 0
        if pairs:
            up, down = concat_factors([(1.0, p) for p in pairs], layer.up.device)
            rank = int(up.shape[1])
            layer.up[:, :rank].copy_(up)
            layer.down[:rank].copy_(down)
        if layer.used > rank:  # what the previous mix filled beyond this one
            layer.up[:, rank:layer.used].zero_()
            layer.down[rank:layer.used].zero_()
        layer.used, layer.written = rank, deltas
        layer.ranks = tuple(int(p[0].shape[1]) for p in pairs)

    def _write_dense(self, layer: _DenseLayer, terms: tuple) -> None:
        """``Σ w·ΔW`` (and ``Σ w·Δb``) in fp32, one cast: the eager dense term's formula."""
        m = layer.module
        shape, device = weight_shape(m), m.weight.device
        state = self.table.by_key.get(layer.key)
        if layer.base is not None:  # (DoRA is relative to the weight the quantized bytes stand for)
            base = dequantized_weight(state) if any(d.needs_base for d, _ in terms) else None
        else:
            base = state.pristine_weight if state is not None and state.pristine_weight is not None else m.weight
        dense = torch.zeros(shape, dtype=torch.float32, device=device)
        factors = low_rank_factors([(w, d) for d, w in terms], device)
        if factors is not None:
            dense.view(shape[0], -1).addmm_(*factors)
        bias = torch.zeros(shape[0], dtype=torch.float32, device=device)
        for d, w in terms:
            if d.low_rank_factors() is None:
                dense.add_(delta_weight_fp32(d, shape, base, device), alpha=w)
            if d.changes_bias:
                if layer.dbias is None:
                    raise ValueError(f"compiled {self.component}: {layer.key} has no bias for a delta to change; "
                                     "that adapter was made for another model")
                bias.add_(d.delta_bias().to(device), alpha=w)
        layer.delta.copy_(dense)
        if layer.dbias is not None:
            layer.dbias.copy_(bias)
        layer.written = terms

    def _write_vectors(self, restructured: bool) -> None:
        """Every pair layer's weight vector in ONE copy: a gather of the contributors' weights into the table's
        ``(layers, R)`` layout (the gather is remade only when some layer's factors moved)."""
        pairs = [layer for layer in self.layers.values() if isinstance(layer, _PairLayer)]
        if not pairs:
            return
        weights = self.table.weights
        contributors = [(name, layer.key) for layer in pairs for name, _ in self._contributors(layer.key)]
        values = [weights[name][key] for name, key in contributors]
        self._columns = [name for name, _ in contributors] + [""]
        self._values = torch.tensor(values + [0.0], dtype=torch.float32)
        self._samples_written = {}
        if restructured or self._gather is None:
            cap, at = self.capacity, 0
            gather = torch.full((len(pairs), cap), -1, dtype=torch.long)  # -1: the 0.0 appended below
            for layer in pairs:
                start = 0
                for rank in layer.ranks:
                    gather[layer.row, start:start + rank] = at
                    start, at = start + rank, at + 1
            self._gather = gather.view(-1)
        self.shared.uniform.view(-1).copy_(self._values[self._gather])

    # ------------------------------------------------------------------------------- compile / close
    def install(self, compile_kwargs: dict | None) -> None:
        """Take the component's layers from the eager hooks, write the mix before each call (a pre-hook, which
        stays outside the compiled region), and compile the component's ``forward`` (unless ``None``)."""
        self.table.set_static(self.component, self)
        self._hook = self.model.register_forward_pre_hook(lambda *_: self.sync())
        try:
            self.sync()  # the current mix must fit, or nothing changes
        except BaseException:
            self.close()
            raise
        if compile_kwargs is not None:
            self.model.forward = torch.compile(self.model.forward, **compile_kwargs)

    def close(self) -> None:
        """Leave static mode: the component's own forwards back, not compiled, the eager hooks back.

        >>> static.close()                                                          # doctest: +SKIP
        """
        for key, m in self.modules.items():
            _put_forward(m, self._own_forwards[key])
        _put_forward(self.model, self._model_forward)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.table.static.get(self.component) is self:
            self.table.set_static(self.component, None)


def _put_forward(module: nn.Module, forward: Callable | None) -> None:
    if forward is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = forward


def compile_denoiser(runtime: Any, *, max_rank: int = 64, grow: bool = True, component: str | None = None,
                     backend: str | Callable | None = "inductor", mode: str | None = None, fullgraph: bool = True,
                     dynamic: bool | None = None, options: dict | None = None,
                     per_sample: bool = False) -> StaticDenoiser:
    """Put ``runtime``'s denoiser in static mode and compile its forward with ``torch.compile``.

    ``max_rank`` is the rank every pair layer holds (the largest total rank of a mix on one layer); a mix over
    it grows the buffers (``grow=True``: one recompile, logged) or raises ``CapacityError``. ``backend``,
    ``mode``, ``fullgraph``, ``dynamic`` and ``options`` go to ``torch.compile`` (``fullgraph=True``: a graph
    break is an error, not a silent fallback); ``backend=None`` installs static mode without compiling.
    ``per_sample=True``: every layer a pair from the start, so the first per-sample call (a mixed batch, a
    schedule) does not remake the buffers.

    >>> static = compile_denoiser(pipeline.runtime, max_rank=32, backend="inductor")   # doctest: +SKIP
    """
    view = runtime.view
    name = component or denoiser_name(list(view.components))
    if name in runtime.layers.static:
        raise ValueError(f"compile_denoiser: the {name} is already compiled; close() its StaticDenoiser first")
    # Linear / Conv2d layers only: a norm's scale (Flux q/k RMSNorm deltas) or a modulation table (Wan's diff_m) is
    # refused at the switch (_write_mix): no forward of theirs adds a term
    keys = [k for k, info in view.index.modules.items() if info.component == name and info.kind in ("linear", "conv")]
    modules = {k: view.module(k) for k in keys}
    static = StaticDenoiser(runtime.layers, modules, view.components[name], component=name,
                            max_rank=max_rank, grow=grow, per_sample=per_sample)
    kwargs = None if backend is None else dict(backend=backend, mode=mode, fullgraph=fullgraph, dynamic=dynamic,
                                               options=options)
    static.install(kwargs)
    return static


__all__ = ["CapacityError", "StaticDenoiser", "compile_denoiser", "denoiser_name"]
