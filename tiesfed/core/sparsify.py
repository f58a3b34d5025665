"""mergekit 0.1.5's sparsifiers (`mergekit.sparsify`), for mergekit configs whose
trim is not one of tiesfed's own: a dense task-vector tensor in, the sparsified one
out (same shape; dropped entries 0), applied before the merge folds it.

- `magnitude` (ties with `rescale: true`): the max(1, int(d·n)) largest |τ|.
- `random` (DARE): each entry kept with probability d.
- `magnitude_outliers` (breadcrumbs): sort |τ| ascending; drop the int(γ·n) largest
  and the smallest, keeping the int(d·n) just below the dropped top (fewer outliers
  dropped when needed to keep int(d·n)).
- `della_magprune` (DELLA): per row (dim 1; a vector is one row) each entry is kept with
  probability d − ε + 2ε·r, r its magnitude rank in the row scaled to [0, 1].

`rescale` matches mergekit's L1 rescale: the survivors are scaled so that their L1 norm
equals the whole tensor's (skipped where either norm is below 1e-7). d ≥ 1 leaves τ as
it is. The random masks come from a seeded CPU generator (per model and tensor), not
mergekit's global one: the results agree with mergekit's in distribution, not element
by element. Among equal magnitudes at a cut the lower flat index ranks lower, so the
result is deterministic (mergekit's sort leaves it open). Given a `MergekitDraw`
(`--random-seed`), the random methods draw mergekit's own masks instead
(`tiesfed.core.mergekit_rng`), element for element.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from tiesfed.core import radix
from tiesfed.core.mergekit_rng import MergekitDraw

SparsifyMethod = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"]
SPARSIFIERS: tuple[str, ...] = ("magnitude", "random", "magnitude_outliers", "della_magprune")
#: `MergeOptions.sparsifier`'s names for them
OPTION_NAMES: dict[str, SparsifyMethod] = {"magnitude": "magnitude", "dare": "random",
                                           "breadcrumbs": "magnitude_outliers", "della": "della_magprune"}
#: mergekit 0.1.5's defaults of breadcrumbs' γ and DELLA's ε
DEFAULT_GAMMA = 0.01
DEFAULT_EPSILON = 0.15
_EPS = 1e-7


@dataclass(frozen=True)
class Sparsifier:
    """One mergekit sparsifier with its settings, for a whole model (a round's options):
    what `TrimSpec(kind="sparsify")` runs on each tensor, on the client and in the engine."""

    method: SparsifyMethod
    rescale: bool = False
    gamma: float = DEFAULT_GAMMA
    epsilon: float = DEFAULT_EPSILON

    def run(self, tau: torch.Tensor, density: float, *, seed: int, model_key: str, name: str,
            draw: Optional[MergekitDraw] = None) -> torch.Tensor:
        """τ (the tensor's own shape) sparsified; the random methods draw from the generator of
        (seed, model, tensor), as `sparsify_entry` and tiesfed's DARE do, or from `draw`."""
        from tiesfed.core.trim import dare_generator, dare_seed

        gen = (dare_generator(dare_seed(seed, model_key, name))
               if self.method in ("random", "della_magprune") and draw is None else None)
        try:
            return sparsify(tau, self.method, density, rescale=self.rescale, gamma=self.gamma,
                            epsilon=self.epsilon, generator=gen, draw=draw)
        except ValueError as e:
            raise ValueError(f"tensor {name!r}: {e}") from None


def check_della(density: float, epsilon: float) -> None:
    """mergekit's condition on DELLA's ε: both d − ε and d + ε inside (0, 1)."""
    if density < 1 and density > 0 and (density + epsilon >= 1 or density - epsilon <= 0):
        raise ValueError(f"epsilon {epsilon:g} with density {density:g}: density ± epsilon must lie in (0, 1)")


def rescale_l1(tau: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """`masked` scaled to the L1 norm of `tau` (mergekit's `rescaled_masked_tensor`, l1)."""
    before, after = tau.abs().sum(), masked.abs().sum()
    if before < _EPS or after < _EPS:
        return masked
    return masked * (before / after)


def _ascending(flat: torch.Tensor) -> torch.Tensor:
    """Flat indices by ascending |τ|; ties by ascending index."""
    return torch.sort(flat.abs().float(), stable=True).indices


def outlier_window(n: int, density: float, gamma: float) -> tuple[int, int]:
    """[lo, hi): the ascending ranks breadcrumbs keeps (mergekit's n_bot, n_bot + target_n)."""
    target = int(density * n)
    top = int(gamma * n)
    bottom = max(0, n - target - top)
    return bottom, bottom + target


def della_probabilities(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probabilities d − ε + 2ε·rank/(m − 1) along dim 1 (a vector: one row of m)."""
    t = tau.unsqueeze(0) if tau.dim() < 2 else tau
    m = t.shape[1]
    order = torch.sort(t.abs().float(), dim=1, stable=True).indices
    ranks = order.argsort(dim=1).float()
    # a tensor divisor: CUDA divides by a Python scalar as a multiplication by its rounded reciprocal
    scaled = ranks / torch.tensor(float(m - 1), device=ranks.device) if m > 1 else torch.zeros_like(ranks)
    return ((density - epsilon) + scaled * 2 * epsilon).reshape(tau.shape)


def sparsify(
    tau: torch.Tensor,
    method: SparsifyMethod,
    density: float,
    *,
    rescale: bool = False,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    generator: Optional[torch.Generator] = None,
    draw: Optional[MergekitDraw] = None,
) -> torch.Tensor:
    """τ sparsified as mergekit's `sparsify(tau, density, method, gamma, epsilon, l1 if rescale)`.
    `tau`: float32, the tensor's own shape; `generator`: CPU, for the random methods; `draw`: mergekit's
    replayed generator instead (it draws where mergekit draws, also for DARE at density ≤ 0)."""
    if density >= 1:
        return tau
    n = tau.numel()
    if method == "della_magprune" and density > 0:
        check_della(density, epsilon)
    if draw is not None and method in ("random", "della_magprune") and draw.draws(method, density):
        keep = draw.keep(tau, method, density, epsilon).reshape(-1)
        masked = torch.where(keep, tau.reshape(-1), torch.zeros((), dtype=tau.dtype, device=tau.device))
        return rescale_l1(tau, masked.reshape(tau.shape)) if rescale else masked.reshape(tau.shape)
    if density <= 0 and method != "magnitude_outliers":
        return torch.zeros_like(tau)
    flat = tau.reshape(-1)
    keep = torch.zeros(n, dtype=torch.bool, device=tau.device)
    if method == "magnitude":
        if n:
            keep[radix.top_count(radix.abs_bits(flat), max(1, int(density * n)))] = True
    elif method == "random":
        keep = (torch.rand(n, generator=generator) < density).to(tau.device)
    elif method == "magnitude_outliers":
        lo, hi = outlier_window(n, density, gamma)
        keep[_ascending(flat)[lo:hi]] = True
    elif method == "della_magprune":
        probs = della_probabilities(tau, density, epsilon).reshape(-1)
        keep = (torch.rand(n, generator=generator) < probs.cpu()).to(tau.device)
    else:
        raise ValueError(f"unknown sparsification method {method!r}; known: {', '.join(SPARSIFIERS)}")
    masked = torch.where(keep, flat, torch.zeros((), dtype=flat.dtype, device=flat.device)).reshape(tau.shape)
    return rescale_l1(tau, masked) if rescale else masked


def sparsify_entry(tau: torch.Tensor, sparsifier: dict, density: float, name: str, at: float, *,
                   seed: int, model_key: str, draw: Optional[MergekitDraw] = None) -> torch.Tensor:
    """One model's tensor through its mergekit sparsifier (`ModelEntry.sparsifier`: method, rescale,
    gamma/epsilon settings resolved for this tensor at layer position `at`). The random methods
    draw from a generator seeded by (seed, model, tensor), as tiesfed's DARE, or from `draw`."""
    from tiesfed.core.tensor_params import resolve
    from tiesfed.core.trim import dare_generator, dare_seed

    method = sparsifier["method"]
    extra = {}
    for key in ("gamma", "epsilon"):
        if key in sparsifier:
            value = resolve(name, sparsifier[key] or (), at, sparsifier.get(f"{key}_default"))
            if value is None:
                raise ValueError(f"tensor {name!r}: no {key} (no filter matches)")
            extra[key] = float(value)
    gen = (dare_generator(dare_seed(seed, model_key, name))
           if method in ("random", "della_magprune") and draw is None else None)
    try:
        return sparsify(tau, method, density, rescale=bool(sparsifier.get("rescale")), generator=gen, draw=draw,
                        **extra)
    except ValueError as e:
        raise ValueError(f"tensor {name!r}: {e}") from None
