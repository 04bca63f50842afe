"""The Delta kinds: one file per kind, one registry list.

Adding a kind is one file holding a :class:`~lorablend.kinds.base.DeltaKind` subclass plus one entry in
``KINDS`` (readers try the kinds in this order, by the tensor roles a module has). DoRA is not in the list:
it wraps one of them when a module also has a magnitude (``magnitude`` / ``dora_scale``).

>>> [k.kind for k in KINDS]
['loha', 'lokr', 'lora', 'full', 'set', 'table']
"""

from __future__ import annotations

from typing import Union

from .base import DeltaKind, DeltaProblem, alpha_tensor, module_shaped, written_alpha
from .dora import DoRADelta, InnerDelta
from .full import FullDelta
from .loha import LoHaDelta
from .lokr import LoKrDelta
from .lora import LowRankDelta
from .replace import SetDelta
from .table import TableDelta

# Detection order: a module with LoHa or LoKr tensors is that kind even if it also carries stray roles.
KINDS: tuple[type[DeltaKind], ...] = (LoHaDelta, LoKrDelta, LowRankDelta, FullDelta, SetDelta, TableDelta)

Delta = Union[LowRankDelta, LoHaDelta, LoKrDelta, FullDelta, DoRADelta, SetDelta, TableDelta]

__all__ = [
    "KINDS", "Delta", "DeltaKind", "DeltaProblem", "DoRADelta", "FullDelta", "InnerDelta", "LoHaDelta",
    "LoKrDelta", "LowRankDelta", "SetDelta", "TableDelta", "alpha_tensor", "module_shaped", "written_alpha",
]
