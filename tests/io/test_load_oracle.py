"""Oracle parity: files we generate here, read by diffusers' own ``load_lora_weights`` (PEFT backend) and by
``load_adapter(..., target=pipe)``, give the same ΔW for every layer (1e-6, fp32).

PEFT's ΔW per layer is ``LoraLayer.get_delta_weight(adapter)`` (scale included). Where diffusers cannot read a
spelling at all (SGM names on an SD1 pipeline, files with no component prefix), the oracle is diffusers reading
the same tensors under names it does read, and the test says so.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lorablend.io import load_adapter
from lorablend.naming import module_index

ATOL = 1e-6


def _factors(info, rank: int, gen: torch.Generator, conv_full_kernel: bool = True):
    out, *rest = info.weight_shape
    r = max(1, min(rank, out))
    down = torch.randn(r, *rest, generator=gen) / math.sqrt(math.prod(rest))
    up = torch.randn((out, r, 1, 1) if info.kind == "conv" else (out, r), generator=gen)
    return down, up


def kohya_dict(pipe, *, sgm: bool, seed: int = 0, rank: int = 3, alpha=lambda i: 2.0) -> dict[str, torch.Tensor]:
    """A kohya LoRA/LoCon for every Linear and Conv2d of the pipeline (3x3 convs get k×k down factors), ranks
    alternating ``rank`` / ``rank + 1`` so that alpha/rank differs per module; ``alpha(i)`` None leaves it out.

    The default alpha is the same number for every module: diffusers 0.42 loses per-module alphas (its
    alpha_pattern keeps attention-processor names PEFT never matches, and a module without alpha gets the
    file's common alpha instead of kohya's alpha = rank), so mixed alphas are checked against kohya's rule in
    test_io_read_formats.py instead of against diffusers."""
    idx = module_index(pipe)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (key, info) in enumerate(idx.modules.items()):
        name = idx.kohya_name(key, sgm=sgm)
        down, up = _factors(info, rank + (i % 2), gen)
        sd[f"{name}.lora_down.weight"] = down
        sd[f"{name}.lora_up.weight"] = up
        if alpha(i) is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha(i))
    return sd


def peft_deltas(pipe, adapter_name: str, idx) -> dict[str, torch.Tensor]:
    """{canonical target key: ΔW} from the PEFT layers diffusers injected (``idx``: the index before injection)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
                key = idx.lookup(comp, name)
                assert key is not None, name
                out[key] = module.get_delta_weight(adapter_name).detach().float()
    return out


def diffusers_load(pipe, sd, **kwargs) -> dict[str, torch.Tensor]:
    p = copy.deepcopy(pipe)
    p.load_lora_weights(copy.deepcopy(sd) if isinstance(sd, dict) else sd, adapter_name="oracle", **kwargs)
    return peft_deltas(p, "oracle", module_index(pipe))


def assert_same_deltas(adapter, expected: dict[str, torch.Tensor], pipe) -> None:
    idx = module_index(pipe)
    assert adapter.report.complete, adapter.report.summary()
    assert set(adapter.deltas) == set(expected), sorted(set(adapter.deltas) ^ set(expected))[:5]
    for key, want in expected.items():
        got = adapter.deltas[key].delta_weight(idx.modules[key].weight_shape)
        assert got.shape == want.shape, key
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=key)


def kohya_formula(sd: dict[str, torch.Tensor], pipe) -> dict[str, torch.Tensor]:
    """kohya's rule written out: ΔW = alpha/rank · up @ down (alpha missing or 0 -> alpha = rank)."""
    idx = module_index(pipe)
    out = {}
    for key in idx.modules:
        for sgm in (False, True):
            name = idx.kohya_name(key, sgm=sgm)
            if f"{name}.lora_down.weight" in sd:
                down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
                r = down.shape[0]
                alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else 0.0
                scale = alpha / r if alpha else 1.0
                out[key] = (scale * up.flatten(1) @ down.flatten(1)).reshape(idx.modules[key].weight_shape)
                break
    return out


