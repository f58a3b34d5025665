"""What a coordinator exposes to Prometheus: traffic, verdicts, folding, phases, waits.

The round code reports events to a `Metrics` (the no-op `NO_METRICS` unless a server
gave it a `CoordinatorMetrics`), so library users and tests that build rounds by hand
need nothing. Each `CoordinatorMetrics` owns its own `CollectorRegistry`, not the
process-wide one, so several coordinators in one process (tests) do not clash; a
server publishes it with `serve_http`.

    tiesfed_upload_bytes_received_total                 bytes of upload chunks taken, committed or not
    tiesfed_contributions_accepted_total                contributions committed (new or replacing one)
    tiesfed_contributions_rejected_total{reason}        uploads refused or withdrawn; `reason` is one of REASONS
    tiesfed_parameters_folded_total                     nonzeros folded into accumulators (rate() = fold rate)
    tiesfed_fold_seconds                                one record's fold call (a sharded one only enqueues it)
    tiesfed_round_state{round, tiesfed_round_state}     1 for the round's current state
    tiesfed_upload_progress_bytes{round, client}        bytes held of the client's upload (committed or in progress)
    tiesfed_contribution_committed{round, client}       1 once the client has a committed contribution
    tiesfed_upload_slot_wait_seconds{call, outcome}     waits for an upload slot (call: reserve|stream)
    tiesfed_shard_actor_restarts_total                  shard actors rebuilt after a restart or a lost call
    tiesfed_aggregator_state{tiesfed_aggregator_state}  1 for the aggregator's state: starting, ready, failed
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Mapping, Optional

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, start_http_server

log = logging.getLogger("tiesfed.coordinator")

STATES = ("open", "finalizing", "finalized", "failed")
AGGREGATOR_STATES = ("starting", "ready", "failed")

#: The `reason` label's fixed vocabulary (bounded cardinality, whatever the messages say).
REASONS = ("validation", "shape", "budget", "value_bound", "base", "signature", "late", "closed", "replace",
           "permission", "aborted", "disk", "internal", "other")

# First match wins: (gRPC code or None, substring of the message or None, reason). The
# messages are RoundError's (rounds/validation.py, intake.py, provenance.py, state.py).
_REASON_RULES: tuple[tuple[Optional[str], Optional[str], str], ...] = (
    ("UNAUTHENTICATED", None, "signature"),
    (None, "max_abs_value", "value_bound"),
    (None, "over the budget", "budget"),
    (None, "has shape", "shape"),
    (None, "not in the manifest", "shape"),
    (None, "appears twice", "shape"),
    (None, "ends without", "shape"),
    (None, "computed against base", "base"),
    (None, "deadline passed", "late"),
    (None, "refuses replacements", "replace"),
    ("PERMISSION_DENIED", None, "permission"),
    ("RESOURCE_EXHAUSTED", "free disk", "disk"),
    ("ABORTED", None, "aborted"),
    ("INTERNAL", None, "internal"),
    ("FAILED_PRECONDITION", None, "closed"),  # finalizing, finalized or failed
    ("INVALID_ARGUMENT", None, "validation"),  # malformed stream, bad chunk, header, trim
)


def rejection_reason(code: str, message: str) -> str:
    """The `reason` label of a refused upload, from its RoundError's code and message."""
    for want_code, text, reason in _REASON_RULES:
        if (want_code is None or code == want_code) and (text is None or text in message):
            return reason
    return "other"


class Metrics:
    """The events the round code reports; this base class records nothing (`NO_METRICS`)."""

    def received(self, round_id: str, client_id: str, nbytes: int, held: int) -> None:
        """A chunk of `nbytes` arrived; the client's upload now holds `held` bytes."""

    def accepted(self, round_id: str, client_id: str, nbytes: int) -> None:
        """A contribution of `nbytes` was committed."""

    def rejected(self, round_id: str, client_id: str, reason: str, held: int = 0) -> None:
        """An upload was refused or withdrawn; the client's progress falls back to `held`."""

    def folded(self, params: int, seconds: float) -> None:
        """One fold call took `params` nonzeros into the accumulators in `seconds`."""

    def phase(self, round_id: str, state: str) -> None:
        """The round is now in `state`."""

    def members(self, round_id: str, committed_bytes: Mapping[str, Optional[int]]) -> None:
        """The round's participants: client id -> bytes committed (None: nothing yet)."""

    def slot_wait(self, call: str, seconds: float, granted: bool) -> None:
        """A wait for an upload slot ended (`call`: reserve or stream)."""

    def shards_rebuilt(self, n: int) -> None:
        """`n` shard actors were rebuilt from the replay."""

    def aggregator(self, state: str) -> None:
        """The aggregator (Ray) is now `state`: starting, ready or failed."""


