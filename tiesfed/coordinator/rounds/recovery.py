"""What a restarted coordinator makes of a round's spool.

The state file (written by `RoundState._persist`) says where the round stood:
open, finalizing, finalized or failed, whether an admin asked to close it, the
merged digest. A finished round comes back as it was; an open (or interrupted
finalizing) one drops half-received uploads, re-verifies every committed
contribution and folds it again.
"""

from __future__ import annotations

import logging
from collections.abc import Container
from dataclasses import dataclass
from typing import Iterator, Optional

from tiesfed.coordinator.rounds.aggregation import fold_file
from tiesfed.coordinator.rounds.events import Merged
from tiesfed.coordinator.rounds.finalize import maybe_finalize
from tiesfed.coordinator.rounds.state import RoundState
from tiesfed.coordinator.spool import Committed, RoundSpool
from tiesfed.io.files import sha256_file

log = logging.getLogger("tiesfed.coordinator")


@dataclass
class SavedState:
    """The state file as read back after a restart."""

    state: Optional[str]
    message: str
    close_requested: bool  # asked by an admin, or implied by an interrupted finalization
    merged: Optional[Merged]  # a finalized round's result

    @property
    def finished(self) -> bool:
        return self.state in ("finalized", "failed")

    @classmethod
    def load(cls, spool: RoundSpool) -> "SavedState":
        st = spool.load_state()
        state = st.get("state")
        merged = None
        if state == "finalized":
            merged = Merged(st["merged_sha256"], int(st["merged_bytes"]), int(st["majority_sign"]), spool.merged_path)
        return cls(
            state=state,
            message=st.get("message", ""),
            close_requested=bool(st.get("close_requested")) or state == "finalizing",
            merged=merged,
        )


def reset_uploads(spool: RoundSpool) -> None:
    """An unfinished round restarts without half-received uploads, orphans or partial outputs."""
    spool.clear_partials()
    spool.remove_orphans()
    spool.clear_outputs()


def verified_contributions(
    spool: RoundSpool, participants: Container[str], round_id: str, dropped: list[str]
) -> Iterator[tuple[str, Committed]]:
    """The committed contributions that are a participant's, present and intact.

    The others are dropped from the spool (and their client ids appended to
    `dropped`) as the iteration reaches them.
    """
    for cid, c in spool.committed().items():
        if cid not in participants or not c.path.is_file() or sha256_file(c.path) != c.sha256:
            log.warning("round %s: dropping contribution of %s: missing or checksum mismatch", round_id, cid)
            spool.drop(cid)
            dropped.append(cid)
            continue
        yield cid, c


def restore(r: RoundState) -> None:
    """Bring a just-constructed round back to where its spool says it stood.

    Finished rounds come back as they were. An open (or interrupted
    finalizing) round drops half-received uploads, verifies each committed
    contribution's checksum and folds it again; a round whose admin had
    asked to close it finalizes again.
    """
    spool = r.spool
    saved = SavedState.load(spool)
    r.message = saved.message
    r.close_requested = saved.close_requested
    if saved.finished:
        r.state = saved.state
        r.merged = saved.merged
        r._emit("ROUND_OPENED", message=f"round {r.id} recovered ({r.state})")
        r._emit("ROUND_FINALIZED" if r.state == "finalized" else "ROUND_FAILED", message=r.message,
                sha256=r.merged.sha256 if r.merged else "", bytes=r.merged.bytes if r.merged else 0)
        return
    reset_uploads(spool)
    if r.fold_mode != "final":
        r.agg = r._new_aggregator()
    dropped: list[str] = []
    for cid, c in verified_contributions(spool, r.participants, r.id, dropped):
        if r.fold_mode != "final":
            fold_file(r.agg, c.path, r.participants[cid].weight, +1, r.limits)
        r.committed[cid] = c
    with r.lock:
        r.state = "open"
        r._persist()
        msg = f"round {r.id} recovered with {len(r.committed)} committed contribution(s)"
        if dropped:
            msg += f"; dropped (checksum mismatch): {', '.join(dropped)}"
        r._emit("ROUND_OPENED", message=msg)
        maybe_finalize(r)
