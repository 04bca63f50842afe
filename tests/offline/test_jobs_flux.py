"""Offline work on Flux.1 files (no model): convert between diffusers, kohya and ai-toolkit layouts, merge with every
method, inspect (D00… / S00… blocks, the --plot heatmap). Files have the real layouts and widths (flux_keylists),
block 0 of each kind only, small ranks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorablend.cli import main
from lorablend.io import load_adapter
from lorablend.merge import METHODS
from lorablend.offline.jobs import convert_file, merge_files

from conftest import assert_same_computed
from flux_keylists import few_blocks, probe, requires_keylists, state_dict

pytestmark = requires_keylists
LAYOUTS = {"kohya": "flux_lora_kohya_with_te1_format", "diffusers": "flux_lora_diffusers_format",
           "original": "flux_lora_aitoolkit_format"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    out = {}
    for i, (fmt, layout) in enumerate(LAYOUTS.items()):
        out[fmt] = root / f"{fmt}.safetensors"
        save_file(few_blocks(state_dict(layout, rank=2, seed=i)), str(out[fmt]))
    return out


def assert_same_deltas(a, b):
    assert set(a.deltas) <= set(b.deltas)
    for key, delta in a.deltas.items():
        assert_same_computed(probe(b.deltas[key], delta.shape[1]), probe(delta, delta.shape[1]), msg=key)
    for key in set(b.deltas) - set(a.deltas):  # a fused layer's module the source lacked: zero rows
        assert not b.deltas[key].delta_weight().any(), key


@pytest.mark.parametrize("source", list(LAYOUTS))
@pytest.mark.parametrize("to", ["diffusers", "kohya", "ai-toolkit"])
def test_convert_between_layouts_keeps_every_delta(tmp_path, files, source, to):
    result = convert_file(files[source], tmp_path / "out.safetensors", to=to)
    assert result["family"] == "flux" and result["from_format"] == source and result["report"]["unknown"] == 0
    ours, again = load_adapter(files[source]), load_adapter(tmp_path / "out.safetensors")
    assert again.family == "flux" and again.report.complete
    assert_same_deltas(ours, again)
    keys = load_file(str(tmp_path / "out.safetensors"))
    prefix = {"diffusers": "transformer.", "kohya": "lora_unet_double_blocks_0_",
              "ai-toolkit": "diffusion_model.double_blocks.0."}[to]
    assert any(k.startswith(prefix) for k in keys)


def test_kohya_to_ai_toolkit_to_kohya_is_bit_for_bit(tmp_path, files):
    convert_file(files["kohya"], tmp_path / "a.safetensors", to="ai-toolkit")
    convert_file(tmp_path / "a.safetensors", tmp_path / "k.safetensors", to="kohya")
    before, after = load_file(str(files["kohya"])), load_file(str(tmp_path / "k.safetensors"))
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("to", ["kohya", "ai-toolkit"])
def test_cat_merge_of_flux_files_is_exact_and_svd_from_factors_keeps_the_rank(tmp_path, files, to):
    inputs = [(files["kohya"], 0.7), (files["diffusers"], 0.5)]
    cat = merge_files(inputs, tmp_path / "cat.safetensors", method="cat", format=to, dtype="fp32")  # bf16 would round w·up
    assert cat.data["family"] == "flux" and cat.data["max_rel_error"] == 0.0
    merged = load_adapter(tmp_path / "cat.safetensors")
    a, b = (load_adapter(p) for p, _ in inputs)
    for key in set(a.deltas) | set(b.deltas):
        cols = (a.deltas.get(key) or b.deltas[key]).shape[1]
        want = sum(w * probe(d.deltas[key], cols) for d, (_, w) in zip((a, b), inputs) if key in d.deltas)
        assert_same_computed(probe(merged.deltas[key], cols), want, msg=key)
    svd = merge_files(inputs, tmp_path / "svd.safetensors", method="svd", format=to, rank=2)
    assert svd.data["layers"] == cat.data["layers"]
    low = load_adapter(tmp_path / "svd.safetensors")
    assert {d.rank for k, d in low.deltas.items() if k.startswith("text_encoder.")} == {2}


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("cat", "svd")])
def test_every_merge_method_writes_a_flux_kohya_file(tmp_path, method):
    # the small layers of the real model (time / vector embedders: 3072 x 256, 3072 x 768), equal ranks: every
    # method's dense steps stay cheap
    sds = []
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        sds.append({})
        for name, width in (("lora_unet_time_in_in_layer", 256), ("lora_unet_vector_in_in_layer", 768)):
            sds[-1].update({f"{name}.lora_down.weight": torch.randn(2, width, generator=g).bfloat16(),
                            f"{name}.lora_up.weight": torch.randn(3072, 2, generator=g).bfloat16(),
                            f"{name}.alpha": torch.tensor(1.0)})
    paths = []
    for i, sd in enumerate(sds):
        paths.append(tmp_path / f"in{i}.safetensors")
        save_file(sd, str(paths[-1]))
    options = {"rank": 2} if method.endswith("svd") else {}
    if method != "linear" and not method.startswith("linear"):
        options["density"] = 0.5
    merge_files([(p, 0.6) for p in paths], tmp_path / "m.safetensors", method=method, format="kohya", **options)
    keys = load_file(str(tmp_path / "m.safetensors"))
    assert any(k.startswith("lora_unet_time_in_in_layer.") for k in keys)
    assert load_adapter(tmp_path / "m.safetensors").family == "flux"


def test_cli_convert_merge_and_inspect_a_flux_file(tmp_path, files, capsys):
    out = tmp_path / "k.safetensors"
    assert main(["convert", str(files["diffusers"]), str(out), "--to", "kohya", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "flux"
    assert main(["merge", f"{files['kohya']}:0.5", str(out), "-o", str(tmp_path / "m.safetensors"),
                 "--method", "svd", "--rank", "2", "--format", "ai-toolkit"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(files["kohya"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "flux"
    text = json.dumps(info)
    assert "D00" in text and "S00" in text
    png = tmp_path / "heat.png"
    assert main(["inspect", str(files["kohya"]), "--plot", str(png), "--json"]) == 0
    heat = json.loads(capsys.readouterr().out)
    assert png.stat().st_size > 0
    assert heat["rows"][:3] == ["BASE te", "D00", "S00"] or heat["rows"][0] == "BASE te"
    assert {"attn", "attn ctx", "mod", "ff", "ff ctx", "mlp", "proj"} <= set(heat["cols"])
    assert "other" not in heat["cols"]


def test_sd3_kohya_and_diffusers_convert_both_ways_and_inspect_shows_joint_blocks(tmp_path, capsys):
    from lorablend import Adapter, LowRankDelta
    from lorablend.io import save_adapter

    g = torch.Generator().manual_seed(4)
    t = "transformer.transformer_blocks.3."
    deltas = {t + "attn." + n: LowRankDelta(torch.randn(2, 1536, generator=g), torch.randn(1536, 2, generator=g), 2.0)
              for n in ("to_q", "to_k", "to_v", "to_out.0")}
    deltas[t + "ff.net.0.proj"] = LowRankDelta(torch.randn(2, 1536, generator=g), torch.randn(6144, 2, generator=g), 2.0)
    src = save_adapter(Adapter("sd3", "sd3", deltas), tmp_path / "d.safetensors", format="diffusers")
    convert_file(src, tmp_path / "k.safetensors", to="kohya")
    assert "lora_unet_joint_blocks_3_x_block_attn_qkv.lora_down.weight" in load_file(str(tmp_path / "k.safetensors"))
    convert_file(tmp_path / "k.safetensors", tmp_path / "d2.safetensors", to="diffusers")
    back = load_adapter(tmp_path / "d2.safetensors")
    assert back.family == "sd3"
    for key, delta in deltas.items():
        assert_same_computed(back.deltas[key].delta_weight(), delta.delta_weight(), msg=key)
    assert main(["inspect", str(tmp_path / "k.safetensors"), "--json"]) == 0
    assert "J03" in capsys.readouterr().out