NO_METRICS = Metrics()


class CoordinatorMetrics(Metrics):
    """The metrics of one coordinator, on a registry of its own."""

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.bytes_received = Counter("tiesfed_upload_bytes_received", "Bytes of upload chunks received "
                                      "(committed, in progress or rejected)", registry=r)
        self.contributions_accepted = Counter("tiesfed_contributions_accepted", "Contributions committed "
                                              "(new or replacing one; identical re-uploads not counted)", registry=r)
        self.contributions_rejected = Counter("tiesfed_contributions_rejected", "Uploads refused or withdrawn, "
                                              "by reason", ["reason"], registry=r)
        for reason in REASONS:
            self.contributions_rejected.labels(reason)  # every reason is exported, at 0 until it happens
        self.params_folded = Counter("tiesfed_parameters_folded", "Nonzeros folded into the accumulators "
                                     "(rate() is the fold rate)", registry=r)
        self.fold_seconds = Histogram("tiesfed_fold_seconds", "Seconds of one record's fold call (a sharded "
                                      "aggregator's only enqueues it)", registry=r,
                                      buckets=(1e-5, 1e-4, 1e-3, 0.01, 0.1, 1.0, 10.0))
        self.round_state = Enum("tiesfed_round_state", "The round's state", ["round"], states=list(STATES),
                                registry=r)
        self.upload_progress = Gauge("tiesfed_upload_progress_bytes", "Bytes held of the client's upload: "
                                     "the one in progress, else the committed one", ["round", "client"], registry=r)
        self.committed = Gauge("tiesfed_contribution_committed", "1 once the client's contribution is committed",
                               ["round", "client"], registry=r)
        self.slot_wait_seconds = Histogram("tiesfed_upload_slot_wait_seconds", "Seconds waited for an upload "
                                           "slot", ["call", "outcome"], registry=r,
                                           buckets=(0.001, 0.01, 0.1, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0))
        self.aggregator_state = Enum("tiesfed_aggregator_state", "Whether the coordinator's aggregator (Ray) "
                                     "is up: uploads taken while it starts are folded once it is",
                                     states=list(AGGREGATOR_STATES), registry=r)
        self.actor_restarts = Counter("tiesfed_shard_actor_restarts", "Shard actors rebuilt from the spool "
                                      "after a restart or a lost call", registry=r)

    def received(self, round_id: str, client_id: str, nbytes: int, held: int) -> None:
        self.bytes_received.inc(nbytes)
        self.upload_progress.labels(round_id, client_id).set(held)

    def accepted(self, round_id: str, client_id: str, nbytes: int) -> None:
        self.contributions_accepted.inc()
        self.upload_progress.labels(round_id, client_id).set(nbytes)
        self.committed.labels(round_id, client_id).set(1)

    def rejected(self, round_id: str, client_id: str, reason: str, held: int = 0) -> None:
        self.contributions_rejected.labels(reason if reason in REASONS else "other").inc()
        self.upload_progress.labels(round_id, client_id).set(held)

    def folded(self, params: int, seconds: float) -> None:
        self.params_folded.inc(params)
        self.fold_seconds.observe(seconds)

    def phase(self, round_id: str, state: str) -> None:
        if state in STATES:
            self.round_state.labels(round_id).state(state)

    def members(self, round_id: str, committed_bytes: Mapping[str, Optional[int]]) -> None:
        for cid, nbytes in committed_bytes.items():
            self.upload_progress.labels(round_id, cid).set(nbytes or 0)
            self.committed.labels(round_id, cid).set(0 if nbytes is None else 1)

    def slot_wait(self, call: str, seconds: float, granted: bool) -> None:
        self.slot_wait_seconds.labels(call, "granted" if granted else "timeout").observe(seconds)

    def shards_rebuilt(self, n: int) -> None:
        self.actor_restarts.inc(n)

    def aggregator(self, state: str) -> None:
        if state in AGGREGATOR_STATES:
            self.aggregator_state.state(state)


def timed_fold(agg: Any, metrics: Metrics, name: str, indices: Any, values: Any, weight: float) -> None:
    """`agg.fold(...)` of one record, counted and timed."""
    started = time.perf_counter()
    agg.fold(name, indices, values, weight)
    metrics.folded(int(indices.numel()), time.perf_counter() - started)


class MetricsEndpoint:
    """An HTTP server publishing a registry at /metrics (prometheus_client's, on a thread)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        try:
            self._server, self._thread = start_http_server(port, host, registry=registry)
        except OSError as e:
            raise OSError(f"cannot serve metrics on {host}:{port} (--metrics-host/--metrics-port): "
                          f"{e.strerror or e}") from None
        self.host = host
        self.port: int = self._server.server_port
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and free the port; idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not threading.current_thread():
            self._thread.join(5)
