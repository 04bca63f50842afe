"""Bad input: each case is one clear LoraFormatError that names the source and the problem; nothing is returned."""

from __future__ import annotations

import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from lorablend import LoraFormatError
from lorablend.io import load_adapter


def _lora() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.randn(4, 768, generator=g),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.randn(1280, 4, generator=g),
    }


def _refused(source, *needles: str) -> str:
    with pytest.raises(LoraFormatError) as e:
        load_adapter(source)
    msg = str(e.value)
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    _refused(path, str(path), "empty file")


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(os.urandom(4096))
    _refused(path, str(path), "not a LoRA weight file")


def test_git_lfs_pointer(tmp_path):
    path = tmp_path / "lfs.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    _refused(path, str(path), "Git LFS pointer")


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file(_lora(), path)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) - 1000])
    _refused(path, str(path), "truncated", "download the file again")


def test_header_longer_than_the_file(tmp_path):
    path = tmp_path / "cut_header.safetensors"
    save_file(_lora(), path)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    path.write_bytes(path.read_bytes()[: 8 + n // 2])
    _refused(path, str(path), "truncated")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf(tmp_path, bad):
    sd = _lora()
    key = next(iter(sd))
    sd[key][1, 2] = bad
    path = tmp_path / "nan.safetensors"
    save_file(sd, path)
    _refused(path, str(path), key, "NaN or Inf")


def test_folder_without_weights(tmp_path):
    (tmp_path / "README.md").write_text("hello")
    _refused(tmp_path, str(tmp_path), "no weight file")


def test_folder_with_two_weight_files(tmp_path):
    save_file(_lora(), tmp_path / "a.safetensors")
    save_file(_lora(), tmp_path / "b.safetensors")
    msg = _refused(tmp_path, str(tmp_path), "a.safetensors", "b.safetensors", "weight_name=")
    assert "2 weight files" in msg
    # the way out the message names works
    assert load_adapter(tmp_path, weight_name="b.safetensors").report.complete


def test_folder_with_safetensors_and_its_bin_twin_takes_the_safetensors(tmp_path):
    save_file(_lora(), tmp_path / "pytorch_lora_weights.safetensors")
    torch.save({k: v * 0 for k, v in _lora().items()}, tmp_path / "pytorch_lora_weights.bin")
    adapter = load_adapter(tmp_path)
    assert adapter.report.source.endswith(".safetensors") and adapter.num_parameters() > 0


def test_pickle_with_non_tensors(tmp_path):
    path = tmp_path / "mixed.bin"
    torch.save({**_lora(), "step": 100}, path)
    _refused(path, str(path), "'step'", "int", "not a tensor")


def test_pickle_with_code_is_never_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": Evil()}, f, protocol=2)
    _refused(path, str(path), "weights_only")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_plain_pickle_is_said_to_hold_python_objects(tmp_path, protocol):
    # pickle.dump, not torch.save: protocol 4+ opens with a FRAME torch's safe unpickler cannot read, which once
    # read as "corrupt or truncated"
    path = tmp_path / f"plain{protocol}.bin"
    path.write_bytes(pickle.dumps({**_lora(), "note": "x"}, protocol=protocol))
    msg = _refused(path, str(path), "holds Python objects")
    assert "corrupt" not in msg


def test_a_truncated_torch_save_is_still_called_truncated(tmp_path):
    for zipped in (True, False):
        path = tmp_path / f"cut{zipped}.pt"
        torch.save(_lora(), path, _use_new_zipfile_serialization=zipped)
        path.write_bytes(path.read_bytes()[:200])
        _refused(path, str(path), "corrupt or truncated")


def test_pickled_tensor_list(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(4, 320), torch.zeros(320, 4)], path)
    _refused(path, str(path), "bare list of 2 tensors", "cloneofsimo")


def test_cloneofsimo_keys(tmp_path):
    path = tmp_path / "lora_disney.safetensors"
    save_file({"unet:0:up": torch.zeros(320, 1), "unet:0:down": torch.zeros(1, 320)}, path)
    _refused(path, str(path), "cloneofsimo", "'unet:0:")


def test_keys_of_no_lora_format():
    _refused({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, "<state dict>",
             "full Stable Diffusion checkpoint")


def test_lora_of_another_architecture():
    # Krea 2's names (a transformer lorablend does not know; Qwen-Image, Wan, Flux.2 … it reads)
    sd = {"lora_unet_blocks_0_attn_wq.lora_down.weight": torch.zeros(4, 6144),
          "lora_unet_blocks_0_attn_wq.lora_up.weight": torch.zeros(6144, 4)}
    _refused(sd, "<state dict>", "none of its 2 keys names a layer", "a transformer lorablend does not know")


def test_shapes_that_fit_no_family():
    sd = {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 7),
          "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(7, 4)}
    _refused(sd, "<state dict>", "fit no SD1.x / SD2.x / SDXL / Flux.1 / SD3 / SD3.5 / Qwen-Image / Wan / Flux.2 / "
             "Z-Image / Chroma model", "proj_in")


def test_only_algorithms_we_do_not_apply():
    sd = {"lora_unet_mid_block_attentions_0_proj_in.oft_blocks": torch.zeros(4, 320, 320),
          "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(1.0)}
    _refused(sd, "<state dict>", "OFT")


def test_unknown_format_override():
    _refused_kw = pytest.raises(LoraFormatError, match="format='onnx'")
    with _refused_kw:
        load_adapter(_lora(), format="onnx")


def test_missing_path(tmp_path):
    _refused(tmp_path / "nope.safetensors", "nope.safetensors", "no such file")