@pytest.mark.parametrize("family,sgm", [("sd1", False), ("sdxl", False), ("sdxl", True)])
def test_kohya_matches_diffusers(tiny_pipes, family, sgm):
    pipe = tiny_pipes[family]
    sd = kohya_dict(pipe, sgm=sgm, seed=1)
    expected = diffusers_load(pipe, sd)
    every = set(module_index(pipe).modules)
    # diffusers 0.42 turns kohya's diffusers-style "add_embedding_linear_1" into "add.embedding.linear" and then
    # drops it with a log line; for those two layers kohya's own formula is the oracle.
    lost = {"unet.add_embedding.linear_1", "unet.add_embedding.linear_2"} if (family, sgm) == ("sdxl", False) else set()
    assert set(expected) == every - lost  # every Linear / Conv2d, te / te1 / te2 included
    assert any(v.dim() == 4 and v.shape[-1] == 3 for v in expected.values())  # 3x3 LoCon layers are in
    formula = kohya_formula(sd, pipe)
    expected.update({k: formula[k] for k in lost})
    ours = load_adapter(sd, target=pipe)
    assert ours.format == "kohya" and ours.family == family
    assert_same_deltas(ours, expected, pipe)


def test_kohya_mixed_alphas_follow_kohyas_rule(tiny_pipes):
    # Per-module alphas and a module without alpha: diffusers gets these wrong (see kohya_dict), so the
    # oracle is kohya's rule (sd-scripts LoRAModule: alpha None or 0 -> alpha = rank).
    for family in ("sd1", "sdxl"):
        pipe = tiny_pipes[family]
        sd = kohya_dict(pipe, sgm=family == "sdxl", seed=7, alpha=lambda i: [None, 0.0, 1.0, 3.5, 8.0][i % 5])
        ours = load_adapter(sd, target=pipe)
        assert_same_deltas(ours, kohya_formula(sd, pipe), pipe)
        assert {d.alpha for d in ours.deltas.values()} == {None, 0.0, 1.0, 3.5, 8.0}  # kept per module


def test_kohya_sgm_names_on_sd1_match_diffusers_names(tiny_pipes):
    # diffusers' SD1 pipeline does not renumber SGM/LDM block names (it passes no unet_config), so the oracle is
    # diffusers reading the same tensors under kohya's diffusers-style names.
    pipe = tiny_pipes["sd1"]
    sgm = kohya_dict(pipe, sgm=True, seed=2)
    plain = kohya_dict(pipe, sgm=False, seed=2)
    assert set(sgm) != set(plain)
    assert_same_deltas(load_adapter(sgm, target=pipe), diffusers_load(pipe, plain), pipe)


def _peft_layers(pipe, *, seed: int, ranks=(2, 3)) -> dict[str, dict[str, torch.Tensor]]:
    """{component: {module path + '.lora_A.weight' / '.lora_B.weight': tensor}} with mixed ranks."""
    idx = module_index(pipe)
    gen = torch.Generator().manual_seed(seed)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for i, (key, info) in enumerate(idx.modules.items()):
        comp, path = key.split(".", 1)
        if comp != "unet" and not path.startswith("text_model.encoder"):
            continue  # keep text_projection out: diffusers' text-encoder target list does not include it
        down, up = _factors(info, ranks[i % len(ranks)], gen)
        layers.setdefault(comp, {})[f"{path}.lora_A.weight"] = down
        layers[comp][f"{path}.lora_B.weight"] = up
    return layers


def test_peft_file_with_adapter_metadata_matches_diffusers(tiny_pipes, tmp_path):
    """A file written by diffusers' own save_lora_weights with lora_adapter_metadata (alpha, rank and alpha
    patterns) reads with the same per-module scales as diffusers gives it."""
    from diffusers import StableDiffusionXLPipeline

    pipe = tiny_pipes["sdxl"]
    layers = _peft_layers(pipe, seed=3)
    meta = {}
    for comp, sd in layers.items():
        # pattern keys as a training script writes them: live module names (transformers 5 CLIP: no "text_model.")
        ranks = {k[: -len(".lora_A.weight")].removeprefix("text_model."): v.shape[0]
                 for k, v in sd.items() if k.endswith("lora_A.weight")}
        pattern = {m: r for m, r in ranks.items() if r != 2}
        some = sorted(ranks)[:3]
        meta[comp] = {
            "r": 2, "lora_alpha": 6, "rank_pattern": pattern, "alpha_pattern": {some[0]: 1.5, some[2]: 9},
            "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
        }
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"], unet_lora_adapter_metadata=meta["unet"],
        text_encoder_lora_adapter_metadata=meta["text_encoder"],
        text_encoder_2_lora_adapter_metadata=meta["text_encoder_2"],
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    expected = diffusers_load(pipe, str(path))
    scales = {round(d.abs().max().item(), 3) for d in expected.values()}
    assert len(scales) > 3
    ours = load_adapter(path, target=pipe)
    assert ours.format == "diffusers"
    assert_same_deltas(ours, expected, pipe)
    assert ours.metadata["lora_adapter_metadata"]  # the header is kept
    assert load_adapter(tmp_path, target=pipe).name == tmp_path.name  # a folder with one weight file


