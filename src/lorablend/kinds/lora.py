"""LoRA / LoCon: ``ΔW = alpha/rank · up @ down``, optionally through a Tucker ``mid`` core."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Mapping

import torch

from .base import (
    DeltaKind,
    DeltaProblem,
    RowSpans,
    Shape,
    alpha_tensor,
    check_spans,
    fit_to_shape,
    module_shaped,
    need,
    present,
    take,
    written_alpha,
)


@dataclass(eq=False)
class LowRankDelta(DeltaKind):
    """LoRA / LoCon: ``ΔW = alpha/rank · up @ down`` (optionally through a Tucker ``mid`` core).

    Shapes: linear ``down (r, in)``, ``up (out, r)``; conv ``down (r, in, kh, kw)``,
    ``up (out, r, 1, 1)``; Tucker conv ``down (r, in, 1, 1)``, ``mid (r, r, kh, kw)``. ``bias (out,)``: the bias of
    the up projection (PEFT ``lora_bias=True``'s ``lora_B.bias``; BFL Flux control LoRAs have one on every layer):
    the module's bias changes by ``alpha/rank · bias``, as PEFT's forward and merge add it. ``diff_b (out,)``: a
    bias difference stored beside the factors (kohya / ComfyUI ``.diff_b``, e.g. Flux trainers that train biases),
    added as it is (no scale).

    >>> d = LowRankDelta(down=torch.ones(2, 3), up=torch.ones(4, 2), alpha=1.0)
    >>> d.delta_weight().shape, d.scale
    (torch.Size([4, 3]), 0.5)
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    mid: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None
    kind: str = field(default="lora", init=False)
    roles: ClassVar[frozenset[str]] = frozenset({"down", "up", "mid"})
    extra_roles: ClassVar[frozenset[str]] = frozenset({"up_bias", "diff_b"})

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4 or self.up.dim() == 4

    @property
    def shape(self) -> Shape:
        out = int(self.up.shape[0])
        if self.mid is not None:
            return (out, int(self.down.shape[1]), *self.mid.shape[2:])
        if self.down.dim() == 4:
            return (out, *self.down.shape[1:])
        return (out, int(self.down.shape[1]))

    def natural_shape(self) -> Shape:
        """The ΔW shape: the old name of ``shape``, deprecated (removed in lorablend 0.3).

        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     LowRankDelta(down=torch.ones(1, 3), up=torch.ones(4, 1)).natural_shape()
        (4, 3)
        """
        warnings.warn("LowRankDelta.natural_shape() is deprecated and will be removed in lorablend 0.3: use the "
                      "shape property", DeprecationWarning, stacklevel=2)
        return self.shape

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """2-D fp32 factors ``(up, down)`` with ``up @ down == delta_weight()`` flattened to (out, -1).

        The alpha/rank scale is folded into ``up`` so callers never apply it twice.
        """
        up = self.up.reshape(self.up.shape[0], -1).float() * self.scale
        return up, self.down_2d()

    def down_2d(self) -> torch.Tensor:
        """The fp32 down factor as (r, in·kh·kw), a Tucker ``mid`` contracted into it; no scale (PEFT's lora_A)."""
        if self.mid is not None:
            down2d = self.down.reshape(self.down.shape[0], -1).float()
            # mid (r_up, r_down, kh, kw) contracted with down (r_down, in): (r_up, in, kh, kw)
            core = torch.einsum("i j k l, j r -> i r k l", self.mid.float(), down2d)
            return core.reshape(core.shape[0], -1)
        return self.down.reshape(self.down.shape[0], -1).float()

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.factors()

    def unscaled_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """2-D fp32 ``(up, down)`` without the alpha/rank scale: PEFT's ``lora_B`` / ``lora_A`` (what its
        factor-wise merges combine), a Tucker ``mid`` contracted into ``down``."""
        return self.up.reshape(self.up.shape[0], -1).float(), self.down_2d()

    def delta_weight(self, shape: Shape | torch.Size | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
        up, down = self.factors()
        return fit_to_shape((up @ down).reshape(self.shape), shape, "LoRA")

    @property
    def changes_bias(self) -> bool:
        return self.bias is not None or self.diff_b is not None

    def delta_bias(self) -> torch.Tensor | None:
        parts = [t for t in (None if self.bias is None else self.bias.float() * self.scale,
                             None if self.diff_b is None else self.diff_b.float()) if t is not None]
        return sum(parts[1:], parts[0]) if parts else None

    def fit_problem(self, weight_shape: Shape) -> str | None:
        problem = super().fit_problem(weight_shape)
        for name, t in (("lora_B.bias", self.bias), ("diff_b", self.diff_b)):
            if problem is None and t is not None and t.numel() != int(weight_shape[0]):
                problem = f"its bias ({name}) has {t.numel()} values but the module has {weight_shape[0]} outputs"
        return problem

    def pad_inputs(self, width: int) -> "LowRankDelta":
        """Zero columns on the right of ``down`` (a linear LoRA without a Tucker core): the rest kept as it is."""
        if self.down.dim() != 2 or self.mid is not None or width < self.down.shape[1]:
            return super().pad_inputs(width)
        down = self.down.new_zeros(self.down.shape[0], width)
        down[:, : self.down.shape[1]] = self.down
        return dataclasses.replace(self, down=down)

    def take_rows(self, spans: RowSpans) -> "LowRankDelta":
        """Those rows of ``up`` (and of the biases); ``down``, ``mid`` and alpha shared: the scale is unchanged."""
        spans = check_spans(spans, self.out_features, "LoRA")
        bias, diff_b = (None if t is None else take(t, spans) for t in (self.bias, self.diff_b))
        return LowRankDelta(down=self.down, up=take(self.up, spans), alpha=self.alpha, mid=self.mid, bias=bias,
                            diff_b=diff_b)

    def tensors(self) -> Iterator[torch.Tensor]:
        yield from (t for t in (self.down, self.up, self.mid, self.bias, self.diff_b) if t is not None)

    def kohya_tensors(self, weight_shape: Shape | None) -> Iterator[tuple[str, torch.Tensor]]:
        if self.diff_b is not None:
            yield "diff_b", self.diff_b
        if self.bias is not None:
            raise ValueError("a LoRA with a bias (lora_B.bias, e.g. a BFL Flux control LoRA) has no kohya / LyCORIS "
                             "spelling; save it in the diffusers format")
        down, up = (self.down, self.up) if self.mid is not None else module_shaped(self.down, self.up, weight_shape)
        yield from present((("lora_down.weight", down), ("lora_up.weight", up), ("lora_mid.weight", self.mid)))
        alpha = written_alpha(self)
        if alpha is not None:
            yield "alpha", alpha_tensor(alpha)

    @property
    def lycoris_algo(self) -> str | None:
        return None if self.mid is None else "locon"  # Tucker cores are LyCORIS' LoCon

    def _diff_b_as_up_bias(self) -> torch.Tensor | None:
        """``diff_b`` as PEFT's ``lora_B.bias`` (which PEFT adds times alpha/rank): ``diff_b / scale``, where that
        gives ``diff_b`` back bit for bit (scale 1 — what merge writes —, or a power of two); else None. diffusers'
        Wan converter reads lightx2v's ``diff_b`` the same way."""
        up_bias = self.diff_b / self.scale
        return up_bias if torch.equal(up_bias * self.scale, self.diff_b) else None

    def peft_problem(self) -> str | None:
        if self.diff_b is None:
            return None
        if self.bias is not None or self._diff_b_as_up_bias() is None:
            return "LoRA with a bias difference (diff_b)"
        return None

    def peft_tensors(self, weight_shape: Shape | None) -> dict[str, torch.Tensor]:
        """``lora_A`` / ``lora_B`` with the dims PEFT builds for the module: 2-D for Linear, 4-D for Conv2d."""
        if self.mid is None:
            down, up = module_shaped(self.down, self.up, weight_shape)
        else:
            # Tucker: mid contracted into down exactly as factors() does, so the ΔW stays bit-identical.
            _, in_ch, *kernel = self.shape
            core = self.down_2d()
            down, up = core.reshape(core.shape[0], in_ch, *kernel), self.up.reshape(self.up.shape[0], -1, 1, 1)
        out = {"lora_A.weight": down, "lora_B.weight": up}
        if self.bias is not None:
            out["lora_B.bias"] = self.bias
        elif self.diff_b is not None:  # peft_problem refuses a diff_b that does not divide exactly
            out["lora_B.bias"] = self._diff_b_as_up_bias()
        return out

    @classmethod
    def from_roles(cls, get: Mapping[str, torch.Tensor], alpha: float | None) -> "LowRankDelta":
        down, up = need(get, "down", "up")
        mid = get.get("mid")
        if down.dim() not in (2, 4) or up.dim() not in (2, 4):
            raise DeltaProblem(f"LoRA factors must be 2-D or 4-D, got down {tuple(down.shape)} and up {tuple(up.shape)}")
        if up.reshape(up.shape[0], -1).shape[1] != down.shape[0] and mid is None:
            raise DeltaProblem(f"LoRA factors do not chain: up {tuple(up.shape)} and down {tuple(down.shape)}")
        bias = get.get("up_bias")
        if bias is not None and bias.numel() != up.shape[0]:
            raise DeltaProblem(f"LoRA bias of shape {tuple(bias.shape)} does not match up {tuple(up.shape)}")
        diff_b = get.get("diff_b")
        return cls(down=down, up=up, alpha=alpha, mid=mid, bias=None if bias is None else bias.reshape(-1),
                   diff_b=None if diff_b is None else diff_b.reshape(-1))
