"""The faster federated path (issue 11): a coordinator that listens before its aggregator
is up, uploads spooled meanwhile and folded once it is, and the client's pipelined
producer. Behaviour, not timing: every result is compared bit for bit with the local
engine, every stream byte for byte with the one the local engine spools.

The aggregator's start is gated by an Event (in-process, no Ray); the real Ray start in
the background is exercised by tests/test_ray_coordinator.py and deploy/local/run.sh.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Optional

import grpc
import pytest

from tests.test_federated import (  # noqa: F401  (coordinator, family: the fixtures)
    CLIENTS,
    FAST,
    assert_identical,
    coordinator,
    family,
    fetch_model,
    load_folder,
    local_model,
    open_round,
)
from tiesfed.client.federated import FederatedError, submit
from tiesfed.coordinator.aggregator import Aggregator
from tiesfed.coordinator.server import CoordinatorConfig, CoordinatorServer
from tiesfed.protos.codec.stream import Record, StreamReader
from tiesfed.protos.v1 import CLIENT_ID_KEY, channel_options
from tiesfed.protos.v1 import tiesfed_pb2 as pb
from tiesfed.protos.v1 import tiesfed_pb2_grpc as pb_grpc


class GatedFactory:
    """An aggregator factory whose background start waits for `gate` (then succeeds, or
    fails with `error`); the aggregators it builds are the in-process ones."""

    what = "gated test aggregator"

    def __init__(self, error: Optional[BaseException] = None, build_s: float = 0.0) -> None:
        self.gate = threading.Event()
        self.error = error
        self.build_s = build_s  # how long building one takes (shard actors starting)
        self.built = 0
        self.thread: Optional[threading.Thread] = None

    def start_background(self, done: Callable[[Optional[BaseException]], None]) -> None:
        def run() -> None:
            self.gate.wait(120)
            done(self.error)

        self.thread = threading.Thread(target=run, name="gated-start", daemon=True)
        self.thread.start()

    def __call__(self, manifest, spec):
        self.built += 1
        time.sleep(self.build_s)
        return Aggregator(manifest, spec)


def status(target: str, client: str = "org-a", round_id: str = "r1") -> pb.RoundStatus:
    with grpc.insecure_channel(target, options=channel_options()) as ch:
        return pb_grpc.CoordinatorStub(ch).GetRoundStatus(pb.GetRoundStatusRequest(round_id=round_id),
                                                         metadata=((CLIENT_ID_KEY, client),), timeout=10)


def wait_until(cond: Callable[[], bool], timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def gated_server(family, tmp_path: Path, factory: GatedFactory, **kw) -> CoordinatorServer:
    """A coordinator whose round r1 (from its config, as `serve` opens it) waits for the gated start."""
    cfg = CoordinatorConfig(listen="127.0.0.1:0", spool_dir=tmp_path / "spool", base_model=str(family[0]),
                            insecure=True, rounds=[{"round_id": "r1", "participants": CLIENTS}], **kw)
    return CoordinatorServer(cfg, aggregator_factory=factory).start()


# ----------------------------------------------------------------------------- the coordinator listens at once


def test_status_answers_before_the_aggregator_is_up(family, tmp_path):
    factory = GatedFactory()
    srv = gated_server(family, tmp_path, factory, metrics_port=0)
    try:
        st = status(srv.target)
        assert st.state == pb.ROUND_STATE_OPEN
        assert "aggregator (gated test aggregator) is starting" in st.message, st.message
        assert "spooled" in st.message
        assert srv.manager.get("r1").agg_pending and factory.built == 0
        import urllib.request
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_endpoint.port}/metrics").read().decode()
        assert 'tiesfed_aggregator_state{tiesfed_aggregator_state="starting"} 1.0' in metrics

        factory.gate.set()
        assert srv.wait_ready(30)
        wait_until(lambda: not srv.manager.get("r1").agg_pending)
        assert status(srv.target).message == "" and factory.built == 1
    finally:
        factory.gate.set()
        srv.stop(grace=0)


@pytest.mark.parametrize("buffer", [1 << 30, 0, 3000])  # every record kept decoded, none, some
def test_uploads_taken_while_the_aggregator_starts_are_folded_once_it_is(family, tmp_path, buffer):
    """Two uploads committed and a third half received before the aggregator is up: the round
    folds them once it is (records kept decoded as they are, the others read back from the
    spool), and merges bit-identically to the engine."""
    factory = GatedFactory()
    srv = gated_server(family, tmp_path, factory, pending_buffer_bytes=buffer)
    try:
        rnd = srv.manager.get("r1")
        for i, c in enumerate(CLIENTS[:2]):
            res = submit(srv.target, "r1", c, family[0], family[1][i], retry=FAST, insecure=True)
            assert not res.duplicate
        assert sorted(rnd.committed) == CLIENTS[:2] and rnd.agg is None and rnd.agg_pending
        with rnd.lock:
            kept = [t for recs in rnd.held.values() for *_, t in recs if t is not None]
            assert sorted(rnd.held) == CLIENTS[:2] and 0 <= rnd.held_bytes <= buffer
            assert rnd.held_bytes == sum(t.indices.nbytes + t.values.nbytes for t in kept)
            assert bool(kept) == (buffer > 0)

        mid, go = threading.Event(), threading.Event()

        def fault(attempt: int, i: int) -> bool:
            if attempt == 0 and i == 6:
                mid.set()
                assert go.wait(60)
            return False

        third: dict = {}
        t = threading.Thread(target=lambda: third.setdefault("r", submit(
            srv.target, "r1", CLIENTS[2], family[0], family[1][2], retry=FAST, insecure=True, chunk_bytes=512,
            fault=fault)))
        t.start()
        assert mid.wait(60)
        wait_until(lambda: CLIENTS[2] in rnd.sessions and rnd.sessions[CLIENTS[2]].offset == 6 * 512)
        s = rnd.sessions[CLIENTS[2]]
        # The offset moves before the chunk's records are taken: wait for every record the
        # partial file completes (parsed here from the file itself) to be noted.
        received = [(ev.tensor.name, ev.offset, ev.length)
                    for ev in StreamReader(rnd.limits).feed(s.path.read_bytes()) if isinstance(ev, Record)]
        wait_until(lambda: [(n, o, ln) for n, o, ln, _ in list(s.pending)] == received)
        with rnd.lock:
            pending = list(s.pending)
            assert pending and not s.folded, "records received while starting are noted, not folded"

        factory.gate.set()  # the aggregator comes up mid-upload
        wait_until(lambda: not rnd.agg_pending)
        with rnd.lock:
            assert s.folded == [(n, o, ln) for n, o, ln, _ in pending] and not s.pending and factory.built == 1
            assert not rnd.held and rnd.held_bytes == 0
        go.set()
        t.join(60)
        assert "r" in third and not third["r"].duplicate
        assert rnd.wait_closed(60) and rnd.state == "finalized", rnd.message
        want = local_model(family, tmp_path, [0, 1, 2])
        assert_identical(fetch_model(srv, family, tmp_path), want)
        assert_identical(load_folder(rnd.spool.model_dir), want)
    finally:
        factory.gate.set()
        srv.stop(grace=0)


def test_a_round_with_everyone_in_waits_for_the_aggregator(family, tmp_path):
    """The finalizer waits for the aggregator; it and the starter both attach it, one build only
    (two at once could each hold half the cluster's CPUs, waiting for the other half)."""
    factory = GatedFactory(build_s=0.5)
    srv = gated_server(family, tmp_path, factory)
    try:
        rnd = srv.manager.get("r1")
        for i, c in enumerate(CLIENTS):
            submit(srv.target, "r1", c, family[0], family[1][i], retry=FAST, insecure=True)
        time.sleep(0.5)
        assert rnd.state == "finalizing" and rnd.merged is None and factory.built == 0
        factory.gate.set()
        assert rnd.wait_closed(60) and rnd.state == "finalized", rnd.message
        assert factory.built == 1
        assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))
    finally:
        factory.gate.set()
        srv.stop(grace=0)


