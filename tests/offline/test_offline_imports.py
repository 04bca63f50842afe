"""Offline work starts fast: ``import lorablend``, ``inspect``, ``convert``, ``merge`` and ``load_adapter`` without a
model never import diffusers or transformers (seconds of start-up that only a pipeline needs).

The cases run in one fresh interpreter (this test process has imported everything long before), lightest
first, and it reports the heavy modules after each: one start-up of torch instead of five.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

HEAVY = ("diffusers", "transformers", "peft", "torch._dynamo")


def _kohya_sd1(path) -> str:
    """A small kohya SD1.5 LoRA: a cross-attention key (768-wide text: SD1), a conv and a text-encoder layer."""
    g = torch.Generator().manual_seed(0)
    layers = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": ((320, 768), None),
        "lora_unet_down_blocks_0_attentions_0_proj_in": ((320, 320), (1, 1)),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ((768, 768), None),
    }
    tensors = {}
    for name, ((out_f, in_f), kernel) in layers.items():
        k = kernel or ()
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, in_f, *k, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_f, 4, *k, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path))
    return str(path)


def _diffusers_sdxl(path) -> str:
    """A small diffusers/PEFT SDXL LoRA: a cross-attention key reading 2048-wide text and a second text encoder."""
    g = torch.Generator().manual_seed(1)
    layers = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (640, 2048),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": (1280, 1280),
    }
    tensors = {}
    for name, (out_f, in_f) in layers.items():
        tensors[f"{name}.lora_A.weight"] = torch.randn(4, in_f, generator=g)
        tensors[f"{name}.lora_B.weight"] = torch.randn(out_f, 4, generator=g)
    save_file(tensors, str(path))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("offline")
    return {"sd1": _kohya_sd1(d / "sd1_kohya.safetensors"), "sdxl": _diffusers_sdxl(d / "sdxl_diffusers.safetensors"),
            "out": str(d)}


def _stage_code(family: str, files: dict) -> dict[str, str]:
    """The cases of one family, by name: ``load_adapter`` without a model, then the CLI's offline commands."""
    src, out = files[family], files["out"]
    return {
        f"load_adapter[{family}]": f"""
            adapter = lorablend.load_adapter({src!r})
            assert adapter.family == {family!r}, adapter.family
            assert adapter.report.counts()["mapped"] == len(adapter.report.records), adapter.report.summary()
        """,
        f"cli[{family}]": f"""
            from lorablend.cli import main
            assert main(["inspect", {src!r}]) == 0
            assert main(["inspect", {src!r}, "--json"]) == 0
            assert main(["convert", {src!r}, {out + f"/{family}_k.safetensors"!r}, "--to", "kohya", "--overwrite"]) == 0
            assert main(["convert", {src!r}, {out + f"/{family}_d.safetensors"!r}, "--to", "diffusers",
                         "--overwrite"]) == 0
            for method in ("cat", "svd"):
                assert main(["merge", {src!r}, {src + ":0.5"!r}, "-o", {out + f"/{family}_m.safetensors"!r},
                             "--method", method, "--overwrite"]) == 0
        """,
    }


@pytest.fixture(scope="module")
def heavy_after(files) -> dict[str, list[str]]:
    """{case: the heavy modules a fresh interpreter holds after it}: the cases run in order in one interpreter,
    ``import lorablend`` first, then every ``load_adapter``, then the commands (a case that imports a heavy module
    shows it, and so does every later one: the first case that shows it is the one to fix)."""
    stages = {"import": "import lorablend"}
    for family in ("sd1", "sdxl"):
        stages.update({k: v for k, v in _stage_code(family, files).items() if k.startswith("load_adapter")})
    for family in ("sd1", "sdxl"):
        stages.update({k: v for k, v in _stage_code(family, files).items() if k.startswith("cli")})
    probe = "import json, sys\nimport lorablend\nheavy = {}\n"
    for name, code in stages.items():
        probe += textwrap.dedent(code) + f"\nheavy[{name!r}] = [m for m in {HEAVY!r} if m in sys.modules]\n"
    probe += "print(json.dumps(heavy))\n"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_lorablend_is_light(heavy_after):
    assert heavy_after["import"] == []


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_load_adapter_without_a_model_is_light(heavy_after, family):
    assert heavy_after[f"load_adapter[{family}]"] == []


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_cli_inspect_convert_merge_are_light(heavy_after, family):
    assert heavy_after[f"cli[{family}]"] == []
