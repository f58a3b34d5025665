"""APPLY: θ = θ₀ + λ·τ_m, one tensor at a time.

The merged task vector arrives sparse (only its nonzeros), and both the local
merge and the federated client apply it through this one function, so their
outputs agree bit for bit. Arithmetic is float32, then cast to the base dtype;
parameters the merge did not touch keep their base bits exactly. A merged
value that does not fit the base dtype is an error, never a silent inf.
"""

from __future__ import annotations

import torch

from tiesfed.core.compact import flat_nonzero


def apply_sparse(base: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, lam: float) -> torch.Tensor:
    """Base tensor with λ·τ_m added at `indices`; same shape and dtype as `base`."""
    if indices.numel() == 0:
        return base
    flat = base.reshape(-1)
    idx = indices.to(flat.device, torch.int64)
    updated = (flat[idx].to(torch.float32) + lam * values.to(flat.device, torch.float32)).to(base.dtype)
    if not bool(torch.isfinite(updated).all()):
        bad = int((~torch.isfinite(updated)).sum())
        raise OverflowError(f"{bad} merged value(s) overflow {str(base.dtype).removeprefix('torch.')} "
                            f"(θ₀ + λ·τ_m with λ = {lam:g})")
    out = flat.clone()
    out[idx] = updated
    return out.reshape(base.shape)


def dense_to_sparse(tau_m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The nonzeros of a dense merged task vector (what is published and applied)."""
    flat = tau_m.reshape(-1)
    idx = flat_nonzero(flat)
    return idx, flat.index_select(0, idx).to(torch.float32)
