"""Working memory a client's pass reuses from tensor to tensor.

A fresh 100 MB tensor costs more in page faults (the kernel zeroes and maps each
page on first touch) than the arithmetic that fills it, and a pass over a model
makes several per block: τ, |τ|'s bit patterns, a mask. Here τ is computed in
place in the fine-tuned block just read (it is the pass's own copy), and the bit
patterns and masks go to buffers that grow to the largest block once and are then
written again. Results are the same bits as `core.radix`/`core.trim` give (the same
elementwise operations). One `Scratch` per pass and thread: its buffers are
overwritten by the next call, so a caller keeps nothing it returns as a view.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from tiesfed.core import radix
from tiesfed.core.trim import task_vector


def tau_in_place(base: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """Flat float32 τ = θ_ft − θ_base, written over `ft` when it is float32 already (a
    fresh read the caller owns); the same values as `core.trim.task_vector`."""
    if ft.dtype != torch.float32:
        return task_vector(base, ft)
    return ft.sub_(base.to(torch.float32)).reshape(-1)


class Scratch:
    """Reused buffers for |τ|'s bit patterns and a mask (CPU; on another device the
    plain `core.radix` functions run instead)."""

    def __init__(self) -> None:
        self._f32: Optional[torch.Tensor] = None
        self._mask: Optional[np.ndarray] = None
        self._diff: Optional[np.ndarray] = None

    def abs_bits(self, tau: torch.Tensor) -> torch.Tensor:
        """`radix.abs_bits(tau)`, in the reused buffer (valid until the next call)."""
        flat = tau.reshape(-1)
        if flat.device.type != "cpu" or flat.dtype != torch.float32:
            return radix.abs_bits(flat)
        n = flat.numel()
        if self._f32 is None or self._f32.numel() < n:
            self._f32 = torch.empty(n, dtype=torch.float32)
        out = self._f32[:n]
        torch.abs(flat, out=out)
        return out.view(torch.int32)

    def _mask_of(self, n: int) -> np.ndarray:
        if self._mask is None or self._mask.size < n:
            self._mask = np.empty(n, dtype=bool)
        return self._mask[:n]

    def at_least(self, bits: torch.Tensor, lowest: int) -> torch.Tensor:
        """Flat indices (ascending) of the nonzero `bits` >= `lowest`: `radix.at_least`'s
        indices, without their bits."""
        if bits.device.type != "cpu":
            return radix.at_least(bits, lowest)[0]
        b = bits.numpy()
        mask = self._mask_of(b.size)
        np.greater_equal(b, max(lowest, 1), out=mask)
        return torch.from_numpy(np.flatnonzero(mask))

    def offsets(self, bits: torch.Tensor, lo: int) -> np.ndarray:
        """`bits` − `lo` as int32 (no overflow for 0 <= bits, lo < 2**31), in a reused buffer."""
        b = bits.cpu().numpy()
        if self._diff is None or self._diff.size < b.size:
            self._diff = np.empty(b.size, dtype=np.int32)
        out = self._diff[: b.size]
        np.subtract(b, np.int32(lo), out=out)
        return out

    def below(self, d: np.ndarray, bound: int) -> np.ndarray:
        """The mask `d` < `bound`, in the reused mask buffer."""
        mask = self._mask_of(d.size)
        np.less(d, bound, out=mask)
        return mask
