"""Names: which layers a model has, and every name the LoRA ecosystem uses for them.

>>> from lorablend.naming import module_index
>>> module_index(family="sd1").lookup_kohya("lora_unet_down_blocks_0_attentions_0_proj_in")   # doctest: +SKIP
'unet.down_blocks.0.attentions.0.proj_in'
"""

from .blocks import LBW_ORDERS, expand_block_weights
from .index import (
    COMPONENTS,
    TEXT_COMPONENTS,
    ModuleIndex,
    ModuleInfo,
    components_of,
    family_of_target,
    index_from_components,
    module_index,
    standard_index,
)
from .ldm import block_label, ldm_unet_path

__all__ = [
    "COMPONENTS",
    "TEXT_COMPONENTS",
    "LBW_ORDERS",
    "ModuleIndex",
    "ModuleInfo",
    "block_label",
    "components_of",
    "expand_block_weights",
    "family_of_target",
    "index_from_components",
    "ldm_unet_path",
    "module_index",
    "standard_index",
]
