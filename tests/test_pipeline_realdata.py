"""Real third-party SD1.x files on a real-size SD1.5 UNet + CLIP-L (random weights): load, blend, fuse, unfuse.

The model is built from the published SD1.5 configs on the meta device and filled with cheap uniform noise
(no weights are downloaded); one UNet forward at a 8x8 latent checks the blend against the fused weights.
"""

from __future__ import annotations

import json
import types

import pytest
import torch

from lorablend import DiffusionPipeline, LoraFormatError

from conftest import assert_same_computed
from realdata import CONFIGS, LORAS, requires_realdata

SD1X = LORAS / "sd1x"
FILES = {
    "pokemon": "sd14_attnprocs_pokemon.safetensors",  # diffusers attention-processor names
    "timo": "sd15_diffusers_timo_final.safetensors",  # diffusers / PEFT names
    "falcon": "sd1x_lycoris_lokr_smart_falcon_r4.safetensors",  # LyCORIS LoKr, kohya names
}


def _fill_from_block(params, block: torch.Tensor) -> None:
    """Fill ``params`` with ``block`` repeated as one stream: a generator's ``uniform_`` over 860M values took 17 s
    of the suite, tiling is memory traffic only. The block's length is prime: no row of a layer repeats another's."""
    at = 0
    for p in params:
        flat, done = p.data.view(-1), 0
        while done < flat.numel():
            k = min(flat.numel() - done, block.numel() - at)
            flat[done:done + k].copy_(block[at:at + k])
            done, at = done + k, (at + k) % block.numel()


@pytest.fixture(scope="module")
def sd15():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = json.loads((CONFIGS / "stable-diffusion-v1-5" / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    unet.to_empty(device="cpu")  # random init of 860M parameters would dominate the test
    gen = torch.Generator().manual_seed(0)
    _fill_from_block(unet.parameters(), torch.empty(1_000_003).uniform_(-0.05, 0.05, generator=gen))
    te_cfg = json.loads((CONFIGS / "stable-diffusion-v1-5" / "text_encoder" / "config.json").read_text())
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in te_cfg.items() if not k.startswith("_")}))
    return types.SimpleNamespace(unet=unet.eval(), text_encoder=te.eval())


@requires_realdata
def test_real_sd1_files_load_blend_fuse_and_unfuse_bit_exactly(sd15):
    pytest.importorskip("lorablend.io")
    pipe = DiffusionPipeline(sd15)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49408, (1, 77), generator=gen)
    sample = torch.randn(1, 4, 8, 8, generator=gen)

    @torch.no_grad()
    def forward():
        hidden = sd15.text_encoder(ids)[0]
        return sd15.unet(sample, 10, encoder_hidden_states=hidden).sample

    base = forward()
    for name, file in FILES.items():
        report = pipe.load_lora_weights(str(SD1X / file), adapter_name=name)
        assert report.complete, report.summary()
    lists = pipe.get_list_adapters()
    assert lists["unet"] == list(FILES) and "falcon" in lists["text_encoder"]

    touched = {k for b in pipe.runtime.adapters.values() for k in b.layers}
    modules = {k: pipe.runtime.view.module(k) for k in touched}
    pristine = {k: m.weight.detach().clone() for k, m in modules.items()}

    # The blend is checked on the two attention LoRAs: the LoKr touches every conv, and its dense per-layer
    # terms (as large as the UNet) would triple this test's time without testing anything new.
    pipe.set_adapters(["pokemon", "timo"], [0.7, 0.8])
    blended = forward()
    assert not torch.allclose(blended, base, atol=1e-4)
    pipe.fuse_lora()
    fused = forward()
    torch.testing.assert_close(fused, blended, rtol=1e-3, atol=1e-3)
    # The LoKr is fused into the text encoder only: fusing it into every UNet conv is ~15 s of fp32 memory
    # traffic on a 2-core CPU (the pristine copies alone are 3.7 GB) and checks nothing the rest does not.
    pipe.set_adapters(["falcon"], [-0.5])
    pipe.fuse_lora(components=["text_encoder"])
    assert pipe.fused_loras == {"pokemon", "timo", "falcon"}
    assert pipe.runtime.fused_components("falcon") == ["text_encoder"]

    pipe.unfuse_lora(adapter_names=["timo"])  # one of several
    assert pipe.fused_loras == {"pokemon", "falcon"}
    pipe.unfuse_lora()
    assert all(torch.equal(m.weight, pristine[k]) for k, m in modules.items())
    pipe.unload_lora_weights()
    assert_same_computed(forward(), base)  # the weights above are bit-exact; the activations within COMPUTED_TOL


@requires_realdata
def test_malformed_and_legacy_real_files_are_refused_with_the_reason(sd15):
    pytest.importorskip("lorablend.io")
    pipe = DiffusionPipeline(sd15)
    with pytest.raises(LoraFormatError, match="MALFORMED.*none of its 256 keys"):
        pipe.load_lora_weights(str(SD1X / "sd15_MALFORMED_kohyaish_timo_new.safetensors"))
    with pytest.raises(LoraFormatError, match="cloneofsimo"):
        pipe.load_lora_weights(str(SD1X / "sd15_cloneofsimo_lora_disney_r1.safetensors"))
    assert pipe.get_list_adapters() == {}
