"""The release rule after dropouts (issue 13, `min_release` = m).

U holds the positions at least m sharers' supports cover. A sharer that drops before its
masked upload leaves its positions to the survivors alone: a position of U that fewer than m
survivors cover would come out of the unmasking as the sum of fewer than m organisations,
which is what the rule exists to prevent. So the masked phase's close checks the survivors'
coverage of U and fails the round before the unmask request exists: no secret is
reconstructed and nothing is unmasked. (Clients that drop *after* their masked upload are
still counted: their contributions are in the sum, coverage is unchanged.)
"""

from __future__ import annotations

from typing import Any, Iterable

from tiesfed.coordinator.secure.journal import Journal
from tiesfed.core.secagg.ring import RingError
from tiesfed.core.secagg.support import SupportReader, coverage
from tiesfed.trust.secagg import SecAggError
from tiesfed.trust.secagg.messages import ShareUpload, from_file
from tiesfed.trust.secagg.params import SecAggRound


def _support(journal: Journal, rnd: SecAggRound, client_id: str) -> Any:
    """The client's bitmap as its journalled share upload holds it (left in the file)."""
    held = journal.message_path("shares", client_id)
    up = from_file(held) if held is not None else None
    if not isinstance(up, ShareUpload):
        raise SecAggError(f"round {rnd.round_id!r}: the journal holds no share upload of {client_id!r}")
    return up.support


def check_release(journal: Journal, rnd: SecAggRound, support_packed: Any, sharers: Iterable[str],
                  survivors: list[str]) -> None:
    """SecAggError (naming who dropped and how many positions) if some position of U (its
    packed bitmap) is covered by fewer than `rnd.min_release` of the `survivors`' supports;
    nothing to check with m = 1 or no sharer missing. The bitmaps (U's, and each survivor's
    from the journal) are read block by block: memory is one block's counts."""
    m = rnd.min_release
    dropped = sorted(set(sharers) - set(survivors))
    if m <= 1 or not dropped:
        return
    u, thin = SupportReader(support_packed, rnd.numel), 0
    try:
        for lo, hi, counts in coverage([_support(journal, rnd, c) for c in survivors], rnd.numel):
            thin += int((counts[u.take(hi) - lo] < m).sum())
    except RingError as e:
        raise SecAggError(f"round {rnd.round_id!r}: a journalled support bitmap: {e}") from None
    if thin:
        raise SecAggError(
            f"round {rnd.round_id!r}: the release rule cannot hold after {', '.join(dropped)} dropped out before "
            f"uploading: {thin} position(s) of U are covered by fewer than min_release = {m} of the "
            f"{len(survivors)} client(s) that uploaded, and unmasking would reveal their sums; the round fails "
            "(nothing is unmasked)")