def test_a_restart_while_the_aggregator_starts_recovers_the_spool(family, tmp_path):
    """Committed while pending, then the coordinator stops: the next one (its aggregator also
    slow) recovers them from the spool and folds them once up."""
    first = GatedFactory()
    srv = gated_server(family, tmp_path, first)
    try:
        for i, c in enumerate(CLIENTS[:2]):
            submit(srv.target, "r1", c, family[0], family[1][i], retry=FAST, insecure=True)
    finally:
        first.gate.set()
        srv.stop(grace=0)
    second = GatedFactory()
    srv = gated_server(family, tmp_path, second)
    try:
        rnd = srv.manager.get("r1")
        assert sorted(rnd.committed) == CLIENTS[:2] and rnd.agg_pending
        second.gate.set()
        submit(srv.target, "r1", CLIENTS[2], family[0], family[1][2], retry=FAST, insecure=True)
        assert rnd.wait_closed(60) and rnd.state == "finalized", rnd.message
        assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))
    finally:
        second.gate.set()
        srv.stop(grace=0)


def test_an_aggregator_that_fails_to_start_is_said_and_refuses_uploads(family, tmp_path):
    factory = GatedFactory(error=RuntimeError("no Ray here: the GCS did not start"))
    srv = gated_server(family, tmp_path, factory, metrics_port=0)
    try:
        factory.gate.set()
        with pytest.raises(Exception, match="no Ray here"):
            srv.wait_ready(30)
        st = status(srv.target)
        assert "failed to start: RuntimeError: no Ray here: the GCS did not start" in st.message, st.message
        assert "takes no uploads until it is restarted" in st.message
        with pytest.raises(FederatedError, match="UNAVAILABLE.*failed to start.*no Ray here"):
            submit(srv.target, "r1", "org-a", family[0], family[1][0], insecure=True,
                   retry=type(FAST)(attempts=1, backoff_s=0.01, max_backoff_s=0.01))
        rnd = srv.manager.get("r1")
        assert not rnd.committed and not rnd.sessions and rnd.state == "open"
        import urllib.request
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_endpoint.port}/metrics").read().decode()
        assert 'tiesfed_aggregator_state{tiesfed_aggregator_state="failed"} 1.0' in metrics
    finally:
        srv.stop(grace=0)


