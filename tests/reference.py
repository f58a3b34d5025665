"""A dense, obviously-correct TIES written from the paper's Algorithm 1.

Everything in memory, the whole model flattened into one (models × params)
matrix, the way the paper's own code does it. Tests compare the streaming
engine against this. It shares no code with the engine except the DARE
seed derivation (a random mask can only be compared if drawn identically).
"""

from __future__ import annotations

import fnmatch
from typing import Optional, Sequence

import torch

from tiesfed.core.trim import dare_seed

FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def reference_merge(
    base: dict[str, torch.Tensor],
    finetuned: Sequence[dict[str, torch.Tensor]],
    *,
    method: str = "ties",
    k: float = 20.0,
    lam: float = 1.0,
    trim: str = "global",
    election: str = "mass",
    zero_sign: str = "majority",
    disjoint: str = "mean",
    weights: Optional[Sequence[float]] = None,
    weight_semantics: str = "mergekit",
    min_support: int = 1,
    densities: Optional[Sequence[Optional[float]]] = None,
    seed: int = 0,
    keep_base: Sequence[str] = (),
    value_dtype: Optional[torch.dtype] = None,
) -> dict[str, torch.Tensor]:
    names = [n for n, t in base.items() if t.dtype in FLOAT and not any(fnmatch.fnmatch(n, g) for g in keep_base)]
    sizes = [base[n].numel() for n in names]
    m = len(finetuned)
    w = torch.tensor(weights if weights is not None else [1.0] * m, dtype=torch.float64)
    weighted = weights is not None and any(x != 1.0 for x in weights)
    tau = torch.stack(
        [torch.cat([(ft[n].float() - base[n].float()).flatten() for n in names]) for ft in finetuned]
    )  # (M, D) float32
    d = tau.shape[1]

    # 1. TRIM
    trimmed = torch.zeros_like(tau)
    for t in range(m):
        frac = (densities[t] if densities and densities[t] is not None else k / 100.0)
        row = tau[t]
        if method in ("task_arithmetic", "average"):
            mask = torch.ones(d, dtype=torch.bool)
        elif method == "dare_ties":
            mask = torch.zeros(d, dtype=torch.bool)
            off = 0
            for n, s in zip(names, sizes):
                gen = torch.Generator().manual_seed(dare_seed(seed, str(t), n))
                mask[off:off + s] = torch.rand(s, generator=gen) < frac
                off += s
        elif trim == "global":
            keep = int(d * frac)
            if keep >= d:
                mask = torch.ones(d, dtype=torch.bool)
            else:
                thr = row.abs().kthvalue(d - keep).values
                mask = row.abs() >= thr
        else:
            mask = torch.zeros(d, dtype=torch.bool)
            off = 0
            for s in sizes:
                seg = row[off:off + s].abs()
                keep = int(s * frac)
                order = torch.sort(seg, descending=True, stable=True).indices[:keep]
                mask[off + order] = True
                off += s
        vals = row * mask
        if method == "dare_ties":
            vals = vals / frac
        off = 0
        for n, s in zip(names, sizes):  # values travel in the wire dtype
            wire = value_dtype or (base[n].dtype if base[n].dtype != torch.float64 else torch.float32)
            vals[off:off + s] = vals[off:off + s].to(wire).to(torch.float32)
            off += s
        trimmed[t] = vals

    T = trimmed.to(torch.float64)
    if method == "task_arithmetic":
        merged = (T * w[:, None]).sum(0)
    elif method == "average":
        merged = (T * w[:, None]).sum(0) / w.sum()
    else:
        # 2. ELECT
        weighted_T = T * w[:, None]
        vote_T = T if (weighted and weight_semantics == "peft") else weighted_T
        if election == "mass":
            gamma = torch.sign(vote_T.sum(0))
        else:
            gamma = torch.sign(torch.sign(T).sum(0))
        if zero_sign == "majority":
            fill = torch.sign(gamma.sum())
        else:
            fill = torch.tensor(1.0, dtype=torch.float64)
        gamma = torch.where(gamma == 0, fill, gamma)
        # 3. DISJOINT MERGE
        agree = (torch.sign(T) == gamma[None, :]) & (T != 0)
        sel = weighted_T * agree
        support = agree.sum(0)
        if disjoint == "sum":
            merged = sel.sum(0)
        elif disjoint == "max":
            merged = sel.abs().max(0).values * gamma
        else:
            if weighted and weight_semantics == "mergekit":
                den = (w[:, None] * agree).sum(0)
            else:
                den = support.to(torch.float64)
            merged = torch.where(den > 0, sel.sum(0) / den.clamp_min(1e-300), torch.zeros_like(den))
        merged = torch.where(support >= min_support, merged, torch.zeros_like(merged))
    merged = merged.to(torch.float32)

    # 4. APPLY
    out = {n: t.clone() for n, t in base.items()}
    off = 0
    for n, s in zip(names, sizes):
        seg = merged[off:off + s].reshape(base[n].shape)
        out[n] = (base[n].float() + lam * seg).to(base[n].dtype)
        off += s
    return out
