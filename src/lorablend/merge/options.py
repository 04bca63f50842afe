"""The options of a merge, checked once: a frozen :class:`MergeSettings`.

>>> MergeSettings(method="ties", density=0.5).needs_sign
True
>>> MergeSettings(method="cat", rank=8)
Traceback (most recent call last):
...
ValueError: rank= does not apply to method='cat' (the rank is the sum of the input ranks): use method='svd' or a *_svd method
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, Union

import torch

BlockWeights = Union[Mapping[str, float], Sequence[Union[Mapping[str, float], None]], None]
BaseWeights = Union[Mapping[str, torch.Tensor], Callable[[str], torch.Tensor], None]

FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "della", "breadcrumbs")
DENSE_TASK = ("ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd", "della_svd", "breadcrumbs_svd")
METHODS: tuple[str, ...] = ("cat", "svd", *FACTORWISE, *DENSE_TASK)
_TRUNCATING = ("svd", *DENSE_TASK)
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune", "della", "breadcrumbs", *DENSE_TASK)
_NEEDS_SIGN = ("ties", "dare_ties", "ties_svd", "dare_ties_svd", "della", "della_svd")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class MergeSettings:
    """Everything a merge method may use besides the adapters and their weights (see :func:`lorablend.merge`
    for each option's meaning). Refuses, when built, any option the method does not take or a value out of
    range, with the fix in the message."""

    method: str = "svd"
    rank: int | None = None
    energy: float | None = None
    clamp: float | None = None
    density: float | None = None
    majority_sign: str = "total"
    seed: int | None = None
    block_weights: BlockWeights = None
    base_weights: BaseWeights = None
    device: torch.device | None = None

    def __post_init__(self) -> None:
        method = self.method
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not a merge method: use one of {', '.join(METHODS)}")
        if self.rank is not None and (not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0):
            raise ValueError(f"rank={self.rank!r} must be a positive integer (e.g. rank=64), or None for the default")
        if self.energy is not None and not (_is_number(self.energy) and 0.0 < self.energy <= 1.0):
            raise ValueError(f"energy={self.energy!r} must lie in (0, 1]: the fraction of squared singular values kept, e.g. 0.99")
        if self.clamp is not None and not (_is_number(self.clamp) and 0.0 < self.clamp <= 1.0):
            raise ValueError(f"clamp={self.clamp!r} must lie in (0, 1]: a quantile such as kohya's 0.99")
        if method not in _TRUNCATING:
            for arg, value in (("rank", self.rank), ("energy", self.energy), ("clamp", self.clamp)):
                if value is not None:
                    what = "the rank is the sum of the input ranks" if method == "cat" else "it keeps the input rank"
                    raise ValueError(f"{arg}= does not apply to method={method!r} ({what}): use method='svd' or a *_svd method")
        if method in _NEEDS_DENSITY:
            if self.density is None:
                raise ValueError(f"method={method!r} needs density= (the fraction of values kept, in (0, 1], e.g. 0.5)")
            if not _is_number(self.density) or not 0.0 < self.density <= 1.0:
                raise ValueError(f"density={self.density!r} must lie in (0, 1]: the fraction of values kept, e.g. 0.5")
        elif self.density is not None:
            raise ValueError(f"density= does not apply to method={method!r}: use one of {', '.join(_NEEDS_DENSITY)}")
        if self.majority_sign not in ("total", "frequency"):
            raise ValueError(f"majority_sign={self.majority_sign!r} must be 'total' (sign of the sum) or 'frequency' (sign count)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed={self.seed!r} must be an integer")

    @property
    def needs_sign(self) -> bool:
        """Whether the method elects a majority sign (TIES-style)."""
        return self.method in _NEEDS_SIGN

    @property
    def layer_seed_base(self) -> int:
        """The seed DARE masks derive from (0 when none was given)."""
        return 0 if self.seed is None else int(self.seed)

    def base_weight(self, key: str) -> torch.Tensor | None:
        """The base weight ``base_weights`` gives for a target key (DoRA layers need it), or None."""
        if callable(self.base_weights):
            return self.base_weights(key)
        return self.base_weights.get(key) if self.base_weights is not None else None

    def recorded(self) -> dict[str, Any]:
        """The options worth writing into the merged file's metadata (those set and used by the method)."""
        options = {
            "rank": self.rank,
            "energy": self.energy,
            "clamp": self.clamp,
            "density": self.density,
            "majority_sign": self.majority_sign if self.needs_sign else None,
            "seed": self.seed if self.method.startswith(("dare", "della")) else None,
            "block_weights": self.block_weights,
        }
        return {k: v for k, v in options.items() if v is not None}


def check_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """One finite float per adapter (``None``: all 1).

    >>> check_weights(None, 2)
    [1.0, 1.0]
    """
    if weights is None:
        return [1.0] * count
    weights = list(weights)
    if len(weights) != count:
        raise ValueError(f"weights has {len(weights)} entries for {count} adapters: pass one weight per adapter")
    for i, w in enumerate(weights):
        if not _is_number(w) or not math.isfinite(w):
            raise ValueError(f"weights[{i}] = {w!r} is not a finite number: pass floats such as 0.7")
    return [float(w) for w in weights]


def block_tables(block_weights: BlockWeights, adapters: Sequence[Any], labels_of: Callable[[str], list[str]]) -> list[dict[str, float] | None] | None:
    """Per adapter, ``{block label: multiplier}`` over the family's labels (or None: all 1).

    Accepts one spec for every adapter (a dict ``{"IN04": 0.5}`` or an LBW-ordered list of floats), or a
    list with one spec (or None) per adapter. ``labels_of(family)`` gives a family's block labels.
    """
    if block_weights is None:
        return None
    n = len(adapters)
    if isinstance(block_weights, Mapping) or (
        isinstance(block_weights, (list, tuple)) and block_weights and all(_is_number(v) for v in block_weights)
    ):
        specs = [block_weights] * n
    elif isinstance(block_weights, (list, tuple)):
        if len(block_weights) != n:
            raise ValueError(
                f"block_weights has {len(block_weights)} entries for {n} adapters: pass one spec (dict, LBW list or "
                f"None) per adapter, or a single dict such as {{'IN04': 0.5}} for all"
            )
        specs = list(block_weights)
    else:
        raise ValueError(
            "block_weights must be a dict {block label: weight}, an LBW-ordered list of floats, or a list of such "
            "specs with one per adapter"
        )
    from ..naming import expand_block_weights

    tables: list[dict[str, float] | None] = []
    for spec, adapter in zip(specs, adapters):
        if spec is None:
            tables.append(None)
            continue
        for value in (spec.values() if isinstance(spec, Mapping) else spec):
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"block_weights for {adapter.name!r} holds {value!r}: every weight must be a finite number")
        tables.append(expand_block_weights(spec, adapter.family, labels_of(adapter.family)))
    return tables

# Old names (settings classes all end in ...Settings since 0.2), importable until 0.3 with a warning.
from ..errors import renamed_names  # noqa: E402  (only for the old names below)

__getattr__ = renamed_names(__name__, {'MergeOptions': 'MergeSettings'}, globals())