def test_a_round_opened_while_the_aggregator_starts_waits_for_it(family, tmp_path):
    factory = GatedFactory()
    srv = gated_server(family, tmp_path, factory)
    try:
        opened: dict = {}
        t = threading.Thread(target=lambda: opened.setdefault("r", open_round(srv, "r2")))
        t.start()
        time.sleep(0.3)
        assert "r" not in opened
        factory.gate.set()
        t.join(30)
        assert opened["r"].agg is not None and not opened["r"].agg_pending
    finally:
        factory.gate.set()
        srv.stop(grace=0)


# ----------------------------------------------------------------------------- the client's pipeline


@pytest.mark.parametrize("options,chunk", [({}, 1 << 20), ({}, 300), ({"trim": "tensor", "value_dtype": "float16"}, 4096),
                                           ({"method": "dare_ties", "k": 50}, 1000)])
def test_the_pipelined_client_sends_the_stream_one_thread_writes(family, coordinator, options, chunk):
    """The bytes committed at the coordinator are, byte for byte, the stream `write_contribution`
    makes of `iter_contribution` in one thread (the local engine's trim), whatever the chunking."""
    import io

    from tiesfed.client.contribution import (
        VALUE_DTYPES,
        contribution_header,
        contribution_threshold,
        iter_contribution,
        write_contribution,
    )
    from tiesfed.core.methods import get_method
    from tiesfed.core.options import MergeOptions
    from tiesfed.io.model_io import ModelReader

    def one_thread(i: int, client: str) -> bytes:
        trim = get_method(opts.method).trim_spec(opts)
        dtype = VALUE_DTYPES[opts.value_dtype] if opts.value_dtype else None
        with ModelReader(family[0]) as b, ModelReader(family[1][i]) as ft:
            threshold = contribution_threshold(b, ft, trim)
            header = contribution_header(family[2], str(i), trim, threshold=threshold, round_id="r1",
                                         client_id=client)
            buf = io.BytesIO()
            write_contribution(buf, header, iter_contribution(b, ft, trim, model_key=str(i), value_dtype=dtype,
                                                              threshold=threshold))
        return buf.getvalue()

    srv = coordinator()
    opts = MergeOptions(**options)
    rnd = open_round(srv, options=opts)
    for i, c in enumerate(CLIENTS):
        res = submit(srv.target, "r1", c, family[0], family[1][i], retry=FAST, insecure=True, chunk_bytes=chunk)
        want = one_thread(i, c)
        got = rnd.committed[c].path.read_bytes()
        assert got == want, f"{c}: {len(got)} bytes sent, {len(want)} expected"
        assert res.bytes == len(want) and res.bytes_sent == len(want)


