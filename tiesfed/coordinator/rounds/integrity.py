"""Is what the spool holds still what was written? Checks of committed contributions
and of the merged stream, and what a round does when one is damaged.

A committed contribution whose pointer is damaged, whose file is missing or
fails its size or sha256 check, or whose signature file (a signed round's) is
missing, edited or does not verify, is *lost*: it is moved to ``damaged/``, its client
no longer counts as committed, an UPLOAD_REJECTED event and the round's status
message tell that client to upload again, and the round finalizes without it only
when its quorum and deadline rules say so with the others (the status then says so).

A merged stream that no longer matches its recorded size and sha256 is rebuilt by
finalizing again from the committed contributions (after checking them): the merge
is deterministic, so the result is the same stream, bit for bit. It is checked on
recovery and before a Download serves it: hashed again when its size, mtime or inode
changed since the last check, or that check is older than `RECHECK_S` (damage that
leaves the file's metadata alone is found within that time).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Container
from typing import Optional

from tiesfed.coordinator.rounds.config import RoundConfig
from tiesfed.coordinator.rounds.events import Merged, RoundError
from tiesfed.coordinator.rounds.finalize import (
    mark_verified,
    maybe_finalize,
    persist_or_log,
    start_finalizer,
    stat_signature,
    write_outputs,
)
from tiesfed.coordinator.rounds.provenance import contribution_signature_problem
from tiesfed.coordinator.rounds.state import RoundState, lost_notice
from tiesfed.coordinator.spool import Committed, RoundSpool
from tiesfed.io.files import sha256_file

log = logging.getLogger("tiesfed.coordinator")

#: how long a Download waits for a damaged merged stream to be rebuilt before it
#: answers UNAVAILABLE (the client retries)
REBUILD_WAIT_S = 60.0
#: a merged stream whose file looks unchanged is hashed again after this long
RECHECK_S = 300.0

#: client id -> (what is wrong, the committed contribution when its pointer was readable)
Lost = dict[str, tuple[str, Optional[Committed]]]


def contribution_problem(spool: RoundSpool, c: Committed, config: Optional[RoundConfig] = None) -> Optional[str]:
    """What is wrong with a committed contribution's file (and, given the round's `config`,
    its signature), or None if it is intact."""
    name = c.path.relative_to(spool.dir) if c.path.is_relative_to(spool.dir) else c.path
    if not c.path.is_file():
        return f"its file {name} is missing"
    size = c.path.stat().st_size
    if size != c.bytes:
        return f"its file {name} holds {size} bytes, {c.bytes} were committed"
    if sha256_file(c.path) != c.sha256:
        return f"its file {name} fails its sha256 check (damaged on disk)"
    return contribution_signature_problem(config, c) if config is not None else None


def check_contributions(spool: RoundSpool, participants: Container[str],
                        config: Optional[RoundConfig] = None) -> tuple[dict[str, Committed], Lost]:
    """(intact committed contributions, lost ones) of the round's participants (signatures
    checked given `config`). Pointers of clients that are not participants are moved to
    ``damaged/`` (nobody to tell)."""
    good, bad = spool.scan_committed()
    lost: Lost = {cid: (str(e), None) for cid, e in bad.items() if cid in participants}
    intact: dict[str, Committed] = {}
    for cid, c in good.items():
        if cid not in participants:
            log.warning("round %s: a contribution pointer of %r, not a participant: moved to %s",
                        spool.round_id, cid, spool.damaged_dir)
            spool.quarantine(cid, c)
            continue
        problem = contribution_problem(spool, c, config)
        if problem is None:
            intact[cid] = c
        else:
            lost[cid] = (problem, c)
    for cid in bad:
        if cid not in participants:
            spool.quarantine(cid, None)
    return intact, lost


def drop_lost(r: RoundState, lost: Lost) -> None:
    """Take lost contributions out of the round (lock held): moved to ``damaged/``, their
    clients told (event and status message) to upload again. A close request made
    over the set that included them is withdrawn: the round ends by its rules again."""
    for cid, (why, c) in lost.items():
        moved = r.spool.quarantine(cid, c)
        r.committed.pop(cid, None)
        r.lost[cid] = why
        log.error("round %s: the committed contribution of %r was lost (%s); moved to %s; %r must upload it again",
                  r.id, cid, why, ", ".join(str(p) for p in moved) or "nothing to move", cid)
        r._emit("UPLOAD_REJECTED", client_id=cid, message=lost_notice(cid, why, "open"))
    if lost:
        r.close_requested = False


def merged_problem(merged: Merged) -> Optional[str]:
    """What is wrong with a merged stream on disk, or None if it is what was recorded."""
    p = merged.path
    if not p.is_file():
        return f"{p} is missing"
    size = p.stat().st_size
    if size != merged.bytes:
        return f"{p} holds {size} bytes, {merged.bytes} were written"
    if sha256_file(p) != merged.sha256:
        return f"{p} fails its sha256 check (damaged on disk)"
    return None


def rebuild_merged(r: RoundState, problem: str) -> None:
    """A finalized round's merged stream is damaged (lock held): finalize again, on the
    finalizer thread, from the committed contributions once they are checked."""
    log.error("round %s: the merged stream is damaged: %s; finalizing again from the committed contributions",
              r.id, problem)
    r.state = "finalizing"
    r.merged = None
    r.merged_verified = None
    persist_or_log(r)  # a crash from here on finalizes again on restart
    r._emit("ROUND_FINALIZING", message=f"the merged stream was damaged ({problem}): rebuilding it from "
            f"{len(r.committed)} committed contribution(s)")
    start_finalizer(r, body=lambda: _finalize_again(r))


def _finalize_again(r: RoundState) -> None:
    intact, lost = check_contributions(r.spool, r.participants, r.config)  # hashing: not under the lock
    with r.lock:
        if lost:  # the inputs changed too: back to open, the lost clients upload again
            drop_lost(r, lost)
            r.state = "open"
            r._finalizer = None
            persist_or_log(r)
            maybe_finalize(r)
            return
        contributors = sorted(r.committed)
    r.spool.clear_outputs()
    write_outputs(r, contributors)


def merged_to_serve(r: RoundState, wait_s: float = REBUILD_WAIT_S) -> Merged:
    """The merged stream, checked before a Download serves it. A damaged one is rebuilt
    first (waiting up to `wait_s`; UNAVAILABLE after that, so the client retries)."""
    problem = ""
    for _ in range(2):
        with r.lock:
            if r.state == "finalizing":
                r.event_log.wait_until(lambda: r.state != "finalizing", wait_s)
            if r.state != "finalized" or r.merged is None:
                if problem and r.state == "finalizing":
                    raise RoundError("UNAVAILABLE", f"round {r.id!r}: the merged stream was damaged ({problem}) "
                                     "and is being rebuilt: retry shortly")
                raise RoundError("FAILED_PRECONDITION", f"round {r.id!r} is {r.state}: nothing to download yet"
                                 + (f" ({r.message})" if r.message else ""))
            merged, known = r.merged, r.merged_verified
        sig = stat_signature(merged.path)
        if sig is not None and known is not None and known[0] == sig and time.monotonic() - known[1] < RECHECK_S:
            return merged
        problem = merged_problem(merged) or ""  # hashing: not under the lock
        with r.lock:
            if r.merged is not merged:  # rebuilt meanwhile: check the new one
                continue
            if not problem:
                if stat_signature(merged.path) == sig:  # unchanged while it was hashed
                    mark_verified(r)
                return merged
            rebuild_merged(r, problem)
    raise RoundError("UNAVAILABLE", f"round {r.id!r}: the merged stream is being rebuilt: retry shortly")
