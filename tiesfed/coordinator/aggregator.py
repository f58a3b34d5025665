"""A whole model's accumulators in one process: the reference aggregator.

The federated coordinator folds each uploaded tensor into this the moment it
arrives; the Ray-sharded aggregator offers the same four methods with the
parameter space split over actors. Memory is `FinalizeSpec.bytes_per_param`
per parameter, flat in the number of clients.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Protocol

import torch

from tiesfed.core.accumulators import (
    Accumulator,
    FinalizeSpec,
    finalize,
    fold,
    majority_sign,
    new_accumulator,
    range_balance,
)


class AggregatorLike(Protocol):
    """What the round logic needs from any aggregator (local or Ray-sharded)."""

    def fold(self, name: str, indices: torch.Tensor, values: torch.Tensor, weight: float = 1.0,
             direction: int = 1) -> None: ...

    def sign_balance(self) -> int: ...

    def exact(self) -> bool:
        """Every float sum so far was exact: withdrawing a contribution by
        un-folding it, or the order of the folds, cannot change the result."""
        ...

    def finalize(self, majority: int) -> Iterator[tuple[str, torch.Tensor]]: ...


class Aggregator:
    """Accumulators for every tensor of a manifest, keyed by tensor name."""

    def __init__(self, manifest: Iterable[tuple[str, int]], spec: FinalizeSpec, device: str = "cpu") -> None:
        self.spec = spec
        self.device = device
        self._acc: dict[str, Accumulator] = {
            name: new_accumulator(numel, spec, device) for name, numel in manifest
        }

    def fold(self, name: str, indices: torch.Tensor, values: torch.Tensor, weight: float = 1.0,
             direction: int = 1) -> None:
        try:
            acc = self._acc[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in the round's manifest") from None
        fold(acc, indices, values, weight, direction=direction)

    def sign_balance(self) -> int:
        if self.spec.combine != "disjoint":
            return 0
        return sum(range_balance(acc, self.spec) for acc in self._acc.values())

    def exact(self) -> bool:
        return all(acc.exact for acc in self._acc.values())

    def finalize(self, majority: int) -> Iterator[tuple[str, torch.Tensor]]:
        for name, acc in self._acc.items():
            yield name, finalize(acc, self.spec, majority).cpu()

    def merged(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Election's all-reduce then the disjoint merge, tensor by tensor."""
        return self.finalize(majority_sign(self.sign_balance()))
