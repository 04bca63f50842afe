"""A standard family as data: the shipped file format of a :class:`~lorablend.naming.index.ModuleIndex`.

What a family's module tree is (target keys, live paths, weight shapes, kinds, biases, LDM names) never changes,
so it is written once by ``scripts/make_family_data.py`` from models built on the meta device, shipped in
``naming/families/<family>.json``, and read back here in milliseconds without importing diffusers or
transformers. The file is JSON with one row per module (columns named once), so a regeneration shows up as a
readable diff; ``tests/test_naming_family_data.py`` checks it against the live meta-device models.

>>> from lorablend.naming.index import ModuleIndex, ModuleInfo
>>> info = ModuleInfo("unet.conv_in", "unet", "conv_in", (320, 4, 3, 3), "conv", True, "input_blocks.0.0")
>>> data = index_to_data(ModuleIndex("sd1", {info.target_key: info}, {"layers_per_block": 2}), made_by="doctest")
>>> data["modules"]
[['unet.conv_in', 'unet', 'conv_in', [320, 4, 3, 3], 'conv', True, 'input_blocks.0.0']]
>>> index_from_data(data).lookup_kohya("lora_unet_input_blocks_0_0")
'unet.conv_in'
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from .index import ModuleIndex, ModuleInfo

FORMAT_VERSION = 1
COLUMNS = ("target_key", "component", "live_path", "weight_shape", "kind", "has_bias", "ldm_path")

# The UNet config fields a standard index keeps: those that shape the module tree and the LDM names
# (the union of the fields of naming/configs.py) and those family_of_target reads. The full diffusers config
# also holds defaults that vary with the diffusers version and that nothing reads from a standard index.
UNET_CONFIG_FIELDS = (
    "addition_embed_type",
    "addition_embed_type_num_heads",
    "addition_time_embed_dim",
    "attention_head_dim",
    "block_out_channels",
    "cross_attention_dim",
    "down_block_types",
    "in_channels",
    "layers_per_block",
    "out_channels",
    "projection_class_embeddings_input_dim",
    "sample_size",
    "transformer_layers_per_block",
    "up_block_types",
    "use_linear_projection",
)
# The same for a Flux / SD3 transformer's config (kept in the index's ``unet_config``: the denoiser's config):
# what shapes its tree and the original-name table (naming/fused.py) is built from.
TRANSFORMER_CONFIG_FIELDS = (
    "attention_head_dim",
    "caption_projection_dim",
    "dual_attention_layers",
    "guidance_embeds",
    "in_channels",
    "joint_attention_dim",
    "num_attention_heads",
    "num_layers",
    "num_single_layers",
    "out_channels",
    "patch_size",
    "pooled_projection_dim",
    "pos_embed_max_size",
    "qk_norm",
    # the 2025-26 transformers (Qwen-Image, Wan, Flux.2, Z-Image, Chroma)
    "added_kv_proj_dim", "all_f_patch_size", "all_patch_size", "approximator_hidden_dim", "approximator_layers",
    "approximator_num_channels", "cap_feat_dim", "cross_attn_norm", "dim", "ffn_dim", "freq_dim", "image_dim",
    "mlp_ratio", "n_heads", "n_kv_heads", "n_layers", "n_refiner_layers", "text_dim", "timestep_guidance_channels",
)


def family_file_name(family: str) -> str:
    """The file name of a family's data inside ``lorablend/naming/families``.

    >>> family_file_name("sdxl")
    'sdxl.json'
    """
    return f"{family}.json"


def index_to_data(index: ModuleIndex, made_by: str) -> dict[str, Any]:
    """The JSON-ready data of an index (JSON types only: lists, not tuples), as the shipped file holds it.

    >>> from lorablend.naming.index import ModuleIndex
    >>> index_to_data(ModuleIndex("sd1", {}, {}), made_by="doctest")["columns"][:3]
    ['target_key', 'component', 'live_path']
    """
    rows = [
        [info.target_key, info.component, info.live_path, list(info.weight_shape), info.kind, info.has_bias,
         info.ldm_path]
        for info in index.modules.values()
    ]
    transformer = any(i.component == "transformer" for i in index.modules.values())
    fields = TRANSFORMER_CONFIG_FIELDS if transformer else UNET_CONFIG_FIELDS
    config = {k: index.unet_config[k] for k in fields if k in index.unet_config}
    data = {
        "format": FORMAT_VERSION,
        "family": index.family,
        "made_by": made_by,
        "unet_config": config,
        "columns": list(COLUMNS),
        "modules": rows,
    }
    return json.loads(json.dumps(data))  # tuples in configs become lists, as a reader of the file sees them


def dump_family_data(data: dict[str, Any]) -> str:
    """The text of a family file: one module per line, so that a regeneration diffs line by line.

    >>> print(dump_family_data({"family": "sd1", "modules": [["a"], ["b"]]}))
    {
    "family": "sd1",
    "modules": [
    ["a"],
    ["b"]
    ]
    }
    <BLANKLINE>
    """
    head = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in data.items() if k != "modules"]
    rows = ",\n".join(json.dumps(row) for row in data["modules"])
    return "{\n" + ",\n".join(head + ['"modules": [\n' + rows + "\n]"]) + "\n}\n"


def index_from_data(data: dict[str, Any]) -> ModuleIndex:
    """The ModuleIndex that a family file describes.

    >>> index_from_data({"format": 1, "family": "sd1", "unet_config": {}, "columns": list(COLUMNS),
    ...                  "modules": [["unet.conv_in", "unet", "conv_in", [320, 4, 3, 3], "conv", True, None]]}).family
    'sd1'
    """
    if data.get("format") != FORMAT_VERSION or data.get("columns") != list(COLUMNS):
        raise ValueError(
            f"family data of format {data.get('format')!r} with columns {data.get('columns')!r} is not the "
            f"format {FORMAT_VERSION} this lorablend reads; regenerate it with scripts/make_family_data.py"
        )
    modules = {}
    for key, component, live_path, shape, kind, has_bias, ldm_path in data["modules"]:
        modules[key] = ModuleInfo(key, component, live_path, tuple(shape), kind, has_bias, ldm_path)
    return ModuleIndex(family=data["family"], modules=modules, unet_config=dict(data["unet_config"]))


def read_family_data(family: str) -> dict[str, Any]:
    """The shipped data of a standard family (``importlib.resources``: works from a wheel or a zip too).

    >>> read_family_data("sd1")["unet_config"]["cross_attention_dim"]
    768
    """
    text = resources.files(__package__).joinpath("families", family_file_name(family)).read_text("utf-8")
    return json.loads(text)
