"""What a restarted coordinator makes of a round's spool.

The state file (written by `RoundState._persist`) says where the round stood:
open, finalizing, finalized or failed, whether an admin asked to close it, the
merged digest, the clients whose contributions were lost. A finished round comes
back as it was, unless its merged stream fails its check or it failed to finalize
(an I/O error, not a rule): those finalize again from the spool. An open (or
interrupted finalizing) one drops half-received uploads, checks every committed
contribution (lost ones are reported, see `integrity`) and folds the rest again.

Damage never stops a restart: a round file that cannot be read or describes no
valid round raises `DamagedFileError` naming it (the manager logs it and leaves
the round out); a damaged state file makes the round come back failed, with a
message naming the file, and leaves the file as it is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from pydantic import ValidationError

from tiesfed.coordinator.rounds.config import RoundConfig
from tiesfed.coordinator.rounds.events import Merged
from tiesfed.coordinator.rounds.finalize import mark_verified, maybe_finalize
from tiesfed.coordinator.rounds.integrity import check_contributions, drop_lost, merged_problem
from tiesfed.coordinator.rounds.state import RoundState
from tiesfed.coordinator.spool import RoundSpool
from tiesfed.core.options import validation_message
from tiesfed.io.files import DamagedFileError

log = logging.getLogger("tiesfed.coordinator")


def load_config(spool: RoundSpool) -> RoundConfig:
    """The round's configuration, or DamagedFileError naming round.json and what is wrong."""
    raw = spool.load_config()
    try:
        config = RoundConfig.model_validate(raw)
    except ValidationError as e:
        raise DamagedFileError(spool.round_file, "round file", f"is not a valid round: {validation_message(e)}") from None
    except ValueError as e:
        raise DamagedFileError(spool.round_file, "round file", f"is not a valid round: {e}") from None
    if config.round_id != spool.round_id:
        raise DamagedFileError(spool.round_file, "round file", f"names round {config.round_id!r}, "
                               f"but lies in the folder of round {spool.round_id!r}")
    if not config.base_fingerprint or not config.manifest:
        raise DamagedFileError(spool.round_file, "round file", "has no base fingerprint or no tensor manifest")
    for t in config.manifest:
        if not t.shape or any(d < 1 for d in t.shape):
            raise DamagedFileError(spool.round_file, "round file",
                                   f"gives tensor {t.name!r} the shape {list(t.shape)}: dimensions must be >= 1")
    return config


@dataclass
class SavedState:
    """The state file as read back after a restart."""

    state: Optional[str]
    message: str
    close_requested: bool  # asked by an admin, or implied by an interrupted finalization
    merged: Optional[Merged]  # a finalized round's result
    lost: dict[str, str] = field(default_factory=dict)  # clients asked to upload again
    refinalize: bool = False  # failed by a finalization error: finalize again
    model_pending: bool = False  # finalized (publish_first), the model copy unfinished

    @property
    def finished(self) -> bool:
        return self.state in ("finalized", "failed")

    @classmethod
    def load(cls, spool: RoundSpool) -> "SavedState":
        """Raises DamagedFileError naming the state file if it is not a valid state."""
        st = spool.load_state()
        state = st.get("state")
        merged = None
        if state == "finalized":
            merged = Merged(st["merged_sha256"], int(st["merged_bytes"]), int(st["majority_sign"]), spool.merged_path)
        lost = st.get("lost") or {}
        return cls(
            state=state,
            message=str(st.get("message", "")),
            close_requested=bool(st.get("close_requested")) or state == "finalizing",
            merged=merged,
            lost={str(k): str(v) for k, v in lost.items()} if isinstance(lost, dict) else {},
            refinalize=state == "failed" and bool(st.get("refinalize_on_restart")),
            model_pending=state == "finalized" and bool(st.get("model_pending")),
        )


def reset_uploads(spool: RoundSpool) -> None:
    """An unfinished round restarts without half-received uploads, orphans or partial outputs."""
    spool.clear_partials()
    spool.remove_orphans()
    spool.clear_outputs()


def restore(r: RoundState) -> None:
    """Bring a just-constructed round back to where its spool says it stood (see the module)."""
    spool = r.spool
    try:
        saved = SavedState.load(spool)
    except DamagedFileError as e:
        log.error("round %s: %s; the round comes back failed, its files are left as they are", r.id, e)
        r.state = "failed"
        r.message = f"not recovered: {e}"
        r.committed = spool.committed()
        r._emit("ROUND_FAILED", message=r.message)
        return
    r.message = saved.message
    r.close_requested = saved.close_requested
    r.lost = saved.lost
    again = ""  # why a finished round finalizes again
    if saved.state == "finalized":
        problem = merged_problem(saved.merged)
        if problem:
            again = f"its merged stream was damaged ({problem})"
    elif saved.state == "failed" and saved.refinalize:
        again = f"it had failed to finalize ({saved.message})"
    if saved.finished and not again:
        come_back_finished(r, saved)
        return
    if again:
        log.error("round %s: %s: finalizing again from the committed contributions", r.id, again)
        r.message = ""
        r.close_requested = True
    reset_uploads(spool)
    intact, lost = check_contributions(spool, r.participants, r.config)
    with r.lock:
        r.committed = {cid: intact[cid] for cid in r.participants if cid in intact}
        if r.fold_mode != "final":
            r._rebuild()  # the committed contributions, in participant order (once the aggregator is up)
        r.state = "open"
        msg = f"round {r.id} recovered with {len(r.committed)} committed contribution(s)"
        if again:
            msg += f"; finalizing again: {again}"
        if lost:
            msg += f"; lost, to upload again: {', '.join(lost)}"
        r._emit("ROUND_OPENED", message=msg)
        drop_lost(r, lost)
        r._persist()
        maybe_finalize(r)


def come_back_finished(r: RoundState, saved: SavedState) -> None:
    """A finalized or failed round as it was; its committed contributions listed (not folded)."""
    r.state = saved.state
    r.merged = saved.merged
    mark_verified(r)  # a finalized round's stream was just checked
    r.committed = r.spool.committed()
    r._emit("ROUND_OPENED", message=f"round {r.id} recovered ({r.state})")
    r._emit("ROUND_FINALIZED" if r.state == "finalized" else "ROUND_FAILED", message=r.message,
            sha256=r.merged.sha256 if r.merged else "", bytes=r.merged.bytes if r.merged else 0)
    if saved.model_pending and r.base_path:
        from tiesfed.coordinator.rounds.model_copy import resume_copy

        log.warning("round %s: its model copy was not finished: writing it again", r.id)
        r.model_pending = True
        resume_copy(r)
