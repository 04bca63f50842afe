"""The standard architectures (SD1.x, SD2.x, SDXL, Flux.1, SD3, SD3.5): read from shipped data, or built on the meta device.

Offline work (inspect, convert, merge, ``load_adapter`` without a model) needs the names and shapes of a
standard family's layers, never the model: :func:`standard_index` reads them from the data files in
``naming/families`` (milliseconds, no diffusers or transformers import). :func:`build_standard_index` builds the
same index from the real module trees on the meta device (seconds: it imports diffusers and transformers);
``scripts/make_family_data.py`` writes the data from it and ``tests/test_naming_family_data.py`` checks that the
two agree.

>>> standard_index("sdxl").lookup_kohya("lora_unet_input_blocks_4_1_proj_in")
'unet.down_blocks.1.attentions.0.proj_in'
"""

from __future__ import annotations

import functools
from typing import Any

from .configs import DENOISER_ARCHITECTURES, STANDARD
from .family_data import index_from_data, read_family_data
from .index import ModuleIndex, components_of, index_from_components
from .meta import build_meta_components

STANDARD_FAMILIES = tuple(STANDARD)


def _check_family(family: str) -> None:
    if family not in STANDARD:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(STANDARD)}")


@functools.lru_cache(maxsize=None)
def standard_index(family: str) -> ModuleIndex:
    """The index of the standard architecture of a family, read once from the shipped data (cached: it is
    immutable data, not state).

    >>> len(standard_index("sd1").modules)
    354
    """
    _check_family(family)
    return index_from_data(read_family_data(family))


def build_standard_index(family: str) -> ModuleIndex:
    """The index of a family's standard architecture built from ``naming/configs.py`` on the meta device: the
    source of truth the shipped data is generated from and checked against (imports diffusers and transformers).

    >>> build_standard_index("sd1").lookup("unet", "input_blocks.1.1.proj_in")   # doctest: +SKIP
    'unet.down_blocks.0.attentions.0.proj_in'
    """
    _check_family(family)
    unet_cfg, text_specs = STANDARD[family]
    comps = build_meta_components(unet_cfg, text_specs, denoiser=DENOISER_ARCHITECTURES.get(family, "unet"))
    return index_from_components(comps, family=family)


def module_index(target: Any = None, family: str | None = None) -> ModuleIndex:
    """The ModuleIndex of a live target (pipeline, model, dict of components, or an index built before), else of
    a standard family.

    >>> module_index(family="sd1").lookup("unet", "input_blocks.1.1.proj_in")
    'unet.down_blocks.0.attentions.0.proj_in'
    """
    if isinstance(target, ModuleIndex):  # already indexed (a pipeline indexes its live model once)
        return target
    if target is not None:
        return index_from_components(components_of(target), family=family)
    if family is None:
        raise ValueError(f"module_index needs a target (pipeline or model) or a family (one of {STANDARD_FAMILIES})")
    return standard_index(family)