def _legacy_spellings(layers: dict[str, dict[str, torch.Tensor]], style: str) -> dict[str, torch.Tensor]:
    proc = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
    text = {"q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}
    out = {}
    for comp, sd in layers.items():
        for key, t in sd.items():
            path, ab = key.rsplit(".lora_", 1)
            ud = "down" if ab.startswith("A") else "up"
            if style == "lora.down":  # diffusers 0.21-0.26: UNet .lora.down, text encoders .lora_linear_layer
                inner = "lora" if comp == "unet" else "lora_linear_layer"
                name = f"{comp}.{path}.{inner}.{ud}.weight"
            elif style == "processor":  # attention processors: UNet ….processor.to_q_lora, text ….to_q_lora
                attn, _, proj = path.rpartition(".")
                if proj == "0":
                    attn, proj = attn.rsplit(".", 1)[0], "to_out.0"
                if comp == "unet" and proj in proc:
                    name = f"{comp}.{attn}.processor.{proc[proj]}.{ud}.weight"
                elif comp != "unet" and proj in text:
                    name = f"{comp}.{attn}.{text[proj]}.{ud}.weight"
                else:
                    continue
            out[name] = t
    return out


@pytest.mark.parametrize("style", ["lora.down", "processor"])
def test_older_diffusers_spellings_match_diffusers(tiny_pipes, style):
    pipe = tiny_pipes["sd1"]
    layers = _peft_layers(pipe, seed=4, ranks=(3,))
    sd = _legacy_spellings(layers, style)
    expected = diffusers_load(pipe, sd)
    assert len(expected) > 10
    ours = load_adapter(sd, target=pipe)
    assert_same_deltas(ours, expected, pipe)


def test_unprefixed_attention_processor_file_equals_prefixed(tiny_pipes):
    # diffusers' pipeline drops keys without "unet." (it warns "No LoRA keys associated to UNet2DConditionModel");
    # the oracle is the same tensors with the prefix.
    pipe = tiny_pipes["sd1"]
    layers = {"unet": _peft_layers(pipe, seed=5, ranks=(2,))["unet"]}
    prefixed = _legacy_spellings(layers, "processor")
    bare = {k[len("unet."):]: v for k, v in prefixed.items()}
    expected = diffusers_load(pipe, prefixed)
    assert_same_deltas(load_adapter(bare, target=pipe), expected, pipe)


def test_peft_dora_matches_diffusers_fused_weights(tiny_pipes):
    """PEFT DoRA (lora_magnitude_vector): our DoRADelta against diffusers' fuse minus the base weight."""
    pipe = tiny_pipes["sd1"]
    idx = module_index(pipe)
    gen = torch.Generator().manual_seed(6)
    live = dict(pipe.unet.named_modules())
    sd = {}
    for key, info in idx.modules.items():
        if not key.startswith("unet.") or not key.endswith(("to_q", "to_v", "proj_in", "conv1")):
            continue
        path = key[len("unet."):]
        down, up = _factors(info, 2, gen)
        sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = down, up
        w0 = live[info.live_path].weight.detach()
        norm = w0.flatten(1).norm(dim=1) * (1.0 + 0.1 * torch.rand(w0.shape[0], generator=gen))
        sd[f"{key}.lora_magnitude_vector"] = norm if info.kind == "linear" else norm.reshape(1, -1, 1, 1)
    p = copy.deepcopy(pipe)
    base = {n: m.weight.detach().clone() for n, m in p.unet.named_modules() if hasattr(m, "weight") and m.weight is not None}
    p.load_lora_weights(copy.deepcopy(sd), adapter_name="d")
    p.fuse_lora(adapter_names=["d"], lora_scale=1.0)
    ours = load_adapter(sd, target=pipe)
    assert ours.report.complete and ours.kinds() == {"dora": len(sd) // 3}
    fused = dict(p.unet.named_modules())
    for key, delta in ours.deltas.items():
        live_path = idx.modules[key].live_path
        w0 = base[live_path]
        want = fused[live_path].base_layer.weight.detach() if hasattr(fused[live_path], "base_layer") else fused[live_path].weight
        got = delta.delta_weight(w0.shape, base=w0)
        torch.testing.assert_close(got, (want - w0).float(), atol=1e-5, rtol=1e-5, msg=key)
