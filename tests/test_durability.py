"""Damage and disk faults: a coordinator's spool after truncated, bit-flipped or deleted
files, failed writes, a second coordinator, an admin abort.

Real gRPC on loopback, real files; each coordinator is stopped by the `coordinator`
fixture. Wherever a merge results it is compared bit for bit with the local engine's.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from tests.test_federated import (  # noqa: F401
    FAST,
    assert_identical,
    contribution_bytes,
    coordinator,
    family,
    fetch_model,
    local_model,
    open_round,
    raw_upload,
    send,
)
from tiesfed.client.federated import FederatedError
from tiesfed.coordinator.rounds import finalize as finalize_mod
from tiesfed.coordinator.spool import SpoolLockedError
from tiesfed.io.files import DamagedFileError, read_json, sha256_file, write_atomic, write_json_atomic
from tiesfed.protos.v1 import ADMIN_TOKEN_KEY, CLIENT_ID_KEY, channel_options
from tiesfed.protos.v1 import tiesfed_pb2 as pb
from tiesfed.protos.v1 import tiesfed_pb2_grpc as pb_grpc

ADMIN = ((ADMIN_TOKEN_KEY, "s3cret"),)


# ----------------------------------------------------------------------------- helpers


def stub_call(srv, method: str, request, client: str = "org-a", metadata=None, timeout: float = 30):
    with grpc.insecure_channel(srv.target, options=channel_options()) as ch:
        md = metadata if metadata is not None else ((CLIENT_ID_KEY, client),)
        return getattr(pb_grpc.CoordinatorStub(ch), method)(request, metadata=md, timeout=timeout)


def status(srv, round_id: str = "r1", client: str = "org-a") -> pb.RoundStatus:
    return stub_call(srv, "GetRoundStatus", pb.GetRoundStatusRequest(round_id=round_id), client)


def watch_until(srv, kind: str, client: str, round_id: str = "r1", timeout: float = 10) -> list[pb.RoundEvent]:
    """Watch the round from the start until an event of `kind` about `client` arrives."""
    seen = []
    with grpc.insecure_channel(srv.target, options=channel_options()) as ch:
        call = pb_grpc.CoordinatorStub(ch).Watch(pb.WatchRequest(round_id=round_id),
                                                 metadata=((CLIENT_ID_KEY, client),), timeout=timeout)
        for ev in call:
            seen.append(ev)
            if pb.EventKind.Name(ev.kind) == kind and ev.client_id == client:
                call.cancel()
                break
    return seen


def flip_bit(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def snapshot_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def full_round(srv, family, round_id: str = "r1", **kw):
    rnd = open_round(srv, round_id=round_id, **kw)
    for i, c in enumerate(("org-a", "org-b", "org-c")):
        send(srv, round_id, c, family, i)
    assert rnd.wait_closed(60) and rnd.state == "finalized", rnd.message
    return rnd


# ----------------------------------------------------------------------------- 1. state files


def test_state_files_are_atomic_and_damage_is_named(tmp_path, family, coordinator):
    # a failed write leaves the old file whole and no temporary behind
    f = tmp_path / "state.json"
    write_json_atomic(f, {"state": "open"})

    def half_then_full_disk(tmp: Path) -> None:
        tmp.write_text('{"state": "fin')
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomic(f, half_then_full_disk)
    assert read_json(f, "state file") == {"state": "open"}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    # reading names the file and what is wrong
    for content, problem in ((b'{"state": "fin', "truncated or corrupted"), (b"", "is empty"),
                             (b"[1, 2]", "expected an object"), (b"\xff\xfe", "not UTF-8")):
        f.write_bytes(content)
        with pytest.raises(DamagedFileError, match=problem) as ei:
            read_json(f, "state file")
        assert str(f) in str(ei.value) and ei.value.path == f
    with pytest.raises(DamagedFileError, match="is missing"):
        read_json(tmp_path / "nope.json", "round file")
    # a whole round leaves only complete JSON files and no temporaries in the spool
    srv = coordinator()
    rnd = full_round(srv, family)
    files = [p for p in rnd.spool.dir.rglob("*") if p.is_file()]
    assert not [p for p in files if ".tmp" in p.name or p.suffix == ".part"]
    states = {p.name: read_json(p, "spool file") for p in files if p.suffix == ".json"}
    assert states["state.json"]["state"] == "finalized" and states["org-b.json"]["sha256"]
    assert states["state.json"]["merged_sha256"] == sha256_file(rnd.spool.merged_path)


# ----------------------------------------------------------------------------- 2. damaged round and state files


def test_damaged_round_and_state_files_do_not_stop_a_restart(tmp_path, family, coordinator, caplog):
    spool = tmp_path / "durable"
    srv = coordinator(spool=spool)
    good = full_round(srv, family, "good")
    want = local_model(family, tmp_path, [0, 1, 2])
    open_round(srv, round_id="state-cut")
    send(srv, "state-cut", "org-a", family, 0)
    open_round(srv, round_id="config-cut")
    open_round(srv, round_id="neg-shape")
    srv.stop(grace=0)
    rounds = spool / "rounds"
    truncate(rounds / "state-cut" / "state.json")
    truncate(rounds / "config-cut" / "round.json")
    cfg = json.loads((rounds / "neg-shape" / "round.json").read_text())
    cfg["manifest"][0]["shape"] = [-4] + cfg["manifest"][0]["shape"][1:]
    (rounds / "neg-shape" / "round.json").write_text(json.dumps(cfg))
    before = {r: snapshot_files(rounds / r) for r in ("state-cut", "config-cut", "neg-shape")}

    with caplog.at_level(logging.ERROR, logger="tiesfed.coordinator"):
        srv2 = coordinator(spool=spool)
    errors = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    for name in ("state-cut/state.json", "config-cut/round.json", "neg-shape/round.json"):
        assert str(rounds / name) in errors, name
    # the intact round recovered and serves the same merge
    assert srv2.manager.get("good").state == "finalized"
    assert_identical(fetch_model(srv2, family, tmp_path, "good"), want)
    assert srv2.manager.get("good").merged.sha256 == good.merged.sha256
    # a damaged state file: the round is failed, with a message naming the file
    st = status(srv2, "state-cut")
    assert st.state == pb.ROUND_STATE_FAILED and str(rounds / "state-cut" / "state.json") in st.message
    assert "not valid JSON" in st.message and list(st.committed_clients) == ["org-a"]
    # a round file that cannot be read or is invalid: left out, and asking for it says why
    for rid, problem in (("config-cut", "not valid JSON"), ("neg-shape", "-4")):
        with pytest.raises(grpc.RpcError) as ei:
            status(srv2, rid)
        assert ei.value.code() == grpc.StatusCode.DATA_LOSS
        assert str(rounds / rid / "round.json") in ei.value.details() and problem in ei.value.details()
    # nothing of the damaged rounds was touched or deleted
    assert {r: snapshot_files(rounds / r) for r in before} == before
    # and the coordinator works: a new round merges as the local engine does
    full_round(srv2, family, "after")
    assert_identical(fetch_model(srv2, family, tmp_path, "after"), want)


def test_open_round_with_a_negative_shape_never_stops_a_restart(tmp_path, family, coordinator):
    spool = tmp_path / "durable"
    srv = coordinator(spool=spool, admin_token="s3cret")
    full_round(srv, family)
    req = pb.OpenRoundRequest(round_id="neg", participants=[pb.Participant(client_id="org-a")],
                              base_fingerprint=family[2], manifest=[pb.TensorSpec(name="w", shape=[-3, 4])])
    try:
        stub_call(srv, "OpenRound", req, metadata=ADMIN)
    except grpc.RpcError as e:  # refused up front (the validators may catch it): fine too
        assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
    srv.stop(grace=0)
    srv2 = coordinator(spool=spool, admin_token="s3cret")  # must start, whatever the spool holds of "neg"
    assert "neg" not in srv2.manager.rounds
    assert_identical(fetch_model(srv2, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


# ----------------------------------------------------------------------------- 3. lost contributions


@pytest.mark.parametrize("damage", ["bit-flip", "deleted", "truncated", "pointer"])
def test_lost_contribution_is_reported_and_uploaded_again(tmp_path, family, coordinator, damage):
    spool = tmp_path / "durable"
    srv = coordinator(spool=spool)
    rnd = open_round(srv)
    send(srv, "r1", "org-a", family, 0)
    send(srv, "r1", "org-b", family, 1)
    lost = rnd.committed["org-b"]
    srv.stop(grace=0)
    if damage == "bit-flip":
        flip_bit(lost.path)
    elif damage == "deleted":
        lost.path.unlink()
    elif damage == "truncated":
        truncate(lost.path)
    else:
        truncate(rnd.spool.contrib_dir / "org-b.json")

    srv2 = coordinator(spool=spool)
    rnd2 = srv2.manager.get("r1")
    assert sorted(rnd2.committed) == ["org-a"] and rnd2.state == "open"
    st = status(srv2, "r1", "org-b")
    assert list(st.committed_clients) == ["org-a"]
    assert "'org-b'" in st.message and "must upload it again" in st.message
    events = watch_until(srv2, "UPLOAD_REJECTED", "org-b")
    assert "lost" in events[-1].message and "must upload it again" in events[-1].message
    # kept for inspection, out of the round
    assert list(rnd2.spool.damaged_dir.iterdir()) and not (rnd2.spool.contrib_dir / "org-b.json").exists()
    # the others cannot finalize it short: everyone is expected (quorum 3)
    send(srv2, "r1", "org-c", family, 2)
    assert rnd2.state == "open" and "'org-b'" in status(srv2).message
    # org-b's client submits again and the round completes as the honest merge
    res = send(srv2, "r1", "org-b", family, 1)
    assert res.sha256 == lost.sha256 and not res.duplicate
    assert rnd2.wait_closed(60) and rnd2.state == "finalized"
    assert "lost" not in status(srv2).message
    assert_identical(fetch_model(srv2, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


def test_lost_contribution_withdraws_an_interrupted_finalization(tmp_path, family, coordinator):
    """Killed while finalizing with everyone in, restarted with one contribution damaged:
    the round does not finalize with the others; it waits for the lost one."""
    spool = tmp_path / "durable"
    srv = coordinator(spool=spool)
    rnd = full_round(srv, family, quorum=2)
    srv.stop(grace=0)
    state = read_json(rnd.spool.state_file, "state file")
    write_json_atomic(rnd.spool.state_file, {**state, "state": "finalizing"})  # as a kill mid-finalize leaves it
    flip_bit(rnd.committed["org-c"].path)

    srv2 = coordinator(spool=spool)
    rnd2 = srv2.manager.get("r1")
    assert rnd2.state == "open" and not rnd2.close_requested and sorted(rnd2.committed) == ["org-a", "org-b"]
    assert "'org-c'" in status(srv2).message and not rnd2.spool.merged_path.exists()
    send(srv2, "r1", "org-c", family, 2)
    assert rnd2.wait_closed(60) and rnd2.state == "finalized"
    assert_identical(fetch_model(srv2, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


def test_round_finalized_without_a_lost_contribution_says_so(tmp_path, family, coordinator):
    """When the rules (quorum, an admin close) do finalize without the lost client, the
    status and the final event say whose contribution is missing."""
    spool = tmp_path / "durable"
    srv = coordinator(spool=spool, admin_token="s3cret")
    rnd = open_round(srv, quorum=2)
    send(srv, "r1", "org-a", family, 0)
    send(srv, "r1", "org-b", family, 1)
    srv.stop(grace=0)
    rnd.committed["org-b"].path.unlink()
    srv2 = coordinator(spool=spool, admin_token="s3cret")
    send(srv2, "r1", "org-c", family, 2)
    st = stub_call(srv2, "CloseRound", pb.CloseRoundRequest(round_id="r1"), metadata=ADMIN, timeout=60)
    assert st.state == pb.ROUND_STATE_FINALIZED and list(st.committed_clients) == ["org-a", "org-c"]
    assert "without 'org-b'" in st.message and "lost" in st.message
    final = srv2.manager.get("r1").events[-1]
    assert final.kind == "ROUND_FINALIZED" and "without 'org-b'" in final.message
    assert_identical(fetch_model(srv2, family, tmp_path), local_model(family, tmp_path, [0, 2]))
    srv2.stop(grace=0)
    srv3 = coordinator(spool=spool, admin_token="s3cret")  # the notice survives a restart
    assert "without 'org-b'" in status(srv3).message


# ----------------------------------------------------------------------------- 4. failed finalization


def fail_model_writes(monkeypatch, times: int) -> list[bool]:
    """The model write fails with ENOSPC `times` times, each after leaving a partial shard;
    records, per call, whether a partial shard from an earlier call was still there."""
    import tiesfed.io.materialize as materialize

    real = materialize.apply_merged
    leftovers: list[bool] = []

    def flaky(base, merged_path, out_dir, **kw):
        leftovers.append((Path(out_dir) / "partial.safetensors").exists())
        if len(leftovers) <= times:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "partial.safetensors").write_bytes(b"half a shard")
            raise OSError(errno.ENOSPC, "No space left on device", str(out_dir))
        return real(base, merged_path, out_dir, **kw)

    monkeypatch.setattr(materialize, "apply_merged", flaky)
    monkeypatch.setattr(finalize_mod, "FINALIZE_BACKOFF_S", 0.05)
    return leftovers


def test_failed_finalization_is_retried_from_a_clean_slate(tmp_path, family, coordinator, monkeypatch):
    leftovers = fail_model_writes(monkeypatch, times=1)
    srv = coordinator()
    rnd = full_round(srv, family)
    assert leftovers == [False, False]  # the second attempt found no partial output
    retry = [e for e in rnd.events if e.kind == "ROUND_FINALIZING" and "retrying" in e.message]
    assert len(retry) == 1 and "No space left" in retry[0].message
    assert not (rnd.spool.model_dir / "partial.safetensors").exists()
    want = local_model(family, tmp_path, [0, 1, 2])
    assert_identical(fetch_model(srv, family, tmp_path), want)
    from tests.test_federated import load_folder

    assert_identical(load_folder(rnd.spool.model_dir), want)


def test_merged_stream_write_failure_is_retried(tmp_path, family, coordinator, monkeypatch):
    calls = []
    real = finalize_mod.StreamWriter

    class FullDisk(real):
        def write(self, t):
            if not calls:
                calls.append(t.name)
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(t)

    monkeypatch.setattr(finalize_mod, "StreamWriter", FullDisk)
    monkeypatch.setattr(finalize_mod, "FINALIZE_BACKOFF_S", 0.05)
    srv = coordinator()
    rnd = full_round(srv, family)
    assert calls and not list(rnd.spool.dir.glob(".merged.tfs.*"))
    assert sha256_file(rnd.spool.merged_path) == rnd.merged.sha256
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


def test_finalization_that_keeps_failing_is_finalized_again_on_restart(tmp_path, family, coordinator, monkeypatch):
    spool = tmp_path / "durable"
    leftovers = fail_model_writes(monkeypatch, times=10**6)
    srv = coordinator(spool=spool, admin_token="s3cret")
    rounds = []
    for rid in ("r1", "r2"):
        rnd = open_round(srv, round_id=rid)
        for i, c in enumerate(("org-a", "org-b", "org-c")):
            send(srv, rid, c, family, i)
        assert rnd.wait_closed(60) and rnd.state == "failed"
        rounds.append(rnd)
    r1, r2 = rounds
    assert len(leftovers) == 2 * finalize_mod.FINALIZE_ATTEMPTS and not any(leftovers)
    st = status(srv, "r1")
    assert st.state == pb.ROUND_STATE_FAILED and "No space left" in st.message and "restart" in st.message
    # no partial output is left; every contribution is
    assert not r1.spool.model_dir.exists() and not r1.spool.merged_path.exists()
    assert not list(r1.spool.dir.glob(".merged.tfs.*"))
    committed = {c: x.sha256 for c, x in r1.committed.items()}
    assert all(sha256_file(x.path) == x.sha256 for x in r1.committed.values()) and len(committed) == 3
    with pytest.raises(FederatedError, match="failed"):
        fetch_model(srv, family, tmp_path)
    # an admin may abort such a round: then a restart leaves it failed
    stub_call(srv, "CloseRound", pb.CloseRoundRequest(round_id="r2", abort=True), metadata=ADMIN)
    assert "aborted by the admin after: finalization failed" in r2.message
    srv.stop(grace=0)
    monkeypatch.undo()  # the disk has room again

    srv2 = coordinator(spool=spool, admin_token="s3cret")
    rnd = srv2.manager.get("r1")
    assert rnd.wait_closed(60) and rnd.state == "finalized", rnd.message
    assert {c: x.sha256 for c, x in rnd.committed.items()} == committed and rnd.message == ""
    want = local_model(family, tmp_path, [0, 1, 2])
    assert_identical(fetch_model(srv2, family, tmp_path), want)
    assert srv2.manager.get("r2").state == "failed" and not srv2.manager.get("r2").spool.merged_path.exists()


# ----------------------------------------------------------------------------- 5. damaged merged stream


@pytest.mark.parametrize("when", ["while-serving", "while-down"])
@pytest.mark.parametrize("damage", ["bit-flip", "truncated", "deleted"])
def test_damaged_merged_stream_is_rebuilt(tmp_path, family, coordinator, damage, when):
    spool = tmp_path / "durable"
    srv = coordinator(spool=spool)
    rnd = full_round(srv, family)
    want = local_model(family, tmp_path, [0, 1, 2])
    assert_identical(fetch_model(srv, family, tmp_path), want)
    sha, size = rnd.merged.sha256, rnd.merged.bytes
    if when == "while-down":
        srv.stop(grace=0)
    path = rnd.spool.merged_path
    {"bit-flip": flip_bit, "truncated": truncate, "deleted": Path.unlink}[damage](path)
    if when == "while-down":
        srv = coordinator(spool=spool)
        rnd = srv.manager.get("r1")
        assert rnd.wait_closed(60)
    got = fetch_model(srv, family, tmp_path, client="org-b")
    assert rnd.state == "finalized" and (rnd.merged.sha256, rnd.merged.bytes) == (sha, size)
    assert sha256_file(path) == sha
    assert_identical(got, want)
    rebuilt = [e for e in rnd.events if e.kind in ("ROUND_FINALIZING", "ROUND_OPENED") and "damaged" in e.message]
    assert rebuilt, [e.message for e in rnd.events]


# ----------------------------------------------------------------------------- 6. one coordinator per spool


def test_second_coordinator_on_the_same_spool_is_refused(tmp_path, family, coordinator, pki):
    spool = tmp_path / "durable"
    srv = coordinator(spool=spool)
    rnd = open_round(srv)
    data = contribution_bytes(family, 0)
    assert not raw_upload(srv, "r1", "org-a", data[: len(data) // 2], chunk=1024).committed
    partial = rnd.spool.partial_path("org-a")
    held = partial.read_bytes()
    lock = read_json(spool / "coordinator.lock", "lock file")
    assert lock["pid"] == os.getpid() and lock["host"] == socket.gethostname()
    everything = snapshot_files(spool)  # partial upload, state files, admin token, lock

    with pytest.raises(SpoolLockedError) as ei:  # in this process: a second server object
        coordinator(spool=spool)
    msg = str(ei.value)
    assert str(spool) in msg and f"pid {os.getpid()}" in msg and socket.gethostname() in msg
    # from another process, through the CLI: a clear error at once, nothing deleted
    res = subprocess.run(
        [sys.executable, "-m", "tiesfed.cli", "coordinator", "serve", "--spool", str(spool),
         "--listen", "127.0.0.1:0", "--aggregator", "local", "--tls", str(pki.server)],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode != 0 and "in use by another coordinator" in res.stderr
    assert f"pid {os.getpid()}" in res.stderr and str(spool) in res.stderr
    assert snapshot_files(spool) == everything and partial.read_bytes() == held
    # the first coordinator goes on: the upload resumes where it was
    assert raw_upload(srv, "r1", "org-a", data[len(held):], offset=len(held)).committed
    send(srv, "r1", "org-b", family, 1)
    send(srv, "r1", "org-c", family, 2)
    want = local_model(family, tmp_path, [0, 1, 2])
    assert_identical(fetch_model(srv, family, tmp_path), want)
    srv.stop(grace=0)  # releases the spool
    srv2 = coordinator(spool=spool)
    assert_identical(fetch_model(srv2, family, tmp_path), want)


# ----------------------------------------------------------------------------- 7. abort


def test_abort_keeps_committed_contributions(tmp_path, family, coordinator):
    spool = tmp_path / "durable"
    srv = coordinator(spool=spool, admin_token="s3cret")
    rnd = open_round(srv)
    receipts = {c: send(srv, "r1", c, family, i).sha256 for i, c in enumerate(("org-a", "org-b"))}
    data = contribution_bytes(family, 2)
    raw_upload(srv, "r1", "org-c", data[:2000], chunk=1000)  # an upload in progress
    st = stub_call(srv, "CloseRound", pb.CloseRoundRequest(round_id="r1", abort=True), metadata=ADMIN)
    assert st.state == pb.ROUND_STATE_FAILED and list(st.committed_clients) == ["org-a", "org-b"]
    assert "aborted by the admin" in st.message and "kept" in st.message and "org-a, org-b" in st.message
    kept = snapshot_files(rnd.spool.contrib_dir)
    assert sorted(kept) == sorted([f"{c}.json" for c in receipts] + [rnd.committed[c].path.name for c in receipts])
    for c, sha in receipts.items():
        assert read_json(rnd.spool.contrib_dir / f"{c}.json", "pointer")["sha256"] == sha
        assert sha256_file(rnd.committed[c].path) == sha
    assert not list(rnd.spool.partial_dir.iterdir())  # the upload in progress was withdrawn
    with pytest.raises(FederatedError, match="failed"):
        send(srv, "r1", "org-c", family, 2)
    with pytest.raises(grpc.RpcError) as ei:  # aborting twice says so
        stub_call(srv, "CloseRound", pb.CloseRoundRequest(round_id="r1", abort=True), metadata=ADMIN)
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    srv.stop(grace=0)
    srv2 = coordinator(spool=spool, admin_token="s3cret")  # the audit trail survives a restart
    st = status(srv2)
    assert st.state == pb.ROUND_STATE_FAILED and list(st.committed_clients) == ["org-a", "org-b"]
    assert "aborted by the admin" in st.message
    assert snapshot_files(srv2.manager.get("r1").spool.contrib_dir) == kept


def test_abort_while_finalizing_is_refused(tmp_path, family, coordinator, monkeypatch):
    import tiesfed.io.materialize as materialize

    real = materialize.apply_merged
    started, go = threading.Event(), threading.Event()

    def slow(*a, **kw):
        started.set()
        assert go.wait(30)
        return real(*a, **kw)

    monkeypatch.setattr(materialize, "apply_merged", slow)
    srv = coordinator(admin_token="s3cret")
    rnd = open_round(srv)
    for i, c in enumerate(("org-a", "org-b", "org-c")):
        send(srv, "r1", c, family, i)
    try:
        assert started.wait(30) and rnd.state == "finalizing"
        with pytest.raises(grpc.RpcError) as ei:
            stub_call(srv, "CloseRound", pb.CloseRoundRequest(round_id="r1", abort=True), metadata=ADMIN)
        assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "too late" in ei.value.details()
    finally:
        go.set()
    assert rnd.wait_closed(60) and rnd.state == "finalized"
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))


def test_a_damaged_pointer_quarantines_only_that_clients_files(family, coordinator):  # noqa: F811
    """Client ids may extend each other ("org", "org-a"): taking one client's damaged
    contribution aside must not touch the other's files."""
    srv = coordinator()
    rnd = open_round(srv, clients=["org", "org-a", "org-b"])
    send(srv, "r1", "org", family, 0)
    send(srv, "r1", "org-a", family, 1)
    theirs = rnd.committed["org-a"].path
    moved = rnd.spool.quarantine("org", None)  # as recovery does when org's pointer is unreadable
    assert moved and not any("org-a" in p.name for p in moved)
    assert theirs.is_file() and sha256_file(theirs) == rnd.committed["org-a"].sha256
    assert set(rnd.spool.committed()) == {"org-a"}
