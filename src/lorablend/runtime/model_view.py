"""The adaptable part of one live pipeline, found once: its components, their module index and the live
``Linear``/``Conv2d`` behind every target key (a modulation table: :class:`ModulationTable`, its owner's parameter seen
as a layer). Binding (``resolve``), the runtime and the checkpoint layout
(bake) all look modules up through it.

>>> import torch
>>> view = ModelView.of({"unet": torch.nn.Sequential(torch.nn.Linear(2, 2))})    # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from ..naming import COMPONENTS, ModuleIndex, index_from_components

COMPONENT_ORDER = COMPONENTS  # naming's one component list, under the name the runtime reads


@dataclass
class ModelView:
    """The adaptable components of one live pipeline, their module index and their adaptable modules, found once
    per pipeline (a load then binds each layer by a dict lookup, not by walking the module tree again)."""

    components: dict[str, nn.Module]
    index: ModuleIndex
    modules: dict[str, nn.Module] = field(default_factory=dict, repr=False)  # target key -> live module

    @classmethod
    def of(cls, components: Mapping[str, nn.Module]) -> "ModelView":
        comps = {c: m for c, m in components.items() if c in COMPONENT_ORDER and isinstance(m, nn.Module)}
        index = index_from_components(comps)
        return cls(comps, index, _live_modules(comps, index))

    @property
    def family(self) -> str | None:
        return self.index.family

    def shared_accelerator(self) -> torch.device | None:
        """The one accelerator every adaptable layer's weight lives on (a LoRA for them can be read straight there,
        since the runtime places each delta next to its module's weight), else None. Reads one weight per indexed
        layer, not every parameter of every component: it runs on every load, and the layers are what matter."""
        devices = {m.weight.device for m in self.modules.values()}
        if len(devices) == 1 and (device := devices.pop()).type not in ("cpu", "meta"):
            return device
        return None

    def module(self, target_key: str) -> nn.Module:
        module = self.modules.get(target_key)
        if module is None:  # an index given from outside, or a module the walk did not reach
            info = self.index.modules[target_key]
            component = self.components[info.component]
            module = self.modules[target_key] = (ModulationTable.of(component, info.live_path) if info.kind == "table"
                                                 else component.get_submodule(info.live_path))
        return module


class ModulationTable(nn.Module):
    """A transformer's modulation table (Wan's ``scale_shift_table``) seen as a layer: its ``weight`` IS the
    owner's parameter (the same object, so a fuse that rebinds ``weight.data`` changes what the block reads and
    unfuse rebinds it back). Never registered in the model tree (state dicts and ``named_modules`` stay as they
    are). Its forward never runs: the runtime hooks the OWNER (:meth:`hook`), which reads the table itself.

    >>> owner = nn.Module(); owner.scale_shift_table = nn.Parameter(torch.zeros(1, 2, 3))
    >>> ModulationTable(owner, "scale_shift_table").weight is owner.scale_shift_table
    True
    """

    def __init__(self, owner: nn.Module, name: str) -> None:
        super().__init__()
        object.__setattr__(self, "owner", owner)  # (not a submodule: this view is no part of the model)
        self.param_name = name
        self.weight = owner._parameters[name]
        self.bias = None  # (a table has none; layer code reads ``module.bias`` of every layer)

    @classmethod
    def of(cls, component: nn.Module, live_path: str) -> "ModulationTable":
        owner_path, _, name = live_path.rpartition(".")
        return cls(component.get_submodule(owner_path) if owner_path else component, name)

    def hook(self, value_of) -> "_TableHooks":
        """While the owner runs, its table reads ``value_of()`` (a tensor: the table plus this call's delta; None:
        the table as it is); the parameter object is put back after the forward, also when it raises."""
        def swap_in(owner: nn.Module, args: tuple) -> None:
            value = value_of()
            if value is not None:
                owner._parameters[self.param_name] = value  # (a plain tensor for one call; the Parameter kept here)

        def swap_back(owner: nn.Module, args: tuple, out: object) -> None:
            owner._parameters[self.param_name] = self.weight

        return _TableHooks((self.owner.register_forward_pre_hook(swap_in),
                            self.owner.register_forward_hook(swap_back, always_call=True)))


@dataclass
class _TableHooks:
    """The pair of hooks a modulation table's layer holds on its owner, removed together."""

    handles: tuple

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _live_modules(components: Mapping[str, nn.Module], index: ModuleIndex) -> dict[str, nn.Module]:
    """Target key -> live module for every layer of ``index``: one walk of each component's tree (about a
    millisecond for SD1.5), against tens of microseconds per ``get_submodule`` of a nested path."""
    by_path: dict[tuple[str, str], nn.Module] = {}
    for comp, model in components.items():
        for path, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                by_path[(comp, path)] = module
    return {key: module for key, info in index.modules.items()
            if (module := by_path.get((info.component, info.live_path))) is not None}


__all__ = ["COMPONENT_ORDER", "ModelView", "ModulationTable"]
