"""Comparing two merged models tensor by tensor: which elements differ, by how much, and why
(rounding, or a tie at the k-th magnitude where two tools may keep different values).
Tensors are read in row blocks, so a 1B-element embedding is never held whole."""

from __future__ import annotations

from pathlib import Path

#: elements of one tensor compared at once
CHUNK = 1 << 24



class Weights:
    """Tensors of a safetensors folder, read whole or in row blocks (safetensors only: no tiesfed internals)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.files = {}
        self.where = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            h = safe_open(str(f), framework="pt")
            self.files[f] = h
            for n in h.keys():
                self.where[n] = h
        if not self.where:
            raise RuntimeError(f"no safetensors weights in {folder}")

    def get(self, name: str):
        return self.where[name].get_tensor(name)

    def shape(self, name: str) -> list[int]:
        return self.where[name].get_slice(name).get_shape()

    def dtype(self, name: str) -> str:
        return self.where[name].get_slice(name).get_dtype()

    def blocks(self, name: str, chunk: int = CHUNK):
        """The tensor's rows, `chunk` elements or so at a time (a 0-d or 1-d tensor whole)."""
        shape = self.shape(name)
        if len(shape) < 2:
            yield self.get(name)
            return
        row = 1
        for d in shape[1:]:
            row *= d
        step = max(1, chunk // max(row, 1))
        sl = self.where[name].get_slice(name)
        for lo in range(0, shape[0], step):
            yield sl[lo:lo + step]


def ulps(x, y, n: int = 4) -> float:
    """n ulps at the larger of the two tensors' largest magnitudes: the tolerance of 'rounding only'."""
    import torch

    return n * torch.finfo(x.dtype).eps * max(x.abs().max().item(), y.abs().max().item())


def _tolerance(wa: Weights, wb: Weights, n: str, dtype, k: int = 4) -> float:
    import torch

    top = 0.0
    for w in (wa, wb):
        for x in w.blocks(n):
            if x.numel():
                top = max(top, x.abs().max().item())
    return k * torch.finfo(dtype).eps * top


def compare(a: Path, b: Path) -> dict:
    """Elements that differ, their fraction, max |a - b|, names present in one only, dtypes."""
    wa, wb = Weights(a), Weights(b)
    common = sorted(set(wa.where) & set(wb.where))
    differ = total = rounding = 0
    worst = worst_rounding = 0.0
    identical = set(wa.where) == set(wb.where)
    dtypes = set()
    for n in common:
        if wa.shape(n) != wb.shape(n):
            raise RuntimeError(f"{n}: shape {tuple(wa.shape(n))} in {a}, {tuple(wb.shape(n))} in {b}")
        tol = None
        for x, y in zip(wa.blocks(n), wb.blocks(n)):
            dtypes.add((str(x.dtype).replace("torch.", ""), str(y.dtype).replace("torch.", "")))
            if x.dtype != y.dtype:
                identical = False
            ne = x != y
            d = int(ne.sum())
            differ += d
            total += x.numel()
            if not d:
                continue
            identical = False
            # a few ulps of the tensor's largest value: the same selection, summed or divided in another order
            tol = _tolerance(wa, wb, n, x.dtype) if tol is None else tol
            diff = (x.double() - y.double()).abs()
            worst = max(worst, diff.max().item())
            small = ne & (diff <= tol)
            rounding += int(small.sum())
            if small.any():
                worst_rounding = max(worst_rounding, diff[small].max().item())
    return {"identical": identical, "differing": differ, "elements": total, "rounding": rounding,
            "max_rounding_diff": worst_rounding, "selection": differ - rounding,
            "fraction": differ / total if total else 0.0, "max_abs_diff": worst,
            "only_in_a": sorted(set(wa.where) - set(wb.where)), "only_in_b": sorted(set(wb.where) - set(wa.where)),
            "dtypes": sorted(dtypes)}


def explain_selection(a: Path, b: Path, base: Path, fts: list[Path], density: float) -> dict:
    """For elements that differ by more than rounding between two tensor-scope merges: how many
    sit where some task vector's |value| equals its tensor's k-th largest |value| (k = int(density
    n)) while more than one element has that value, so either tool may keep either (a tie at the cut)."""
    import torch

    wa, wb, wbase = Weights(a), Weights(b), Weights(base)
    wfs = [Weights(f) for f in fts]
    at_tie = other = 0
    for n in sorted(set(wa.where) & set(wb.where)):
        x, y = wa.get(n), wb.get(n)
        diff = (x.double() - y.double()).abs()
        big = diff > ulps(x, y)
        if not big.any():
            continue
        bt = wbase.get(n).float()
        tied = torch.zeros_like(big)
        k = max(1, int(density * bt.numel()))
        for wf in wfs:
            tv = (wf.get(n).float() - bt).abs()
            kth = tv.reshape(-1).kthvalue(tv.numel() - k + 1).values
            if int((tv == kth).sum()) > 1:
                tied |= tv == kth
        at_tie += int((big & tied).sum())
        other += int((big & ~tied).sum())
    return {"at_tie": at_tie, "other": other}