def test_a_trim_error_mid_model_stops_the_upload_uncommitted(family, coordinator, tmp_path, monkeypatch):
    """NaN in the last tensor, found by the trim thread after earlier tensors were encoded and
    sent: the error is raised by submit as it is, nothing is committed, and the same client's
    honest upload then merges bit-identically."""
    import tiesfed.client.submit as submit_module

    sent_some = threading.Event()
    real = submit_module.iter_contribution

    def held_after_the_first(*a, **kw):  # the rest of the model is trimmed once chunks went out
        it = real(*a, **kw)
        yield next(it)
        assert sent_some.wait(30)
        yield from it

    def fault(attempt: int, i: int) -> bool:
        if i == 3:
            sent_some.set()
        return False
    from tests.helpers import make_model
    from tiesfed.core.options import MergeOptions
    from tiesfed.io.model_io import ModelReader

    with ModelReader(family[1][0]) as r:
        tensors = {n: r.get(n).clone() for n in r.names}
    last = [n for n, t in tensors.items() if t.is_floating_point()][-1]
    tensors[last].view(-1)[3] = float("nan")
    bad = make_model(tmp_path / "nan-model", tensors)

    srv = coordinator()
    opts = MergeOptions(trim="tensor")  # per tensor: NaN is found in the trim pass, mid-model
    rnd = open_round(srv, options=opts)
    monkeypatch.setattr(submit_module, "iter_contribution", held_after_the_first)
    monkeypatch.setattr(submit_module._SpoolPipe, "FLUSH", 64)  # a toy model's records are sendable at once
    with pytest.raises(ValueError, match=f"tensor '{last}' .* non-finite values"):
        submit(srv.target, "r1", "org-a", family[0], bad, retry=FAST, insecure=True, chunk_bytes=256, fault=fault)
    monkeypatch.undo()
    with rnd.lock:
        assert "org-a" not in rnd.committed
        s = rnd.sessions.get("org-a")
        assert s is not None and s.offset >= 3 * 256, "earlier tensors were sent before the error"
        assert not s.ended
    for i, c in enumerate(CLIENTS):
        submit(srv.target, "r1", c, family[0], family[1][i], retry=FAST, insecure=True)
    assert rnd.wait_closed(60) and rnd.state == "finalized", rnd.message
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2], options=opts))


def test_prefetch_bounds_the_producer_and_stops_it():
    from tiesfed.client.pipeline import Prefetch

    made: list[int] = []
    closed = threading.Event()

    def source():
        try:
            for i in range(1000):
                made.append(i)
                yield i
        finally:
            closed.set()

    with Prefetch(source, 2, "test-prefetch") as items:
        assert next(items) == 0
        time.sleep(0.3)
        assert len(made) <= 4, "the producer ran ahead of its bound"  # queue 2 + one handed + one in hand
    assert closed.wait(5) and len(made) <= 5

    def failing():
        yield 1
        raise KeyError("boom")

    with Prefetch(failing, 1, "test-prefetch") as items:
        assert next(items) == 1
        with pytest.raises(KeyError, match="boom"):
            next(items)
        with pytest.raises(StopIteration):
            next(items)


