"""Names: which layers a model has, and every name the LoRA ecosystem uses for them.

The standard families are data (``naming/families/*.json``, read in milliseconds): nothing here imports diffusers
or transformers until a live model is indexed or ``build_standard_index`` is asked for.

>>> from lorablend.naming import module_index
>>> module_index(family="sd1").lookup_kohya("lora_unet_down_blocks_0_attentions_0_proj_in")
'unet.down_blocks.0.attentions.0.proj_in'
"""

from .blocks import LBW_ORDERS, expand_block_weights
from .family import CROSS_ATTENTION_WIDTHS, FamilyEvidence, detect_family
from .index import (
    COMPONENTS,
    DENOISER_COMPONENTS,
    TEXT_COMPONENTS,
    ModuleIndex,
    ModuleInfo,
    components_of,
    denoiser_component,
    family_of_target,
    index_from_components,
)
from .ldm import block_label, ldm_unet_path
from .meta import build_meta_components
from .standard import STANDARD_FAMILIES, build_standard_index, module_index, standard_index

__all__ = [
    "COMPONENTS",
    "DENOISER_COMPONENTS",
    "CROSS_ATTENTION_WIDTHS",
    "TEXT_COMPONENTS",
    "LBW_ORDERS",
    "STANDARD_FAMILIES",
    "ModuleIndex",
    "ModuleInfo",
    "FamilyEvidence",
    "block_label",
    "build_meta_components",
    "build_standard_index",
    "components_of",
    "denoiser_component",
    "detect_family",
    "expand_block_weights",
    "family_of_target",
    "index_from_components",
    "ldm_unet_path",
    "module_index",
    "standard_index",
]
