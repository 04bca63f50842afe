"""svd merges over a fused original layer keep ``rank`` over its rows (issue 19): Flux.1 kohya output was 3-4x the
rank (q / k / v, and linear1's four modules, each merged at rank k with their own downs, then stacked)."""

from __future__ import annotations

import torch

from lorablend import Adapter, LowRankDelta, merge
from lorablend.io.write import adapter_state_dict

T = "transformer.single_transformer_blocks.0."
MODULES = {T + "attn.to_q": 3072, T + "attn.to_k": 3072, T + "attn.to_v": 3072, T + "proj_mlp": 12288}


def _adapter(name: str, seed: int, rank: int = 4) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    return Adapter(name, "flux", {k: LowRankDelta(down=torch.randn(rank, 3072, generator=g) / 50,
                                                  up=torch.randn(rows, rank, generator=g) / 50, alpha=float(rank))
                                  for k, rows in MODULES.items()})


def test_svd_merge_written_as_kohya_flux_keeps_the_rank_over_linear1():
    a, b = _adapter("a", 0), _adapter("b", 1)
    merged = merge([a, b], [0.7, 0.8], method="svd", rank=4)
    tensors, _ = adapter_state_dict(merged, "kohya")
    down = tensors["lora_unet_single_blocks_0_linear1.lora_down.weight"]
    up = tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert down.shape == (4, 3072) and up.shape == (21504, 4)
    # and it is the optimal rank-4 approximation of the fused layer's exact ΔW (q, k, v, mlp rows stacked): its
    # error is the singular tail of that ΔW (both through QR of factors: no 21504 x 3072 matrix is formed)
    left = torch.block_diag(*[torch.cat([0.7 * a.deltas[k].up, 0.8 * b.deltas[k].up], 1) for k in MODULES])
    right = torch.cat([torch.cat([a.deltas[k].down, b.deltas[k].down]) for k in MODULES])
    s = _singular_values(left.double(), right.double())
    alpha = float(tensors["lora_unet_single_blocks_0_linear1.alpha"])
    diff = _singular_values(torch.cat([left.double(), -(alpha / 4) * up.double()], 1),
                            torch.cat([right.double(), down.double()]))
    best, got = float(s[4:].square().sum().sqrt()), float(diff.square().sum().sqrt())
    assert abs(got - best) <= 1e-6 * float(s.square().sum().sqrt())


def _singular_values(u: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Singular values of ``u @ d`` from the QRs of its factors."""
    return torch.linalg.svdvals(torch.linalg.qr(u)[1] @ torch.linalg.qr(d.T)[1].T)


def test_the_same_for_flux2_qkv():
    # Flux.2 klein 4B's img_attn.qkv (to_q / to_k / to_v of a double block, 3072 rows each) in musubi's kohya names
    g = torch.Generator().manual_seed(2)
    keys = [f"transformer.transformer_blocks.0.attn.to_{p}" for p in "qkv"]
    a, b = (Adapter(n, "flux2-klein-4b", {k: LowRankDelta(down=torch.randn(4, 3072, generator=g),
                                                          up=torch.randn(3072, 4, generator=g), alpha=4.0)
                                         for k in keys}) for n in "ab")
    tensors, _ = adapter_state_dict(merge([a, b], [1.0, 1.0], method="svd", rank=4), "kohya")
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (4, 3072)
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (9216, 4)


def test_a_fused_layers_bias_difference_survives_one_rank_over_its_rows():
    # Flux kohya qkv with a diff_b (trainers that train biases): svd keeps rank 4 over the fused rows, and the merged
    # diff_b is the weighted sum of the inputs' (1e-6: one fp32 multiply-add per term), written back at its rows
    from lorablend.io.load import load_adapter

    name = "lora_unet_double_blocks_0_img_attn_qkv"

    def file(seed):
        g = torch.Generator().manual_seed(seed)
        return {f"{name}.lora_down.weight": torch.randn(4, 3072, generator=g), f"{name}.alpha": torch.tensor(4.0),
                f"{name}.lora_up.weight": torch.randn(9216, 4, generator=g), f"{name}.diff_b": torch.randn(9216, generator=g)}

    merged = merge([load_adapter(file(1), family="flux"), load_adapter(file(2), family="flux")], [0.7, -0.4], "svd", rank=4)
    tensors, _ = adapter_state_dict(merged, "kohya")
    assert tensors[f"{name}.lora_down.weight"].shape == (4, 3072)
    hand = 0.7 * file(1)[f"{name}.diff_b"] - 0.4 * file(2)[f"{name}.diff_b"]
    torch.testing.assert_close(tensors[f"{name}.diff_b"], hand, rtol=0, atol=1e-6)
    assert load_adapter(dict(tensors), family="flux").report.complete
