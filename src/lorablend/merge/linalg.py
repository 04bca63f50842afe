"""The linear algebra of merging: SVD from factors, rank choice, truncation, clamping and exact errors.

Every function works on 2-D fp32 matrices; the small cores and the error sums run in float64.

>>> u, d = torch.randn(6, 2, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
>>> left, s, right = svd_from_factors(u, d)
>>> bool(torch.allclose(left * s @ right, u @ d))
True
"""

from __future__ import annotations

import math

import torch

# torch.quantile refuses inputs above 2**24 elements; larger ones take the sort-based path.
_TORCH_QUANTILE_LIMIT = 1 << 24


def svd_from_factors(u: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``u @ d`` (out×R times R×in) without forming it: ``u = Q1 R1``, ``dᵀ = Q2 R2``, SVD of ``R1 R2ᵀ``.

    Returns ``left (out×p)``, ``σ (p)``, ``right (p×in)`` with orthonormal columns / rows, p = min(R, out, in).
    """
    q1, r1 = torch.linalg.qr(u)
    q2, r2 = torch.linalg.qr(d.T)
    # The core is tiny (R×R): solving it in float64 keeps small singular values (and so `energy`) accurate.
    uc, s, vch = torch.linalg.svd((r1.double() @ r2.double().T), full_matrices=False)
    left = q1 @ uc.to(q1.dtype)
    right = vch.to(q2.dtype) @ q2.T
    left, right = fix_signs(left, right)
    return left, s.to(u.dtype), right


def fix_signs(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular pairs are defined up to a joint sign; pick the one whose up column has a positive
    largest-magnitude entry, so factors (and clamp) do not depend on the SVD backend."""
    idx = left.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(torch.gather(left, 0, idx)).squeeze(0)
    signs[signs == 0] = 1
    return left * signs, right * signs[:, None]


def choose_rank(s: torch.Tensor, k_max: int | None, energy: float | None) -> int:
    """How many singular values to keep: at most ``k_max``, and the fewest that keep ``energy`` of ``Σσ²``.

    >>> choose_rank(torch.tensor([3.0, 1.0, 0.1]), None, 0.9), choose_rank(torch.tensor([3.0, 1.0]), 1, None)
    (2, 1)
    """
    p = int(s.numel())
    k = p if k_max is None else min(k_max, p)
    if energy is not None:
        sq = s.double() ** 2
        total = float(sq.sum())
        if total > 0:
            cum = torch.cumsum(sq, 0) / total
            # Tolerance of a few ulps so energy=1.0 is reached despite rounding in the cumulative sum.
            k_energy = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype)).item()) + 1
            k = min(k, k_energy)
        else:
            k = 1
    return max(1, min(k, p))


def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile (linear interpolation), also for inputs larger than it accepts."""
    if x.numel() <= _TORCH_QUANTILE_LIMIT:
        return torch.quantile(x, q)
    s = x.sort().values
    pos = q * (s.numel() - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, s.numel() - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def clamp_pair(up: torch.Tensor, down: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's svd_merge clamp: ``hi`` = the q-quantile of the signed values of both factors; clamp to [-hi, hi]."""
    hi = quantile(torch.cat([up.flatten(), down.flatten()]), q)
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def truncate_dense(m: torch.Tensor, k_max: int | None, energy: float | None, clamp: float | None,
                   reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, str]:
    """``(up, down, rel_error, note)``: the truncated SVD of a dense ``m``, its error against ``reference``."""
    left, s, right = torch.linalg.svd(m, full_matrices=False)
    left, right = fix_signs(left, right)
    k = choose_rank(s, k_max, energy)
    up, down = left[:, :k] * s[:k], right[:k]
    note = ""
    if clamp is not None:
        up, down = clamp_pair(up, down, clamp)
        note = f"clamp {clamp}"
    ref_norm = float(reference.double().norm())
    if reference is m and clamp is None:
        s64 = s.double()
        err = math.sqrt(float((s64[k:] ** 2).sum())) / ref_norm if ref_norm > 0 else 0.0
    else:
        err = float((reference - up @ down).double().norm()) / ref_norm if ref_norm > 0 else 0.0
    return up, down, err, note


def lowrank_sq_norm(u: torch.Tensor, d: torch.Tensor) -> float:
    """``‖u d‖²_F = trace(uᵀu · d dᵀ)``: two small Gram matrices, in float64 against cancellation."""
    u64, d64 = u.double(), d.double()
    return float(((u64.T @ u64) * (d64 @ d64.T)).sum())


def rel_error_against_svd(left, s, right, up, down) -> float:
    """‖M − up down‖ / ‖M‖ for ``M = left·diag(s)·right`` (orthonormal left / right), without forming M.

    ‖M − AB‖² = ‖M‖² − 2·Σ_j s_j [(leftᵀA)(B rightᵀ)]_jj + ‖AB‖², each term from p×k or k×k products, in float64.
    """
    s64 = s.double()
    ref = float((s64 * s64).sum())
    if ref <= 0:
        return 0.0
    la = left.double().T @ up.double()  # p×k
    br = down.double() @ right.double().T  # k×p
    cross = float((s64 * (la * br.T).sum(dim=1)).sum())
    diff = ref - 2.0 * cross + lowrank_sq_norm(up, down)
    return math.sqrt(max(diff, 0.0) / ref)


def rel_error_lowrank(u_ref: torch.Tensor, d_ref: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """‖u_ref d_ref − up down‖ / ‖u_ref d_ref‖ from the factors alone."""
    ref = lowrank_sq_norm(u_ref, d_ref)
    if ref <= 0:
        return 0.0
    diff = lowrank_sq_norm(torch.cat([u_ref, -up], dim=1), torch.cat([d_ref, down], dim=0))
    return math.sqrt(max(diff, 0.0) / ref)
