"""A secure round's unmasked sums, published through the plain round's outputs.

The decoded `Accumulator` covers the round's flat parameter space (manifest order);
`FlatAggregator` shows it per tensor with the read side of `AggregatorLike`, so the plain
round's `write_merged` (sign_balance all-reduce, `finalize`, the codec stream) and
`write_model` write the merged stream and model, and `tiesfed client fetch` reads them as
from any round. The merge is signed over who was counted: each counted client's key
advertisement (its digest, its signature with the certificate key, the certificate).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Iterator, Sequence

import torch

from tiesfed.coordinator.rounds.aggregation import release
from tiesfed.coordinator.rounds.config import TensorEntry
from tiesfed.coordinator.rounds.finalize import fail, mark_verified, write_merged
from tiesfed.coordinator.rounds.model_copy import write_model
from tiesfed.coordinator.rounds.state import RoundState
from tiesfed.core.accumulators import Accumulator, FinalizeSpec, elect, finalize, sign_balance
from tiesfed.io.files import write_json_atomic
from tiesfed.trust import signing
from tiesfed.trust.certs import fingerprint
from tiesfed.trust.secagg.messages import KeyAdvert, to_bytes

log = logging.getLogger("tiesfed.coordinator")


class FlatAggregator:
    """The unmasked sums of a secure round, tensor by tensor in manifest order (read-only:
    the sums are final, nothing folds into them)."""

    def __init__(self, acc: Accumulator, manifest: Sequence[TensorEntry], spec: FinalizeSpec) -> None:
        self.acc, self.spec = acc, spec
        self.spans: list[tuple[str, int, int]] = []
        at = 0
        for t in manifest:
            self.spans.append((t.name, at, at + t.numel))
            at += t.numel

    def fold(self, *args: object, **kw: object) -> None:
        raise TypeError("a secure round's sums are final: nothing folds into them")

    def sign_balance(self) -> int:
        """The zero-sign rule's scalar, from the aggregated sums (as every path computes it)."""
        return sign_balance(elect(self.acc, self.spec)) if self.spec.combine == "disjoint" else 0

    def exact(self) -> bool:
        return self.acc.exact

    def finalize(self, majority: int) -> Iterator[tuple[str, torch.Tensor]]:
        """`finalize` is elementwise: once over the flat sums, then sliced per tensor."""
        merged = finalize(self.acc, self.spec, majority).cpu()
        for name, lo, hi in self.spans:
            yield name, merged[lo:hi]


def advert_rows(adverts: Sequence[KeyAdvert]) -> list[dict[str, str]]:
    """The merged manifest's rows for a secure round: one per counted client's key advertisement."""
    return [{"client_id": a.client_id, "sha256": hashlib.sha256(to_bytes(a)).hexdigest(),
             "signature_hex": a.signature.hex(), "cert_fingerprint": fingerprint(a.cert_pem)} for a in adverts]


def publish(r: RoundState, agg: FlatAggregator, adverts: Sequence[KeyAdvert]) -> None:
    """finalizing → the merged stream (signed), the model and its card → finalized; any error
    fails the round with it."""
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
