"""Rounds: who may join, what they upload, when the merge happens. No gRPC here.

A `Round` owns one merge: its configuration (options, participants and
weights, quorum, deadline, policies), its durable spool, its aggregator, its
upload sessions and its event log. The gRPC service (`tiesfed.coordinator.service`)
only translates calls and errors; everything that must survive a restart or
be tested without a network lives here.

Uploads. An `UploadSession` receives one client's codec stream chunk by
chunk: every chunk is appended to a partial spool file and fed to an
incremental `StreamReader`; each completed record is validated against the
round (manifest name, shape, no duplicate, nonzeros within the client's k
budget; the codec checks indices, order, values and checksums) and, when the
round folds on arrival, folded into the aggregator at once. Memory per
session is one record; the number of sessions receiving at once is bounded by
the manager's upload slots, so coordinator memory is flat in the number of
clients. At the codec's end marker the contribution is complete: fsync,
checksum, atomic rename, pointer (see `tiesfed.coordinator.spool`).

A rejected upload (or one abandoned and expired) is withdrawn: its folded
records are read back from the partial file and un-folded. `unfold` is exact
when the accumulator sums are (float64 sums of float32 values with weights of
few significant bits), so such rounds fold on arrival ("arrival" mode). A
round whose spec cannot un-fold (disjoint max) folds each contribution when it
is committed and rebuilds its aggregator from the committed spool to replace
one ("commit"). A round whose weights make the sums inexact folds nothing
until it finalizes, then every contribution in participant order ("final"), so
its result does not depend on the order uploads arrived in. In every mode a
rejected upload leaves the aggregator exactly as it was, and the merge equals
the local engine's (which folds in model order) bit for bit.

Modules: `config` (RoundConfig and what it implies), `events` (errors, events,
receipts), `validation` (what a contribution must be), `uploads` (sessions and
their spool files), `aggregation` (folding, un-folding, replay), `state` (a
round's state and bookkeeping), `intake` (uploads entering a round), `finalize`
(a round ending, its outputs, retried when a write fails), `integrity` (lost
contributions, damaged merged streams rebuilt), `provenance` (contribution
signatures checked and kept, the merge signed), `recovery` (restart from the
spool, damage reported and never fatal), `round`
(`Round`, the public API), `manager` (`RoundManager`, upload slots, the ticker).
"""

from tiesfed.coordinator.rounds.aggregation import AggregatorFactory, FoldMode, default_aggregator_factory
from tiesfed.coordinator.rounds.config import (
    LatePolicy,
    ParticipantConfig,
    ReplacePolicy,
    RoundConfig,
    TensorEntry,
    exact_weight,
    nnz_budget,
)
from tiesfed.coordinator.rounds.events import TERMINAL, Event, Merged, Receipt, RoundError
from tiesfed.coordinator.rounds.manager import RoundManager
from tiesfed.coordinator.rounds.round import Round
from tiesfed.coordinator.rounds.state import State
from tiesfed.coordinator.rounds.uploads import UploadSession

__all__ = [
    "TERMINAL",
    "AggregatorFactory",
    "Event",
    "FoldMode",
    "LatePolicy",
    "Merged",
    "ParticipantConfig",
    "Receipt",
    "ReplacePolicy",
    "Round",
    "RoundConfig",
    "RoundError",
    "RoundManager",
    "State",
    "TensorEntry",
    "UploadSession",
    "default_aggregator_factory",
    "exact_weight",
    "nnz_budget",
]