def test_read_ahead_receives_while_the_taker_works_in_order():
    """The coordinator's upload read-ahead: at most `depth` chunks ahead, then the stream's
    own end or error, in order; `stop` lets a reader blocked on a full queue go."""
    from tiesfed.coordinator.streams import ReadAhead

    pulled: list[int] = []

    def stream():
        for i in range(5):
            pulled.append(i)
            yield i
        raise ConnectionError("client gone")

    ahead = ReadAhead(stream(), 2, "test-read-ahead")
    wait_until(lambda: len(pulled) >= 3)
    time.sleep(0.2)
    assert len(pulled) == 3, "read more than depth + the one in hand ahead"
    assert [next(ahead) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(ConnectionError, match="client gone"):
        next(ahead)
    assert next(ahead, None) is None

    endless = ReadAhead(iter(range(10**9)), 1, "test-read-ahead-stop")
    assert next(endless) == 0
    endless.stop()
    assert next(endless, None) is None


def test_download_digests_as_it_writes_a_stale_partial_is_fetched_again(family, coordinator, tmp_path):
    """The fetch's sha256 is taken as the file grows (and over the prefix a resume keeps): a partial
    file whose bytes are not the merge's fails it and is downloaded again from zero."""
    from tiesfed.client.federated import Connection, download

    srv = coordinator()
    rnd = open_round(srv)
    for i, c in enumerate(CLIENTS):
        submit(srv.target, "r1", c, family[0], family[1][i], retry=FAST, insecure=True)
    assert rnd.wait_closed(60) and rnd.state == "finalized"
    merged = rnd.merged.path.read_bytes()
    part = tmp_path / "merged.part"
    with Connection(srv.target, "org-b", FAST, insecure=True) as conn:
        part.write_bytes(merged[:777])
        got, attempts = download(conn, "r1", part, rnd.merged.sha256, rnd.merged.bytes)
        assert (got, attempts) == (len(merged) - 777, 1) and part.read_bytes() == merged
        part.write_bytes(b"\0" * 777)  # stale: not the merge's first bytes
        got, attempts = download(conn, "r1", part, rnd.merged.sha256, rnd.merged.bytes)
        assert (got, attempts) == (len(merged) - 777 + len(merged), 2) and part.read_bytes() == merged


def test_a_contribution_replaced_while_the_aggregator_starts_folds_the_new_one(family, tmp_path):
    factory = GatedFactory()
    srv = gated_server(family, tmp_path, factory)
    try:
        rnd = srv.manager.get("r1")
        submit(srv.target, "r1", "org-a", family[0], family[1][0], retry=FAST, insecure=True)
        with rnd.lock:
            first = rnd.held_bytes
            assert first > 0 and "org-a" in rnd.held
        res = submit(srv.target, "r1", "org-a", family[0], family[1][3], retry=FAST, insecure=True)
        assert res.replaced
        with rnd.lock:  # the first one's records are let go; the replacement is read from the spool
            assert "org-a" not in rnd.held and rnd.held_bytes == 0
        for i, c in enumerate(CLIENTS[1:], 1):
            submit(srv.target, "r1", c, family[0], family[1][i], retry=FAST, insecure=True)
        factory.gate.set()
        assert rnd.wait_closed(60) and rnd.state == "finalized", rnd.message
        assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [3, 1, 2]))
    finally:
        factory.gate.set()
        srv.stop(grace=0)


def test_a_ray_start_that_fails_is_tried_again_then_reported(monkeypatch):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("Ray is up in this process already")
    from tiesfed.coordinator import ray_factory

    calls: list[int] = []

    def overloaded(address=None, log_to_driver=True):
        calls.append(1)
        raise RuntimeError("The current node timed out during startup")

    monkeypatch.setattr(ray_factory, "init_ray", overloaded)
    monkeypatch.setattr(ray_factory, "START_BACKOFF_S", 0.0)
    got: list = []
    ended = threading.Event()
    factory = ray_factory.RayAggregatorFactory()
    factory.start_background(lambda e: (got.append(e), ended.set()))
    assert ended.wait(30)
    assert len(calls) == ray_factory.START_ATTEMPTS
    assert isinstance(got[0], RuntimeError) and "timed out during startup" in str(got[0])
    factory.close()
    assert not ray.is_initialized()


def test_a_round_whose_aggregator_cannot_be_built_says_so_and_keeps_what_it_holds(family, tmp_path):
    class Broken(GatedFactory):
        def __call__(self, manifest, spec):
            self.built += 1
            raise RuntimeError("no shard actor fits this cluster")

    factory = Broken()
    srv = gated_server(family, tmp_path, factory)
    try:
        rnd = srv.manager.get("r1")
        submit(srv.target, "r1", "org-a", family[0], family[1][0], retry=FAST, insecure=True)
        factory.gate.set()
        wait_until(lambda: rnd.agg_error != "")
        assert rnd.agg_pending and rnd.agg is None and "org-a" in rnd.held  # nothing half-folded, nothing lost
        st = status(srv.target)
        assert "could not be built: RuntimeError: no shard actor fits this cluster" in st.message, st.message
        with pytest.raises(FederatedError, match="UNAVAILABLE.*could not be built"):
            submit(srv.target, "r1", "org-b", family[0], family[1][1], insecure=True,
                   retry=type(FAST)(attempts=1, backoff_s=0.01, max_backoff_s=0.01))
    finally:
        factory.gate.set()
        srv.stop(grace=0)
