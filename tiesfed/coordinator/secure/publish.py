"""A secure round's unmasked sums, published through the plain round's outputs.

The unmasked sums (`UnmaskedSums`: a ring file over U and U's bitmap) cover the round's flat
parameter space (manifest order). `FlatAggregator` decodes them a block at a time and shows
them with the read side of `AggregatorLike`: `sign_balance` (the zero-sign rule's scalar, one
pass over the blocks) and `finalize_records` (a second pass: each block's accumulators
finalized, cut into the records `merged_records` cuts, by the spill aggregator's
`cut_records`), so the plain round's `write_merged` writes the same merged stream record by
record, and `write_model` the model from it. Memory: one block's accumulators (16-40 bytes a
parameter of the block), one block of the sum and one record's dense values, whatever the
model's size. The merge is signed over who was counted: each counted client's key
advertisement (its digest, its signature with the certificate key, the certificate).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from tiesfed.coordinator.rounds.aggregation import release
from tiesfed.coordinator.rounds.config import TensorEntry
from tiesfed.coordinator.rounds.finalize import fail, mark_verified, write_merged
from tiesfed.coordinator.rounds.model_copy import write_model
from tiesfed.coordinator.rounds.state import RoundState
from tiesfed.coordinator.spill_aggregator import cut_records, join_tensors
from tiesfed.core.accumulators import Accumulator, FinalizeSpec, finalize, range_balance
from tiesfed.io.files import write_json_atomic
from tiesfed.protos.codec import SparseTensor
from tiesfed.trust import signing
from tiesfed.trust.certs import fingerprint
from tiesfed.trust.secagg import SecAggError
from tiesfed.trust.secagg.messages import KeyAdvert, to_bytes
from tiesfed.trust.secagg.sums import DECODE_BLOCK, UnmaskedSums

log = logging.getLogger("tiesfed.coordinator")


class FlatAggregator:
    """The unmasked sums of a secure round, decoded `block` parameters at a time (read-only:
    the sums are final, nothing folds into them)."""

    def __init__(self, sums: UnmaskedSums, manifest: Sequence[TensorEntry], spec: FinalizeSpec,
                 block: int = DECODE_BLOCK) -> None:
        self.sums, self.spec, self.block = sums, spec, block
        self.names = [t.name for t in manifest]
        self.sizes = [t.numel for t in manifest]
        self.offsets, at = [], 0
        for n in self.sizes:
            self.offsets.append(at)
            at += n
        if at != sums.numel:
            sums.close()
            raise SecAggError(f"the manifest holds {at} parameters, the secure sums {sums.numel}")
        self._balance: Optional[int] = None

    def fold(self, *args: object, **kw: object) -> None:
        raise TypeError("a secure round's sums are final: nothing folds into them")

    def sign_balance(self) -> int:
        """The zero-sign rule's scalar, from the aggregated sums (as every path computes it), block by block."""
        if self.spec.combine != "disjoint":
            return 0
        if self._balance is None:
            self._balance = sum(range_balance(acc, self.spec) for _, acc in self.sums.blocks(self.block))
        return self._balance

    def exact(self) -> bool:
        return True  # integer sums, converted to float64 exactly (`decode_sums`)

    def _pieces(self, majority: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(tensor number, first element, merged float32 values) in flat order, a block at a time;
        `finalize` is elementwise, so a block's slice finalizes as the whole would."""
        t, n = 0, len(self.names)
        for lo, acc in self.sums.blocks(self.block):
            hi = lo + acc.numel
            while t < n and (self.offsets[t] < hi or self.offsets[t] + self.sizes[t] <= hi):
                a, end = max(lo, self.offsets[t]), self.offsets[t] + self.sizes[t]
                z = min(hi, end)
                yield t, a - self.offsets[t], finalize(_slice(acc, a - lo, z - lo), self.spec, majority)
                if end > hi:
                    break  # it goes on in the next block
                t += 1
        for t in range(t, n):  # a model of 0 parameters, or empty tensors at its end
            yield t, 0, torch.zeros(0, dtype=torch.float32)

    def finalize_records(self, majority: int, shapes: dict[str, tuple[int, ...]],
                         span_elems: Optional[int] = None) -> Iterator[SparseTensor]:
        """The merged task vector as the records `merged_records` would cut from whole tensors."""
        return cut_records(self._pieces(majority), self.names, self.sizes, shapes, span_elems or self.block)

    def finalize(self, majority: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Whole dense tensors (memory: the largest tensor; `write_merged` uses `finalize_records`)."""
        return join_tensors(self._pieces(majority), self.names, self.sizes)

    def close(self) -> None:
        """Delete the sums' file."""
        self.sums.close()


def _slice(acc: Accumulator, a: int, z: int) -> Accumulator:
    fields = {k: v[a:z] for k, v in acc.tensors().items()}
    return Accumulator(**fields, contributions=acc.contributions, weight_total=acc.weight_total, exact=acc.exact)


def advert_rows(adverts: Sequence[KeyAdvert]) -> list[dict[str, str]]:
    """The merged manifest's rows for a secure round: one per counted client's key advertisement."""
    return [{"client_id": a.client_id, "sha256": hashlib.sha256(to_bytes(a)).hexdigest(),
             "signature_hex": a.signature.hex(), "cert_fingerprint": fingerprint(a.cert_pem)} for a in adverts]


def publish(r: RoundState, agg: FlatAggregator, adverts: Sequence[KeyAdvert]) -> None:
    """finalizing → the merged stream (signed), the model and its card → finalized; any error
    fails the round with it. The sums' file is deleted after, whatever happened."""
    try:
        _publish(r, agg, adverts)
    finally:
        agg.close()


def _publish(r: RoundState, agg: FlatAggregator, adverts: Sequence[KeyAdvert]) -> None:
    contributors = sorted(a.client_id for a in adverts)
    rows = advert_rows(adverts)
    with r.lock:
        if r.state != "open":
            return
        r.state = "finalizing"
        r._persist()
        r._emit("ROUND_FINALIZING", message=f"secure aggregation: merging the sums of {len(contributors)} client(s)")
    try:
        merged = write_merged(agg, contributors, r.config, r.spec, r.spool)
        if r.signer is not None:
            manifest = signing.merged_manifest(r.id, merged.sha256, rows)
            write_json_atomic(r.spool.merged_sig_path, {
                "manifest": manifest, "signature_hex": signing.sign(r.signer.key_pem, manifest).hex(),
                "cert_pem": r.signer.cert_pem.decode()})
        if r.base_path:
            from tiesfed.io.model_card import write_round_card

            write_model(agg, r.base_path, merged.path, r.spool, r.shard_bytes, r.config)
            write_round_card(r.spool.model_dir, Path(r.base_path),
                             r.config.model_dump(mode="json", by_alias=True, exclude={"manifest"}),
                             {row["client_id"]: row["sha256"] for row in rows}, merged.sha256)
    except Exception as e:
        log.exception("round %s: publishing the secure merge failed", r.id)
        with r.lock:
            fail(r, f"secure aggregation: writing the merge failed: {e!r}")
        return
    with r.lock:
        r.state = "finalized"
        r.merged = merged
        mark_verified(r)
        release(r.agg)
        r.agg = None
        r.message = f"secure aggregation: the sums of {len(contributors)} client(s): {', '.join(contributors)}"
        r._persist()
        r._emit("ROUND_FINALIZED", sha256=merged.sha256, bytes=merged.bytes,
                message=f"majority sign {merged.majority_sign:+d}; {r.message}")
