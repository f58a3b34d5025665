"""Secure aggregation over the real gRPC service (issue 13): a coordinator and clients as
processes over mutual TLS, the secure round against the plain one on the same inputs.

The family's task vectors are multiples of 2^-12, so the round's fixed point (2^-24) holds
them exactly: "after the same quantisation" is the identity here, and the secure merge
equals the plain round's bit for bit. Clients are real `tiesfed client submit` processes,
or (to stop one at a chosen phase and SIGKILL it) a script running the same `SecureFlow`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from tests.helpers import make_model
from tests.test_federated import FAST, assert_identical, load_folder
from tiesfed.client.federated import FederatedError, fetch, submit
from tiesfed.coordinator.rounds import RoundConfig
from tiesfed.coordinator.server import CoordinatorConfig, CoordinatorServer
from tiesfed.protos.v1 import channel_options
from tiesfed.protos.v1 import secagg_pb2 as spb
from tiesfed.protos.v1 import secagg_pb2_grpc as spb_grpc
from tiesfed.protos.v1 import tiesfed_pb2 as pb
from tiesfed.protos.v1 import tiesfed_pb2_grpc as pb_grpc
from tiesfed.trust.identity import Identity, secure_channel
from tiesfed.trust.secagg.messages import KeyAdvert, to_bytes

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = ["org-a", "org-b", "org-c"]
SPEC = {"embed.weight": (64, 16), "layers.0.q.weight": (16, 16), "layers.0.norm.weight": (16,)}
PHASE_S = 4.0  # a phase waits this long for a client that does not come
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
       "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}


def grid(t: torch.Tensor, bits: int = 12) -> torch.Tensor:
    return torch.round(t * 2**bits) / 2**bits


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base and three fine-tunes whose task vectors are exact multiples of 2^-12 (|τ| < 0.1)."""
    root = tmp_path_factory.mktemp("secfam")
    g = torch.Generator().manual_seed(13)
    base = {n: grid(torch.randn(s, generator=g)) for n, s in SPEC.items()}
    shared = {n: torch.randn(s, generator=g) for n, s in SPEC.items()}
    tuned = []
    for i in range(len(CLIENTS)):
        sign = 1.0 if i % 2 == 0 else -1.0
        tuned.append({n: base[n] + grid((0.02 * (shared[n] * sign + torch.randn(SPEC[n], generator=g))).clamp(-0.09, 0.09))
                      for n in SPEC})
    base_dir = make_model(root / "base", base, shards=1, config={"model_type": "toy", "hidden_size": 16})
    return base_dir, [make_model(root / f"ft{i}", t, shards=1) for i, t in enumerate(tuned)]


def secure_config(clients=CLIENTS, threshold=2, round_id="r1") -> RoundConfig:
    return RoundConfig(round_id=round_id, participants=list(clients), secure_aggregation=True,
                       secagg={"bound": 0.125, "threshold": threshold, "phase_s": PHASE_S})


@pytest.fixture
def secure_server(tmp_path, family, pki):
    """An in-process coordinator over mutual TLS (real gRPC) with its rounds (a secure r1, and
    any others given)."""
    started = []

    def start(config: RoundConfig, *more: RoundConfig, base: Path | None = None) -> CoordinatorServer:
        cfg = CoordinatorConfig(listen="127.0.0.1:0", spool_dir=tmp_path / "spool", base_model=str(base or family[0]),
                                tls_dir=pki.server, aggregator="local", rounds=[config, *more])
        srv = CoordinatorServer(cfg).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop(grace=0)


