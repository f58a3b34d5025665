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

from typing import Iterable

import torch

from tiesfed.coordinator.secure.journal import Journal
from tiesfed.core.secagg.ring import RingError
from tiesfed.core.secagg.support import unpack_support
from tiesfed.trust.secagg import SecAggError
from tiesfed.trust.secagg.messages import ShareUpload, from_bytes
from tiesfed.trust.secagg.params import SecAggRound


def check_release(journal: Journal, rnd: SecAggRound, support: torch.Tensor, sharers: Iterable[str],
                  survivors: list[str]) -> None:
    """SecAggError (naming who dropped and how many positions) if some position of U (`support`)
    is covered by fewer than `rnd.min_release` of the `survivors`' supports; nothing to check
    with m = 1 or no sharer missing. The supports are read back from the journal's share
    uploads one at a time, into one int32 count per parameter."""
    m = rnd.min_release
    dropped = sorted(set(sharers) - set(survivors))
    if m <= 1 or not dropped:
        return
    counts = torch.zeros(rnd.numel, dtype=torch.int32)
    for c in survivors:
        held = journal.message("shares", c)
        up = from_bytes(held) if held is not None else None
        if not isinstance(up, ShareUpload):
            raise SecAggError(f"round {rnd.round_id!r}: the journal holds no share upload of {c!r}")
        try:
            idx = unpack_support(up.support, rnd.numel)
        except RingError as e:
            raise SecAggError(f"round {rnd.round_id!r}: the journalled support of {c!r}: {e}") from None
        counts.index_add_(0, idx, torch.ones(idx.numel(), dtype=torch.int32))
    thin = int((counts[support] < m).sum())
    if thin:
        raise SecAggError(
            f"round {rnd.round_id!r}: the release rule cannot hold after {', '.join(dropped)} dropped out before "
            f"uploading: {thin} position(s) of U are covered by fewer than min_release = {m} of the "
            f"{len(survivors)} client(s) that uploaded, and unmasking would reveal their sums; the round fails "
            "(nothing is unmasked)")
