"""The CLI's inspect and convert commands: JSON that parses, text for people, one-line errors with exit != 0."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import assert_same_computed
from realdata import LORAS, requires_realdata
from safetensors import safe_open

from lorablend.adapter import Adapter, LoKrDelta, LowRankDelta
from lorablend.cli import main
from lorablend.io import load_adapter, save_adapter
from lorablend.io.safetensors import sshs_model_hash

G = torch.Generator().manual_seed(1)
U = "unet.down_blocks.0.attentions.0.transformer_blocks.0."


def rnd(*shape):
    return torch.randn(*shape, generator=G) * 0.1


@pytest.fixture
def lora_file(tmp_path):
    a = Adapter("style", "sd1", {
        U + "attn2.to_k": LowRankDelta(rnd(4, 768), rnd(320, 4), alpha=2.0),
        U + "attn2.to_v": LowRankDelta(rnd(4, 768), rnd(320, 4), alpha=2.0),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q": LowRankDelta(rnd(8, 1280), rnd(1280, 8)),
        "text_encoder.text_model.encoder.layers.3.mlp.fc2": LowRankDelta(rnd(4, 3072), rnd(768, 4), alpha=4.0),
    }, metadata={"ss_output_name": "style", "ss_tag_frequency": json.dumps({"5_x": {"cat": 9, "dog": 2}}),
                 "ss_bucket_info": "x" * 5000})
    return save_adapter(a, tmp_path / "style.safetensors", "kohya")


@pytest.fixture
def lokr_file(tmp_path):
    a = Adapter("lk", "sd1", {
        U + "attn2.to_k": LowRankDelta(rnd(4, 768), rnd(320, 4), alpha=2.0),
        U + "attn1.to_v": LoKrDelta(w1=rnd(16, 16), w2_a=rnd(20, 4), w2_b=rnd(4, 20), alpha=4.0),
    })
    return save_adapter(a, tmp_path / "lk.safetensors", "kohya")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("lorablend: error: ")
    return lines[0]


def test_help_lists_commands(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "inspect" in out and "convert" in out


def test_inspect_json(capsys, lora_file):
    code, out, err = run(capsys, "inspect", str(lora_file), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["format"] == "kohya" and info["family"] == "sd1" and info["layers"] == 4
    assert info["components"]["unet"]["layers"] == 3 and info["components"]["text_encoder"]["layers"] == 1
    assert info["rank"] == {"min": 4, "max": 8, "counts": {"4": 3, "8": 1}}
    assert info["kinds"] == {"lora": 4}
    assert info["blocks"] == {"BASE": 1, "IN01": 2, "M00": 1}
    meta = info["metadata"]
    assert meta["highlights"]["ss_network_module"] == "networks.lora"
    assert meta["top_tags"] == [["cat", 9], ["dog", 2]]
    assert meta["sshs_model_hash_matches"] is True
    assert "ss_tag_frequency" not in meta["highlights"] and "ss_bucket_info" in meta["other_keys"]
    assert info["report"]["counts"] == {"mapped": 11, "unsupported": 0, "unknown": 0}
    assert len(out) < 20_000  # the 5 KB bucket table and the tag table are summarised, not dumped


def test_inspect_text(capsys, lora_file):
    code, out, _ = run(capsys, "inspect", str(lora_file))
    assert code == 0
    assert "kohya, sd1, 4 layers" in out and "blocks: BASE×1, IN01×2, M00×1" in out
    assert "sshs_model_hash matches the file: yes" in out


def test_inspect_lists_unmapped_keys(capsys, tmp_path, lora_file):
    from safetensors.torch import save_file

    with safe_open(str(lora_file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(4, 8)
    tensors["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(8, 4)
    save_file(tensors, tmp_path / "extra.safetensors")
    code, out, _ = run(capsys, "inspect", str(tmp_path / "extra.safetensors"), "--json", "--keys", "1")
    assert code == 0
    rep = json.loads(out)["report"]
    assert rep["complete"] is False and rep["counts"]["unknown"] == 2
    assert len(rep["not_mapped"]) == 1 and "not_a_layer" in rep["not_mapped"][0]["key"]


@pytest.mark.parametrize("to", ["diffusers", "kohya"])
def test_convert(capsys, tmp_path, lora_file, to):
    out_path = tmp_path / f"out_{to}.safetensors"
    code, out, err = run(capsys, "convert", str(lora_file), str(out_path), "--to", to, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["output"] == str(out_path) and result["to_format"] == to and result["layers"] == 4
    assert result["sshs_model_hash"] == sshs_model_hash(out_path)
    src, dst = load_adapter(lora_file), load_adapter(out_path)
    assert dst.format == to
    for k in src.deltas:  # ΔW are products on other buffers: COMPUTED_TOL
        assert_same_computed(src.deltas[k].delta_weight(), dst.deltas[k].delta_weight(), k)
    # again without --overwrite: refused, file untouched; with it: replaced
    before = out_path.read_bytes()
    code, _, err = run(capsys, "convert", str(lora_file), str(out_path), "--to", to)
    assert code == 2 and "--overwrite" in one_error_line(err) and out_path.read_bytes() == before
    code, out, _ = run(capsys, "convert", str(lora_file), str(out_path), "--to", to, "--overwrite", "--dtype", "fp16")
    assert code == 0 and "wrote" in out


def test_convert_refusals(capsys, tmp_path, lora_file, lokr_file):
    before = lora_file.read_bytes()
    code, _, err = run(capsys, "convert", str(lora_file), str(lora_file), "--to", "kohya", "--overwrite")
    assert code == 2 and "never overwrites an input" in one_error_line(err)
    assert lora_file.read_bytes() == before
    code, _, err = run(capsys, "convert", str(lokr_file), str(tmp_path / "d.safetensors"), "--to", "diffusers")
    assert code == 2 and "format='kohya'" in one_error_line(err)
    assert not (tmp_path / "d.safetensors").exists()
    code, _, err = run(capsys, "convert", str(lora_file), str(tmp_path / "x.safetensors"), "--to", "ckpt")
    assert code == 2 and "invalid choice" in one_error_line(err)
    code, _, err = run(capsys, "convert", str(lora_file), str(tmp_path / "x.safetensors"))
    assert code == 2 and "--to" in one_error_line(err)


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 100, None], ids=["empty", "random", "missing"])
def test_bad_input_is_one_line(capsys, tmp_path, content):
    path = tmp_path / "bad.safetensors"
    if content is not None:
        path.write_bytes(content)
    for argv in (["inspect", str(path)], ["inspect", str(path), "--json"],
                 ["convert", str(path), str(tmp_path / "o.safetensors"), "--to", "kohya"]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and str(path) in one_error_line(err)
        if "--json" in argv:  # the error as JSON on stdout too, same exit code
            assert json.loads(out) == {"error": one_error_line(err).removeprefix("lorablend: error: "), "exit_code": 2}
        else:
            assert out == ""
    assert not (tmp_path / "o.safetensors").exists()


def test_inspect_describes_a_lora_no_family_places(capsys, tmp_path):
    """A LoRA with SDXL names but shapes of no real model (the demo's tiny ones): described, family unknown, exit 0."""
    from safetensors.torch import save_file

    k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    q = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{k}.lora_down.weight": rnd(4, 32), f"{k}.lora_up.weight": rnd(16, 4), f"{k}.alpha": torch.tensor(2.0),
               f"{q}.lora_down.weight": rnd(8, 32), f"{q}.lora_up.weight": rnd(32, 8)}, tmp_path / "tiny.safetensors")
    path = tmp_path / "tiny.safetensors"
    code, out, err = run(capsys, "inspect", str(path), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["family"] == "unknown" and info["format"] == "kohya" and info["kinds"] == {"lora": 2}
    assert info["layers"] == 2 and info["rank"] == {"min": 4, "max": 8, "counts": {"4": 1, "8": 1}}
    assert sorted(m["shape"] for m in info["modules"]) == [[16, 32], [32, 32]]
    assert "fit no" in info["why_unknown"] and "sdxl" in info["needed"] and info["names_known"]["sdxl"] == 2
    code, out, _ = run(capsys, "inspect", str(path))
    assert code == 0 and "kohya, unknown, 2 layers" in out and "needed:" in out and "rank 8, ΔW (32, 32)" in out


@pytest.mark.parametrize("fmt, targets", [("kohya", "all"), ("diffusers", "attn")])
def test_inspect_describes_the_demos_tiny_sdxl_loras(capsys, tmp_path, tiny_pipes, fmt, targets):
    """The demo's LoRAs, made as the demo makes them (random_adapter on the tiny SDXL pipeline), exit 0."""
    from lorablend.fixtures.tiny_unets import random_adapter

    pipe = tiny_pipes["sdxl"]
    adapter = random_adapter(pipe, "demo", rank=4, alpha=2.0, seed=1, targets=targets)
    path = save_adapter(adapter, tmp_path / "demo.safetensors", format=fmt, target=pipe)
    code, out, err = run(capsys, "inspect", str(path), "--json", "--keys", "1000")
    assert code == 0, err
    info = json.loads(out)
    assert info["family"] == "unknown" and info["format"] == fmt and info["layers"] == len(adapter.deltas)
    assert info["rank"]["counts"] == {"4": len(adapter.deltas)} and info["names_known"]["sdxl"] == len(adapter.deltas)
    shapes = {m["name"]: tuple(m["shape"]) for m in info["modules"]}
    assert sorted(shapes.values()) == sorted(tuple(d.shape) for d in adapter.deltas.values())


@pytest.mark.parametrize("name, fmt", [("stripes", "kohya"), ("sks", "diffusers")])
def test_inspect_describes_the_shipped_drawing_model_loras(capsys, name, fmt):
    """The LoRAs `lorablend demo` now copies (the drawing model's, made for its own small UNet) exit 0 too."""
    from lorablend.fixtures.drawing_model import lora_file

    code, out, err = run(capsys, "inspect", str(lora_file(name, fmt)), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["family"] == "unknown" and info["format"] == fmt and info["layers"] > 0 and info["modules"]


def test_convert_copies_a_lora_no_family_places_in_its_own_spelling_only(capsys, tmp_path):
    from safetensors.torch import save_file

    k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {f"{k}.lora_down.weight": rnd(4, 32), f"{k}.lora_up.weight": rnd(16, 4), f"{k}.alpha": torch.tensor(2.0)}
    save_file(tensors, tmp_path / "tiny.safetensors", metadata={"ss_output_name": "tiny"})
    code, out, err = run(capsys, "convert", str(tmp_path / "tiny.safetensors"), str(tmp_path / "k.safetensors"),
                         "--to", "kohya", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["family"] == "unknown" and result["unplaced"]["kept"] == 3 and result["layers"] == 1
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(tensors) and f.metadata()["ss_output_name"] == "tiny"
        assert all(torch.equal(f.get_tensor(key), t) for key, t in tensors.items())  # bit for bit
    code, _, err = run(capsys, "convert", str(tmp_path / "tiny.safetensors"), str(tmp_path / "d.safetensors"),
                       "--to", "diffusers")
    assert code == 2 and "--to kohya copies every key" in one_error_line(err)
    assert not (tmp_path / "d.safetensors").exists()


@pytest.mark.parametrize("to, kept", [("kohya", 2), ("diffusers", 0)])
def test_convert_keeps_what_it_cannot_place_when_the_format_can_name_it(capsys, tmp_path, lora_file, to, kept):
    from safetensors.torch import save_file

    with safe_open(str(lora_file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    extra = {"lora_unet_not_a_layer.lora_down.weight": rnd(4, 8), "lora_unet_not_a_layer.lora_up.weight": rnd(8, 4)}
    save_file({**tensors, **extra}, tmp_path / "extra.safetensors")
    out_path = tmp_path / f"out_{to}.safetensors"
    code, out, err = run(capsys, "convert", str(tmp_path / "extra.safetensors"), str(out_path), "--to", to, "--json")
    assert code == 0, err
    unplaced = json.loads(out)["unplaced"]
    assert (unplaced["kept"], unplaced["dropped"]) == (kept, 2 - kept) and sorted(unplaced["keys"]) == sorted(extra)
    with safe_open(str(out_path), "pt") as f:
        written = {k: f.get_tensor(k) for k in extra if k in f.keys()}
    assert len(written) == kept and all(torch.equal(t, extra[k]) for k, t in written.items())  # bit for bit
    code, out, _ = run(capsys, "convert", str(tmp_path / "extra.safetensors"), str(out_path), "--to", to, "--overwrite")
    assert code == 0 and f"{kept} kept, {2 - kept} dropped" in out


def test_unknown_command_and_no_command(capsys):
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "invalid choice" in one_error_line(err)
    code, _, _ = run(capsys, )
    assert code == 2


def test_module_entry_point(lora_file):
    """``python -m lorablend`` runs the same main(): exit status and one JSON document on stdout."""
    proc = subprocess.run([sys.executable, "-m", "lorablend", "inspect", str(lora_file), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["layers"] == 4


@requires_realdata
@pytest.mark.parametrize("name", ["sd1x/sd1x_lycoris_lokr_smart_falcon_r4.safetensors",
                                  "sd1x/sd15_attnprocs_catundchat.bin",
                                  "sd2x/sd21_diffusers_justin.safetensors"])
def test_inspect_and_convert_real_files(capsys, tmp_path, name):
    path = LORAS / name
    code, out, err = run(capsys, "inspect", str(path), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["report"]["complete"] and info["layers"] in (128, 350)
    if "lokr" in name:
        assert info["kinds"] == {"lokr": 350} and info["metadata"]["sshs_model_hash_matches"] is True
        assert info["metadata"]["highlights"]["ss_network_module"] == "lycoris.kohya"
    if "sd21" in name:
        assert info["family"] == "sd2"
    code, out, err = run(capsys, "convert", str(path), str(tmp_path / "k.safetensors"), "--to", "kohya", "--json")
    assert code == 0, err
    code, out, err = run(capsys, "inspect", str(tmp_path / "k.safetensors"), "--json")
    again = json.loads(out)
    assert again["layers"] == info["layers"] and again["family"] == info["family"]
    assert again["metadata"]["sshs_model_hash_matches"] is True


@requires_realdata
@pytest.mark.parametrize("name", ["sd1x/sd15_MALFORMED_kohyaish_timo_new.safetensors",
                                  "sdxl/sdxl_attnprocs_TRUNCATED_srikanth.safetensors",
                                  "sd2x/sd2_cloneofsimo_lora_disney_unet.pt"])
def test_unreadable_real_files(capsys, tmp_path, name):
    code, out, err = run(capsys, "inspect", str(LORAS / name), "--json")
    assert code == 2 and name.split("/")[-1] in one_error_line(err)
    assert json.loads(out)["error"] == one_error_line(err).removeprefix("lorablend: error: ")