def plain_round(family, tmp_path, models: list[int], clients: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The plain federated round (insecure, in-process) of the same clients and models:
    `clients[j]` submits model `models[j]` (by default client i submits model i)."""
    who = clients or [CLIENTS[m] for m in models]
    cfg = CoordinatorConfig(listen="127.0.0.1:0", spool_dir=tmp_path / f"plain-{time.monotonic_ns()}",
                            base_model=str(family[0]), aggregator="local", insecure=True, rounds=[
                                RoundConfig(round_id="p1", participants=sorted(set(who) | set(CLIENTS)),
                                            quorum=len(models))])
    with CoordinatorServer(cfg) as srv:
        for c, m in zip(who, models):
            submit(srv.target, "p1", c, family[0], family[1][m], retry=FAST, insecure=True)
        r = srv.manager.get("p1")
        if r.state == "open":
            r.close()
        out = tmp_path / f"plain-out-{time.monotonic_ns()}"
        fetch(srv.target, "p1", who[0], family[0], out, timeout=60, retry=FAST, insecure=True)
    return load_folder(out)


def client_process(pki, family, target: str, i: int, stop_after: str = "", client: str = "",
                   gate: bool = False) -> subprocess.Popen:
    """`tiesfed client submit` for client i; with `stop_after` a script that runs the same
    SecureFlow up to that phase, prints it and waits to be killed. `client` submits model i
    under another id; with `gate` the script prints READY once set up and advertises its
    keys only after a line on its stdin (so that several processes advertise together)."""
    client = client or CLIENTS[i]
    if not stop_after:
        cmd = [sys.executable, "-m", "tiesfed.cli", "client", "submit", str(family[0]), str(family[1][i]),
               "--tls", str(pki.client(client)), "--target", target, "--round", "r1"]
    else:
        cmd = [sys.executable, "-c", STOPPING_CLIENT, target, str(pki.client(client)), str(family[0]),
               str(family[1][i]), stop_after, "gate" if gate else ""]
    return subprocess.Popen(cmd, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def submit_threads(pki, family, target: str, clients: list[int], models=None, names=CLIENTS, **kw) -> list:
    """`submit` for each client on a thread of its own (real gRPC and mTLS, in this process);
    each one's result, or the exception it raised. Client i is `names[i]` with model i
    (`models[i]`, by default the family's); `kw` goes to `submit`."""
    models = models or family[1]

    def one(i: int):
        try:
            return submit(target, "r1", None, family[0], models[i], retry=FAST, tls=pki.client(names[i]), **kw)
        except Exception as e:
            return e

    with ThreadPoolExecutor(len(clients)) as pool:
        return list(pool.map(one, clients))


STOPPING_CLIENT = """
import sys, time
from tiesfed.client.connection import Connection, spec_options
from tiesfed.client.secure import SecureFlow, flat_contribution, secagg_round, secure_spec
from tiesfed.core.methods import get_method
from tiesfed.io.model_io import ModelReader
target, tls, base, model, stop_after, gate = sys.argv[1:]
with Connection(target, tls=tls) as conn, ModelReader(base) as b, ModelReader(model) as ft:
    spec = conn.round_spec("r1")
    opts = spec_options(spec)
    me = next(p for p in spec.participants if p.client_id == conn.client_id)
    trim = get_method(opts.method).trim_spec(opts, None)
    idx, val = flat_contribution(spec, b, ft, trim, opts, me.model_key)
    flow = SecureFlow(conn, secagg_round(spec, secure_spec(conn, "r1"), opts), idx, val)
    if gate:
        print("READY", flush=True)
        sys.stdin.readline()
    for phase in ("keys", "shares", "masked", "unmask"):
        getattr(flow, phase)()
        if phase == stop_after:
            print("STOPPED", phase, flush=True)
            time.sleep(600)
"""


def wait_line(p: subprocess.Popen, want: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    line = p.stdout.readline()
    assert want in line, f"{line!r}; stderr: {p.stderr.read() if p.poll() is not None else ''}"
    assert time.monotonic() < end


def finish(p: subprocess.Popen, timeout: float = 90.0) -> tuple[int, str]:
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    return p.returncode, err


def secure_status(target: str, pki, client: str = "org-a") -> spb.SecAggStatus:
    with secure_channel(target, Identity.load(pki.client(client)), options=channel_options()) as ch:
        return spb_grpc.SecureAggregationStub(ch).Status(spb.SecureSpecRequest(round_id="r1"), timeout=10)


def wait_advertised(target: str, pki, client: str, timeout: float = 60.0) -> None:
    """Until `client` (a process, slower to start) has advertised its keys: the key phase's
    clock starts at the first advert, so the in-process clients start after it."""
    end = time.monotonic() + timeout
    while client not in secure_status(target, pki).arrived:
        assert time.monotonic() < end, f"{client} did not advertise its keys"
        time.sleep(0.05)


def fetch_secure(target: str, pki, family, tmp_path) -> dict[str, torch.Tensor]:
    out = tmp_path / f"fetched-{time.monotonic_ns()}"
    fetch(target, "r1", None, family[0], out, timeout=60, retry=FAST, tls=pki.client("org-a"))
    return load_folder(out)


# ----------------------------------------------------------------------------- rounds


def test_secure_round_over_cli_processes_equals_the_plain_round(family, tmp_path, pki):
    """`tiesfed coordinator serve --secure-aggregation` and three `tiesfed client submit`
    processes: the fetched merge equals the plain round's bit for bit."""
    port_file = tmp_path / "port"
    coord = subprocess.Popen(
        [sys.executable, "-m", "tiesfed.cli", "coordinator", "serve", "--tls", str(pki.server), "--spool",
         str(tmp_path / "spool"), "--base", str(family[0]), "--aggregator", "local", "--listen", "127.0.0.1:0",
         "--round", "r1", "--clients", ",".join(CLIENTS), "--secure-aggregation", "--secagg", "threshold=3",
         "--port-file", str(port_file)],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 60
        while not port_file.exists():
            assert coord.poll() is None and time.monotonic() < end, coord.stderr.read() if coord.poll() else "timeout"
            time.sleep(0.1)
        target = f"127.0.0.1:{port_file.read_text().strip()}"
        procs = [client_process(pki, family, target, i) for i in range(3)]
        for p in procs:
            rc, err = finish(p)
            assert rc == 0, err
        got = fetch_secure(target, pki, family, tmp_path)
    finally:
        coord.send_signal(signal.SIGTERM)
        finish(coord, 30)
    want = plain_round(family, tmp_path, [0, 1, 2])
    assert_identical(got, want)
    saved = json.loads((tmp_path / "spool" / "rounds" / "r1" / "round.json").read_text())
    assert saved["secure_aggregation"] and saved["secagg"]["threshold"] == 3  # --secagg reached the round


@pytest.mark.parametrize("stop_after, counted", [("masked", [0, 1, 2]), ("shares", [0, 1])])
def test_a_client_killed_mid_round(family, tmp_path, pki, secure_server, stop_after, counted):
    """org-c is SIGKILLed after its masked upload (the doc: it stays counted, its self mask is
    rebuilt from the others' shares) or after sharing, before uploading (left out): the
    round completes and equals the plain round over the clients it counts."""
    srv = secure_server(secure_config())
    stopping = client_process(pki, family, srv.target, 2, stop_after)
    wait_advertised(srv.target, pki, "org-c")
    with ThreadPoolExecutor(1) as pool:
        results = pool.submit(submit_threads, pki, family, srv.target, [0, 1])
        wait_line(stopping, f"STOPPED {stop_after}")
        stopping.send_signal(signal.SIGKILL)
        stopping.wait()
        assert all(not isinstance(x, Exception) for x in results.result(120)), results.result()
    r = srv.manager.get("r1")
    assert r.wait_closed(60) and r.state == "finalized", r.message
    assert r.message.endswith(", ".join(CLIENTS[i] for i in counted))
    assert_identical(fetch_secure(srv.target, pki, family, tmp_path), plain_round(family, tmp_path, counted))


FIVE = CLIENTS + ["org-d", "org-e"]
FIVE_MODELS = [0, 1, 2, 0, 1]  # org-d and org-e submit models 0 and 1 again


@pytest.fixture(scope="module")
def five(pki):
    """org-d and org-e's identities, issued by the test PKI's CA (org-e if not there yet)."""
    from tiesfed.trust import pki as ca

    for c in FIVE[3:]:
        if not (pki.client(c) / "cert.pem").exists():
            ca.issue(pki.ca, pki.client(c), client_id=c)
    return FIVE


@pytest.mark.parametrize("stop_after, counted", [("masked", [0, 1, 2, 3, 4]), ("shares", [0, 1, 2])])
def test_two_clients_killed_mid_round_of_five(family, tmp_path, pki, five, secure_server, stop_after, counted):
    """Five clients, t = 3: org-d and org-e (processes) are SIGKILLed after their masked
    uploads (both stay counted: the merge is the plain round of all five) or after sharing,
    before uploading (left out: the plain round of the three survivors)."""
    srv = secure_server(secure_config(five, threshold=3))
    stopping = [client_process(pki, family, srv.target, FIVE_MODELS[i], stop_after, client=five[i], gate=True)
                for i in (3, 4)]
    for p in stopping:
        wait_line(p, "READY")
    for p in stopping:  # both advertise at once: the key phase's clock starts at the first advert
        p.stdin.write("go\n")
        p.stdin.flush()
    for c in five[3:]:
        wait_advertised(srv.target, pki, c)
    models = [family[1][m] for m in FIVE_MODELS]
    with ThreadPoolExecutor(1) as pool:
        results = pool.submit(submit_threads, pki, family, srv.target, [0, 1, 2], models, five)
        for p in stopping:
            wait_line(p, f"STOPPED {stop_after}")
            p.send_signal(signal.SIGKILL)
            p.wait()
        assert all(not isinstance(x, Exception) for x in results.result(120)), results.result()
    r = srv.manager.get("r1")
    assert r.wait_closed(60) and r.state == "finalized", r.message
    assert r.message.endswith(", ".join(five[i] for i in counted))
    want = plain_round(family, tmp_path, [FIVE_MODELS[i] for i in counted], [five[i] for i in counted])
    assert_identical(fetch_secure(srv.target, pki, family, tmp_path), want)


def test_a_broken_masked_upload_resumes_where_the_coordinator_stopped(family, tmp_path, pki, secure_server):
    """Each client's masked upload is cut twice mid-stream (the call cancelled, as `submit`'s
    `fault` hook does for a plain upload): it asks MaskedStatus, resumes at the coordinator's
    held offset after checking that prefix's sha256, and the round equals the plain round bit
    for bit (no piece folded twice); the spooled prefixes are gone afterwards."""
    srv = secure_server(secure_config())

    def held(client: str) -> int:
        part = srv.secure.sessions["r1"].partial.get(client)
        return part.size if part is not None else 0

    def cut_for(client: str):
        before = [0]

        def fault(attempt: int, piece: int) -> bool:
            if (attempt, piece) not in ((0, 3), (1, 2)):
                return False
            end = time.monotonic() + 10  # let this stream's pieces so far arrive: the resume moves on
            while held(client) <= before[0] and time.monotonic() < end:
                time.sleep(0.01)
            before[0] = held(client)
            return True
        return fault

    def one(i: int):
        return submit(srv.target, "r1", None, family[0], family[1][i], retry=FAST, tls=pki.client(CLIENTS[i]),
                      chunk_bytes=512, fault=cut_for(CLIENTS[i]))

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(one, range(3)))
    r = srv.manager.get("r1")
    assert r.wait_closed(60) and r.state == "finalized", r.message
    for res in results:
        assert res.attempts == 3 and len(res.resumed_from) == 2, res
        assert 0 < res.resumed_from[0] < res.resumed_from[1] < res.bytes, res.resumed_from
    assert r.message.endswith(", ".join(CLIENTS))
    end = time.monotonic() + 10  # the journal (masked prefixes and uploads) goes right after the publish
    while (r.spool.dir / "secagg").exists() and time.monotonic() < end:
        time.sleep(0.02)
    assert not (r.spool.dir / "secagg").exists()
    assert_identical(fetch_secure(srv.target, pki, family, tmp_path), plain_round(family, tmp_path, [0, 1, 2]))


def flows_for(target: str, pki, family, retry, chunk_bytes: int = 1 << 20) -> tuple[list, list]:
    """One `SecureFlow` per client (client i submits model i), each on its own connection with
    `retry` as its retry policy: driven phase by phase by the test."""
    from tiesfed.client.connection import Connection, spec_options
    from tiesfed.client.secure import SecureFlow, flat_contribution, secagg_round, secure_spec
    from tiesfed.core.methods import get_method
    from tiesfed.io.model_io import ModelReader

    conns, flows = [], []
    for i, c in enumerate(CLIENTS):
        conn = Connection(target, tls=pki.client(c), retry=retry)
        conns.append(conn)
        spec = conn.round_spec("r1")
        opts = spec_options(spec)
        with ModelReader(family[0]) as b, ModelReader(family[1][i]) as ft:
            idx, val = flat_contribution(spec, b, ft, get_method(opts.method).trim_spec(opts, None), opts,
                                         spec.participants[i].model_key)
        flows.append(SecureFlow(conn, secagg_round(spec, secure_spec(conn, "r1"), opts), idx, val, chunk_bytes))
    return conns, flows


def test_masked_upload_refusals_keep_the_held_prefix_or_drop_a_wrong_one(family, tmp_path, pki, secure_server):
    """The coordinator's side of the resume, driven chunk by chunk: a stream that ends short
    keeps its prefix (MaskedStatus reports it and its sha256); a chunk at another offset is
    ABORTED and changes nothing; a whole vector whose sha256 is not the client's is DATA_LOSS
    and its bytes dropped (nothing folded); sent again from 0 it counts, and the round still
    equals the plain round."""
    import hashlib

    from tiesfed.trust.secagg.messages import MaskRequest

    srv = secure_server(secure_config())
    conns, flows = flows_for(srv.target, pki, family, FAST)
    try:
        for f in flows:
            f.keys()
        for f in flows:
            f.shares()
        alice = flows[0]
        data = b"".join(alice.client.masked_stream(alice._poll("shares", MaskRequest), 64))
        total, digest = len(data), hashlib.sha256(data).hexdigest()
        stub = spb_grpc.SecureAggregationStub(conns[0].channel)

        def send(offset: int, body: bytes, sha: str = "") -> None:
            chunks = [spb.MaskedChunk(round_id="r1", offset=offset, total_bytes=total)]
            chunks += [spb.MaskedChunk(round_id="r1", offset=offset + a, data=body[a:a + 700],
                                       sha256=sha if a + 700 >= len(body) else "") for a in range(0, len(body), 700)]
            stub.UploadMasked(iter(chunks), metadata=conns[0].metadata, timeout=30)

        def status() -> spb.MaskedUploadStatus:
            return stub.MaskedStatus(spb.SecureSpecRequest(round_id="r1"), metadata=conns[0].metadata, timeout=10)

        with pytest.raises(grpc.RpcError) as e:
            send(0, data[:1000])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "resume at 1000" in e.value.details()
        st = status()
        assert (st.committed_offset, st.total_bytes, st.committed) == (1000, total, False)
        assert st.prefix_sha256 == hashlib.sha256(data[:1000]).hexdigest()
        with pytest.raises(grpc.RpcError) as e:
            send(500, data[500:])
        assert e.value.code() == grpc.StatusCode.ABORTED and "holds 1000 bytes" in e.value.details()
        assert status().committed_offset == 1000
        with pytest.raises(grpc.RpcError) as e:
            send(1000, data[1000:], sha="0" * 64)
        assert e.value.code() == grpc.StatusCode.DATA_LOSS
        st = status()
        assert (st.committed_offset, st.committed) == (0, False)
        assert srv.secure.sessions["r1"].status()["arrived"] == []
        send(0, data, digest)
        assert status().committed
        for f in flows[1:]:
            f.masked()
        for f in flows:
            f.unmask()
    finally:
        for conn in conns:
            conn.close()
    r = srv.manager.get("r1")
    assert r.wait_closed(60) and r.state == "finalized", r.message
    assert_identical(fetch_secure(srv.target, pki, family, tmp_path), plain_round(family, tmp_path, [0, 1, 2]))


def test_fewer_than_t_survivors_fail_the_round_with_a_clear_status(family, tmp_path, pki, secure_server):
    srv = secure_server(secure_config(threshold=3))
    stopping = client_process(pki, family, srv.target, 2, "shares")
    wait_advertised(srv.target, pki, "org-c")
    with ThreadPoolExecutor(1) as pool:
        results = pool.submit(submit_threads, pki, family, srv.target, [0, 1])
        wait_line(stopping, "STOPPED shares")
        stopping.send_signal(signal.SIGKILL)
        stopping.wait()
        for x in results.result(120):
            assert isinstance(x, FederatedError) and "fewer than the threshold t = 3" in str(x), x
    r = srv.manager.get("r1")
    assert r.wait_closed(10) and r.state == "failed"
    assert "only 2 client(s) uploaded masked vectors, fewer than the threshold t = 3" in r.message
    assert "missing: org-c" in r.message
    st = secure_status(srv.target, pki)
    assert st.phase == "failed" and "fewer than the threshold" in st.message
    assert not r.spool.merged_path.exists()
    with secure_channel(srv.target, Identity.load(pki.client("org-a")), options=channel_options()) as ch:
        status = pb_grpc.CoordinatorStub(ch).GetRoundStatus(pb.GetRoundStatusRequest(round_id="r1"), timeout=10)
    assert status.state == pb.ROUND_STATE_FAILED and "fewer than the threshold t = 3" in status.message


def test_a_message_naming_another_client_is_refused(family, pki, secure_server):
    """org-a's certificate, a KeyAdvert (or a share upload) naming org-b: PERMISSION_DENIED,
    and the round has taken nothing; a plain upload to the secure round is refused too."""
    srv = secure_server(secure_config())
    bob = Identity.load(pki.client("org-b"))
    forged = KeyAdvert("org-b", b"c" * 32, b"s" * 32, b"h" * 32, bob.cert_pem, b"x" * 64)
    with secure_channel(srv.target, Identity.load(pki.client("org-a")), options=channel_options()) as ch:
        stub = spb_grpc.SecureAggregationStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Step(spb.SecAggStep(round_id="r1", phase="keys", payload=to_bytes(forged)), timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "naming 'org-b' sent by 'org-a'" in e.value.details()
        # org-a's own id but org-b's certificate inside: refused as well
        forged = KeyAdvert("org-a", b"c" * 32, b"s" * 32, b"h" * 32, bob.cert_pem, b"x" * 64)
        with pytest.raises(grpc.RpcError) as e:
            stub.Step(spb.SecAggStep(round_id="r1", phase="keys", payload=to_bytes(forged)), timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        st = stub.Status(spb.SecureSpecRequest(round_id="r1"), timeout=10)
        assert st.phase == "keys" and list(st.arrived) == [] and list(st.waiting_for) == CLIENTS
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.CoordinatorStub(ch).ReserveUpload(pb.ReserveUploadRequest(round_id="r1"), timeout=10)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "secure-aggregation round" in e.value.details()


def test_secure_round_is_within_the_stated_tolerance_of_the_plain_round(tmp_path, pki, secure_server):
    """Task vectors off the fixed-point grid: each value moves by at most 2^-25 (f = 24), so
    the merge stays within 2^-25 of the plain round, plus float32 rounding of θ₀ + τ."""
    from tests.helpers import write_family

    _, _, base_dir, paths = write_family(tmp_path / "fam", 3, seed=5, spec=SPEC, base_shards=1)
    fam = (base_dir, paths)
    srv = secure_server(secure_config(), base=base_dir)
    results = submit_threads(pki, fam, srv.target, [0, 1, 2])
    assert all(not isinstance(x, Exception) for x in results), results
    r = srv.manager.get("r1")
    assert r.wait_closed(60) and r.state == "finalized", r.message
    got, want = fetch_secure(srv.target, pki, fam, tmp_path), plain_round(fam, tmp_path, [0, 1, 2])
    worst = 0.0
    for n, w in want.items():
        diff = (got[n].double() - w.double()).abs()
        ulp = torch.finfo(torch.float32).eps * w.double().abs()
        assert bool((diff <= 2.0**-25 + ulp).all()), n
        worst = max(worst, float(diff.max()))
    assert worst > 0  # off the grid, the quantisation shows


def test_a_restarted_coordinator_keeps_the_open_phase_and_acks_an_identical_retry(family, tmp_path, pki,
                                                                                  secure_server):
    """The protocol's inputs are journalled: after a restart the round is still open, in the key
    phase, with org-a's advert in; the same advert sent again is acknowledged (its first ack may
    have been lost), a different one from org-a is ALREADY_EXISTS, and nothing else changed.
    (`test_secagg_restart` kills a coordinator process at three points of a whole round.)"""
    from tiesfed.trust.secagg import SecAggClient
    from tiesfed.trust.secagg.params import from_public_json

    srv = secure_server(secure_config())
    alice = Identity.load(pki.client("org-a"))
    with secure_channel(srv.target, alice, options=channel_options()) as ch:
        stub = spb_grpc.SecureAggregationStub(ch)
        spec = stub.GetSecureSpec(spb.SecureSpecRequest(round_id="r1"), timeout=10)
        r = srv.manager.get("r1")
        rnd = from_public_json("r1", spec.params_json, r.spec, {c: 1.0 for c in CLIENTS})
        advert = to_bytes(SecAggClient(alice, rnd, torch.tensor([0, 5]), torch.tensor([0.01, -0.02])).advertise())
        stub.Step(spb.SecAggStep(round_id="r1", phase="keys", payload=advert), timeout=10)
        assert list(stub.Status(spb.SecureSpecRequest(round_id="r1"), timeout=10).arrived) == ["org-a"]
    srv.stop(grace=0)
    again = secure_server(secure_config())
    r = again.manager.get("r1")
    assert r.state == "open", r.message
    with secure_channel(again.target, alice, options=channel_options()) as ch:
        stub = spb_grpc.SecureAggregationStub(ch)
        st = stub.Status(spb.SecureSpecRequest(round_id="r1"), timeout=10)
        assert (st.phase, list(st.arrived)) == ("keys", ["org-a"])
        assert stub.Step(spb.SecAggStep(round_id="r1", phase="keys", payload=advert), timeout=10).phase == "keys"
        other = to_bytes(SecAggClient(alice, rnd, torch.tensor([1]), torch.tensor([0.01])).advertise())
        with pytest.raises(grpc.RpcError) as e:
            stub.Step(spb.SecAggStep(round_id="r1", phase="keys", payload=other), timeout=10)
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS and "different keys message" in e.value.details()
        st = stub.Status(spb.SecureSpecRequest(round_id="r1"), timeout=10)
        assert (st.phase, list(st.arrived)) == ("keys", ["org-a"])
    journal = r.spool.dir / "secagg" / "keys"
    assert [p.name for p in journal.iterdir()] == ["org-a.msg"] and (journal / "org-a.msg").read_bytes() == advert


def test_a_damaged_journal_fails_the_round_on_restart_naming_the_file(family, tmp_path, pki, secure_server):
    """A closed phase's record naming a client whose message is not on disk: the restarted
    coordinator cannot rebuild the session, so the round fails (nothing is unmasked) and says why."""
    import json

    srv = secure_server(secure_config())
    r = srv.manager.get("r1")
    journal = r.spool.dir / "secagg"
    srv.stop(grace=0)
    (journal / "keys").mkdir(parents=True)
    (journal / "keys" / "org-a.msg").write_bytes(b"TSAG junk")
    (journal / "closed-keys.json").write_text(json.dumps({"arrived": ["org-a", "org-b"]}))
    again = secure_server(secure_config())
    r = again.manager.get("r1")
    assert r.wait_closed(30)  # the journal is replayed on a thread: the server listens meanwhile
    assert r.state == "failed" and "journal cannot be replayed" in r.message, r.message
    assert "org-a.msg" in r.message or "org-b" in r.message, r.message
