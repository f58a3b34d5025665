"""The round: one merge's state machine, open -> finalizing -> finalized (or failed).

`Round` is a `RoundState` (what the round is, its lock, its bookkeeping) with the
public API the gRPC service, the server and the tests use. Each call delegates
to the flow it belongs to: uploads entering (`intake`), the round ending
(`finalize`), a restart (`recovery`). The flows take the same lock the original
methods took, for the same critical sections.
"""

from __future__ import annotations

from typing import Any, Optional

from tiesfed.coordinator.rounds import finalize, intake, integrity, provenance
from tiesfed.coordinator.rounds.aggregation import AggregatorFactory
from tiesfed.coordinator.rounds.config import RoundConfig
from tiesfed.coordinator.rounds.events import Merged, Receipt
from tiesfed.coordinator.rounds.recovery import load_config, restore
from tiesfed.coordinator.rounds.state import RoundState
from tiesfed.coordinator.rounds.uploads import UploadSession
from tiesfed.coordinator.spool import RoundSpool
from tiesfed.io.files import DamagedFileError
from tiesfed.trust import Peer


class Round(RoundState):
    """One federated merge round. Thread-safe; all state changes under `lock`."""

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(cls, config: RoundConfig, spool: RoundSpool, aggregator_factory: AggregatorFactory, **kw) -> "Round":
        """Open a new round: write it to the spool, start an empty aggregator."""
        r = cls(config, spool, aggregator_factory, **kw)
        spool.create(config.model_dump(mode="json", by_alias=True))
        r._persist()
        # pending: `readiness.attach` builds it; a secure round has none (secure/ holds its sums)
        if r.fold_mode != "final" and not r.agg_pending and not config.secure_aggregation:
            r.agg = r._new_aggregator()
        r._emit("ROUND_OPENED", message=f"round {r.id} opened for {len(r.participants)} participant(s)")
        return r

    @classmethod
    def recover(cls, spool: RoundSpool, aggregator_factory: AggregatorFactory, **kw) -> "Round":
        """Load a round from the spool after a restart (see `recovery.restore`).

        Raises DamagedFileError naming the round file when it cannot be read or
        describes no round this coordinator can set up."""
        config = load_config(spool)
        try:
            r = cls(config, spool, aggregator_factory, **kw)
        except (ValueError, TypeError, KeyError) as e:
            raise DamagedFileError(spool.round_file, "round file",
                                   f"describes a round that cannot be set up: {e!r}") from e
        restore(r)
        return r

    # ------------------------------------------------------------------ uploads

    def begin_upload(self, client_id: str, offset: int, peer: Optional[Peer] = None) -> UploadSession:
        """Attach an upload stream: offset 0 starts over, anything else resumes. With the
        stream's `peer` (mutual TLS) the upload must carry its client's signature."""
        return intake.begin(self, client_id, offset, peer)

    def detach(self, s: UploadSession) -> Receipt:
        """The stream feeding `s` ended or broke: keep what arrived for a resume."""
        return intake.detach(self, s)

    def feed(self, s: UploadSession, offset: int, data: bytes, signature: bytes = b"") -> Optional[Receipt]:
        """Take one chunk (with the upload's signature on the one carrying its last bytes).
        Returns the receipt once the contribution is committed.

        Raises RoundError (after withdrawing the whole upload) when anything is wrong.
        """
        return intake.feed(self, s, offset, data, signature)

    def reject(self, s: UploadSession, why: str) -> None:
        """Withdraw an upload that failed validation; the round is left as it was."""
        intake.reject(self, s, why)

    # ------------------------------------------------------------------ closing

    def tick(self, now: Optional[float] = None) -> None:
        """Periodic work: expire abandoned uploads, act on the deadline."""
        now = self.clock() if now is None else now
        with self.lock:
            if self.state != "open":
                return
            for s in self.uploads.idle(now, self.abandon_after_s):
                self._discard(s, f"abandoned (idle {now - s.last_active:.0f} s)")
                self._emit("UPLOAD_ABANDONED", client_id=s.client_id, message=s.reason)
            if self.deadline_passed(now) and not self._deadline_seen:
                self._deadline_seen = True
                finalize.on_deadline(self, now)

    def close(self, abort: bool = False, timeout: Optional[float] = None) -> None:
        """Admin: finalize now (quorum must be met), or abort. Waits for the finalization."""
        finalize.close(self, abort, timeout)

    def merged_to_serve(self, wait_s: float = integrity.REBUILD_WAIT_S) -> Merged:
        """The merged stream for a Download, its sha256 checked; a damaged one is rebuilt first."""
        return integrity.merged_to_serve(self, wait_s)

    def merged_provenance(self) -> Optional[dict[str, Any]]:
        """The coordinator's signature record of the merge ({manifest, signature_hex, cert_pem}),
        as on disk; None when the round was finalized without an identity."""
        return provenance.merged_record(self)
