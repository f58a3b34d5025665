"""An authenticated participant attacking a running coordinator's secure-aggregation service
(issue 13): hostile calls in every phase are refused with a status naming the problem, never
INTERNAL/UNKNOWN, never hang, and leave the session exactly as it was (phase, arrivals,
messages taken, masked prefixes, journal files); afterwards the honest clients complete the
round and it equals the plain round bit for bit.

The attacker is org-a itself, before it sends each phase's honest message (or org-c, after it
sent its own: replays). Real gRPC over mutual TLS, as in test_secagg_round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import threading
import time
import zlib

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_federated import FAST, assert_identical
from tests.test_secagg_round import (  # noqa: F401
    CLIENTS,
    family,
    fetch_secure,
    flows_for,
    plain_round,
    secure_config,
    secure_server,
)
from tiesfed.coordinator.rounds import RoundConfig
from tiesfed.core.secagg.shamir import ShamirError, share_from_bytes
from tiesfed.protos.v1 import channel_options
from tiesfed.protos.v1 import secagg_pb2 as spb
from tiesfed.protos.v1 import secagg_pb2_grpc as spb_grpc
from tiesfed.trust.identity import Identity, secure_channel
from tiesfed.trust.secagg import SecAggClient, SecAggError
from tiesfed.trust.secagg.messages import (
    MAGIC,
    VERSION,
    KeyAdvert,
    KeyList,
    MaskRequest,
    ShareUpload,
    UnmaskReply,
    UnmaskRequest,
    from_bytes,
    to_bytes,
)

REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.ABORTED, grpc.StatusCode.NOT_FOUND}


def snapshot(srv) -> tuple:
    """Everything a refused call must leave as it was: the session's state and its journal's files."""
    s = srv.secure.sessions["r1"]
    with s.cond:
        state = (s.phase, tuple(s.arrived), s.failed, dict(s.taken), sorted(s.folded),
                 {c: (p.size, p.sha.hexdigest()) for c, p in s.partial.items()}, sorted(s.outbox))
    files = {str(p.relative_to(s.journal.dir)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(s.journal.dir.rglob("*")) if p.is_file()} if s.journal.dir.exists() else {}
    return state, files


class Attacker:
    """Raw calls on a participant's authenticated channel; each must be refused."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.stub = spb_grpc.SecureAggregationStub(conn.channel)

    def refused(self, name: str, request, *, codes=REFUSALS, says: str = "") -> grpc.RpcError:
        call = getattr(self.stub, name)
        with pytest.raises(grpc.RpcError) as e:
            out = call(request, metadata=self.conn.metadata, timeout=20)
            if name == "PollStream":
                list(out)
        err = e.value
        assert err.code() in codes, (name, err.code(), err.details())
        assert says in (err.details() or ""), err.details()
        return err

    def step(self, phase: str, payload: bytes, **kw) -> grpc.RpcError:
        return self.refused("Step", spb.SecAggStep(round_id="r1", phase=phase, payload=payload), **kw)

    def stream(self, *chunks: spb.StepChunk, **kw) -> grpc.RpcError:
        return self.refused("StepStream", iter(chunks), **kw)

    def upload(self, *chunks: spb.MaskedChunk, **kw) -> grpc.RpcError:
        return self.refused("UploadMasked", iter(chunks), **kw)


def frame(header: object, blob: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<4sBI", MAGIC, VERSION, len(h)) + h + blob


def common_hostile(a: Attacker, phase: str) -> None:
    """Calls that are wrong in any phase: unknown or insecure round, non-step phases, junk frames."""
    a.refused("Status", spb.SecureSpecRequest(round_id="nope"), codes={grpc.StatusCode.NOT_FOUND})
    a.refused("Step", spb.SecAggStep(round_id="plain", phase="keys", payload=b"x"),
              codes={grpc.StatusCode.FAILED_PRECONDITION}, says="not a secure-aggregation round")
    a.refused("MaskedStatus", spb.SecureSpecRequest(round_id="plain"), codes={grpc.StatusCode.FAILED_PRECONDITION})
    a.step("masked", b"x", codes={grpc.StatusCode.INVALID_ARGUMENT}, says="takes no step message")
    a.step("", b"x", codes={grpc.StatusCode.INVALID_ARGUMENT})
    a.refused("Poll", spb.SecAggPoll(round_id="r1", phase="unmask"), codes={grpc.StatusCode.INVALID_ARGUMENT})
    a.refused("PollStream", spb.SecAggPoll(round_id="r1", phase="done"), codes={grpc.StatusCode.INVALID_ARGUMENT})
    for junk in (b"", b"TSAG", frame([]), frame({"$t": []}), frame({"$t": "KeyAdvert", "client_id": {"$b": 7}}),
                 frame({"$t": "KeyAdvert", "client_id": {"$b": [0, -1]}}),
                 frame({"$t": "KeyAdvert", "client_id": {"$b": "ab"}}), frame({"$t": {"$t": 1}}),
                 struct.pack("<4sBI", MAGIC, VERSION, 3) + b"\xff\xfe\xfd",
                 struct.pack("<4sBI", MAGIC, VERSION, 40000) + b"[" * 40000):
        a.step(phase, junk, codes={grpc.StatusCode.INVALID_ARGUMENT})
    a.stream(codes={grpc.StatusCode.INVALID_ARGUMENT}, says="empty step stream")
    a.stream(spb.StepChunk(round_id="r1", phase=phase, total_bytes=1 << 62), codes={grpc.StatusCode.INVALID_ARGUMENT})
    a.stream(spb.StepChunk(round_id="r1", phase=phase, total_bytes=4, data=b"TSAG"),
             spb.StepChunk(round_id="r2", data=b""), codes={grpc.StatusCode.INVALID_ARGUMENT})
    a.stream(spb.StepChunk(round_id="r1", phase=phase, total_bytes=3, data=b"TSAG"),
             codes={grpc.StatusCode.INVALID_ARGUMENT}, says="more than the 3 bytes")
    a.upload(codes={grpc.StatusCode.INVALID_ARGUMENT}, says="empty masked upload")


@st.composite
def mutations(draw, good: bytes) -> bytes:
    """A hostile variant of an honest message: truncated, extended, bit-flipped, spliced, or a
    random header over its blobs."""
    kind = draw(st.sampled_from(["truncate", "extend", "flip", "splice", "header"]))
    if kind == "truncate":
        return good[:draw(st.integers(0, len(good) - 1))]
    if kind == "extend":
        return good + draw(st.binary(min_size=1, max_size=64))
    if kind == "flip":
        at = draw(st.integers(0, len(good) - 1))
        return good[:at] + bytes([good[at] ^ (1 << draw(st.integers(0, 7)))]) + good[at + 1:]
    if kind == "splice":
        at = draw(st.integers(0, len(good)))
        return good[:at] + draw(st.binary(max_size=64)) + good[at + draw(st.integers(1, 64)):]
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-2, 1 << 20), st.text(max_size=8),
                     st.builds(lambda a, b: {"$b": [a, b]}, st.integers(-5, 2000), st.integers(-5, 2000)))
    node = st.recursive(leaf, lambda c: st.one_of(st.lists(c, max_size=4),
                                                   st.dictionaries(st.sampled_from(
                                                       ["$t", "$b", "client_id", "c_pk", "s_pk", "cert_pem",
                                                        "signature", "support", "boxes", "seed_shares",
                                                        "key_shares", "org-b"]), c, max_size=6)), max_leaves=12)
    header = draw(st.one_of(node, st.fixed_dictionaries({"$t": st.sampled_from(
        ["KeyAdvert", "ShareUpload", "UnmaskReply", "KeyList", "MaskedUpload"])}, optional={
        k: node for k in ("client_id", "c_pk", "s_pk", "cert_pem", "signature", "support", "boxes",
                          "seed_shares", "key_shares")})))
    return frame(header, good[-256:])


def fuzz(srv, a: Attacker, phase: str, good: bytes, examples: int) -> None:
    """Hostile variants of `good` (org-a's honest message of `phase`): each is refused and
    changes nothing. A variant that decodes to the honest message itself is skipped."""
    honest = from_bytes(good)
    honest_der = (x509.load_pem_x509_certificate(honest.cert_pem).public_bytes(Encoding.DER)
                  if isinstance(honest, KeyAdvert) else b"")

    def same_certificate(pem: bytes) -> bool:
        try:
            return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER) == honest_der
        except Exception:  # noqa: BLE001 (any unparsable certificate: ValueError, InvalidVersion...)
            return False

    def opaque_change(msg) -> bool:
        """Whether `msg` differs from the honest message only inside bytes the coordinator cannot
        check (a sealed box, a share's value) or only in how it is spelt (a PEM whose flipped bit
        falls in base64's unused padding bits is the same certificate): a participant may send
        any such message of its own."""
        if isinstance(msg, KeyAdvert) and isinstance(honest, KeyAdvert):
            return dataclasses.replace(msg, cert_pem=honest.cert_pem) == honest and same_certificate(msg.cert_pem)
        if isinstance(msg, ShareUpload) and isinstance(honest, ShareUpload):
            return (msg.client_id, msg.support) == (honest.client_id, honest.support) and \
                {k: len(v) for k, v in msg.boxes.items()} == {k: len(v) for k, v in honest.boxes.items()}
        if isinstance(msg, UnmaskReply) and isinstance(honest, UnmaskReply):
            def shape(m):
                return m.client_id, sorted(m.seed_shares), sorted(m.key_shares)
            try:
                for v in (*msg.seed_shares.values(), *msg.key_shares.values()):
                    share_from_bytes(v)
            except ShamirError:
                return False
            return shape(msg) == shape(honest)
        return False

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mutations(good))
    def one(payload: bytes) -> None:
        try:
            msg = from_bytes(payload)
            same = msg == honest or opaque_change(msg)
        except SecAggError:
            same = False
        if same:
            return
        before = snapshot(srv)
        a.step(phase, payload)
        assert snapshot(srv) == before

    one()


def fuzz_calls(srv, a: Attacker, examples: int) -> None:
    """The read-only and stream calls with arbitrary round ids, phases, waits and chunk sizes:
    a status naming the problem (or a plain answer for r1), never a crash, nothing changed."""

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["Status", "MaskedStatus", "GetSecureSpec", "Poll", "PollStream", "StepStream",
                            "UploadMasked"]),
           st.one_of(st.just("r1"), st.just("plain"), st.text(max_size=300)),
           st.one_of(st.sampled_from(["keys", "shares", "masked", "unmask", "done"]), st.text(max_size=20)),
           st.one_of(st.just(float("nan")), st.floats(-1e9, 0.5)),  # waits short: the keys phase has not closed
           st.integers(0, (1 << 32) - 1), st.integers(0, (1 << 64) - 1), st.binary(max_size=64))
    def one(name, rid, phase, wait, chunk, size, data) -> None:
        before = snapshot(srv)
        req = {"Status": lambda: spb.SecureSpecRequest(round_id=rid),
               "MaskedStatus": lambda: spb.SecureSpecRequest(round_id=rid),
               "GetSecureSpec": lambda: spb.SecureSpecRequest(round_id=rid),
               "Poll": lambda: spb.SecAggPoll(round_id=rid, phase=phase, wait_seconds=wait, max_chunk_bytes=chunk),
               "PollStream": lambda: spb.SecAggPoll(round_id=rid, phase=phase, wait_seconds=wait,
                                                    max_chunk_bytes=chunk),
               "StepStream": lambda: iter([spb.StepChunk(round_id=rid, phase=phase, total_bytes=size, data=data)]),
               "UploadMasked": lambda: iter([spb.MaskedChunk(round_id=rid, offset=size, total_bytes=size,
                                                             data=data)])}[name]()
        try:
            out = getattr(a.stub, name)(req, metadata=a.conn.metadata, timeout=20)
            if name == "PollStream":
                out = list(out)
        except grpc.RpcError as e:
            assert e.code() in REFUSALS, (name, e.code(), e.details())
        else:
            assert rid == "r1" or (name == "GetSecureSpec" and rid == "plain"), (name, rid, out)
        assert snapshot(srv) == before

    one()


def poll(flow, phase: str, kind):
    return flow._poll(phase, kind)


def test_hostile_calls_in_every_phase_are_refused_and_the_round_still_equals_the_plain_one(
        family, tmp_path, pki, secure_server):  # noqa: F811
    srv = secure_server(secure_config(), RoundConfig(round_id="plain", participants=CLIENTS))
    conns, flows = flows_for(srv.target, pki, family, FAST)
    a, c = Attacker(conns[0]), Attacker(conns[2])
    alice, carol = flows[0], flows[2]
    try:
        # ---------------------------------------------------------------- keys
        good = to_bytes(alice.client.advertise())
        before = snapshot(srv)
        common_hostile(a, "keys")
        fuzz_calls(srv, a, 40)
        with secure_channel(srv.target, Identity.load(pki.client("org-d")), options=channel_options()) as ch:
            outsider = spb_grpc.SecureAggregationStub(ch)  # a valid certificate of the CA, not of this round
            for name, req in (("Status", spb.SecureSpecRequest(round_id="r1")),
                              ("Step", spb.SecAggStep(round_id="r1", phase="keys", payload=good)),
                              ("Poll", spb.SecAggPoll(round_id="r1", phase="keys"))):
                with pytest.raises(grpc.RpcError) as e:
                    getattr(outsider, name)(req, timeout=20)
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, e.value.details()
        fuzz(srv, a, "keys", good, 60)
        adv = from_bytes(good)
        bob = Identity.load(pki.client("org-b"))
        dave = Identity.load(pki.client("org-d"))
        for forged, code in (
                (KeyAdvert("org-a", adv.c_pk, adv.s_pk, adv.seed_commit, dave.cert_pem, adv.signature),
                 grpc.StatusCode.PERMISSION_DENIED),
                (KeyAdvert("org-a", adv.c_pk, adv.s_pk, adv.seed_commit, b"-----BEGIN CERTIFICATE-----\nAAAA\n", adv.signature),
                 grpc.StatusCode.PERMISSION_DENIED),
                (KeyAdvert("org-a", adv.c_pk, adv.s_pk, adv.seed_commit, b"x" * 60000, adv.signature),
                 grpc.StatusCode.PERMISSION_DENIED),
                (KeyAdvert("org-a", adv.c_pk, adv.s_pk, adv.seed_commit, adv.cert_pem, adv.signature[:-1] + b"\0"),
                 grpc.StatusCode.INVALID_ARGUMENT),
                (KeyAdvert("org-a", adv.c_pk[:31], adv.s_pk, adv.seed_commit, adv.cert_pem, adv.signature),
                 grpc.StatusCode.INVALID_ARGUMENT),
                (KeyAdvert("org-a", adv.s_pk, adv.c_pk, adv.seed_commit, adv.cert_pem, adv.signature),
                 grpc.StatusCode.INVALID_ARGUMENT),
                (KeyAdvert("org-a", adv.c_pk, adv.s_pk, bytes(32), adv.cert_pem, adv.signature),
                 grpc.StatusCode.INVALID_ARGUMENT),
                (KeyAdvert("org-b", adv.c_pk, adv.s_pk, adv.seed_commit, bob.cert_pem, adv.signature),
                 grpc.StatusCode.PERMISSION_DENIED)):
            a.step("keys", to_bytes(forged), codes={code})
        a.step("shares", to_bytes(ShareUpload("org-a", b"", {})), codes={grpc.StatusCode.FAILED_PRECONDITION})
        assert not stub_poll(a, "keys", float("nan")).ready and not stub_poll(a, "keys", -5).ready
        a.upload(spb.MaskedChunk(round_id="r1", total_bytes=8, data=b"x" * 8), codes={grpc.StatusCode.FAILED_PRECONDITION})
        assert snapshot(srv) == before
        for f in flows[1:]:
            f.keys()
        c.step("keys", good, codes={grpc.StatusCode.PERMISSION_DENIED})  # org-a's advert replayed by org-c
        other = to_bytes(SecAggClient(conns[2].identity, carol.round, torch.tensor([3]), torch.tensor([0.01])).advertise())  # org-c's second advert
        c.step("keys", other, codes={grpc.StatusCode.ALREADY_EXISTS}, says="already sent a different keys")
        assert snapshot(srv)[0][1] == ("org-b", "org-c")
        alice._step("keys", good)

        # ---------------------------------------------------------------- shares
        keys = poll(alice, "keys", KeyList)
        good = to_bytes(alice.client.share(keys))
        up = from_bytes(good)
        before = snapshot(srv)
        fuzz(srv, a, "shares", good, 40)
        box = up.boxes["org-b"]
        raw = (srv.secure.sessions["r1"].params.numel + 7) // 8
        bomb = zlib.compress(b"\xff" * (64 << 20), 9)  # a 64 MiB bitmap in ~64 KiB
        for hostile, code in (
                (ShareUpload("org-a", up.support, {"org-b": box}), grpc.StatusCode.INVALID_ARGUMENT),
                (ShareUpload("org-a", up.support, {**up.boxes, "org-a": box}), grpc.StatusCode.INVALID_ARGUMENT),
                (ShareUpload("org-a", up.support, {**up.boxes, "org-d": box}), grpc.StatusCode.INVALID_ARGUMENT),
                (ShareUpload("org-a", up.support, {"org-b": box[:20], "org-c": up.boxes["org-c"]}),
                 grpc.StatusCode.INVALID_ARGUMENT),
                (ShareUpload("org-a", up.support, {"org-b": box * 300, "org-c": up.boxes["org-c"]}),
                 grpc.StatusCode.INVALID_ARGUMENT),
                (ShareUpload("org-a", b"", up.boxes), grpc.StatusCode.INVALID_ARGUMENT),
                (ShareUpload("org-a", up.support[:-3], up.boxes), grpc.StatusCode.INVALID_ARGUMENT),
                (ShareUpload("org-a", zlib.compress(b"\xff" * (raw + 1)), up.boxes), grpc.StatusCode.INVALID_ARGUMENT),
                (ShareUpload("org-a", zlib.compress(b"\xff" * raw) + b"junk", up.boxes), grpc.StatusCode.INVALID_ARGUMENT),
                (ShareUpload("org-a", zlib.compress(b"\xff" * (1 << 24)), up.boxes), grpc.StatusCode.INVALID_ARGUMENT),
                (ShareUpload("org-b", up.support, up.boxes), grpc.StatusCode.PERMISSION_DENIED)):
            a.step("shares", to_bytes(hostile), codes={code})
        a.step("shares", to_bytes(ShareUpload("org-a", bomb, up.boxes)), codes={grpc.StatusCode.INVALID_ARGUMENT},
               says=f"is not {raw} bytes")  # inflated no further than the round's bitmap needs
        limit = srv.secure.sessions["r1"].step_limit("shares")
        a.stream(spb.StepChunk(round_id="r1", phase="shares", total_bytes=limit + 1, data=bomb[:1000]),
                 codes={grpc.StatusCode.INVALID_ARGUMENT}, says="allow at most")
        again = a.stub.Step(spb.SecAggStep(round_id="r1", phase="keys", payload=to_bytes(adv)),
                            metadata=a.conn.metadata, timeout=20)
        assert again.phase == "shares"  # the very advert again: a retry, acknowledged, nothing changes
        other = to_bytes(SecAggClient(conns[0].identity, alice.round, torch.tensor([3]), torch.tensor([0.01])).advertise())
        a.step("keys", other, codes={grpc.StatusCode.ALREADY_EXISTS}, says="already sent a different keys")
        a.step("unmask", to_bytes(UnmaskReply("org-a", {}, {})), codes={grpc.StatusCode.FAILED_PRECONDITION})
        assert snapshot(srv) == before
        for f in flows[1:]:
            f.shares()
        alice._step("shares", good)

        # ---------------------------------------------------------------- masked
        req = poll(alice, "shares", MaskRequest)
        data = b"".join(alice.client.masked_stream(req, 64))
        total, digest = len(data), hashlib.sha256(data).hexdigest()
        before = snapshot(srv)
        a.upload(spb.MaskedChunk(round_id="r1", total_bytes=total + 8, data=data[:8]),
                 codes={grpc.StatusCode.INVALID_ARGUMENT}, says="U needs")
        a.upload(spb.MaskedChunk(round_id="r1", total_bytes=1 << 63, data=data[:8]),
                 codes={grpc.StatusCode.INVALID_ARGUMENT})
        a.upload(spb.MaskedChunk(round_id="r1", total_bytes=total, offset=8, data=data[8:16]),
                 codes={grpc.StatusCode.ABORTED}, says="holds 0 bytes")
        a.upload(spb.MaskedChunk(round_id="r1", total_bytes=total, offset=1 << 62, data=b"x"),
                 codes={grpc.StatusCode.ABORTED})
        a.upload(spb.MaskedChunk(round_id="r1", total_bytes=total, data=data + b"x"),
                 codes={grpc.StatusCode.INVALID_ARGUMENT}, says="more than the")
        a.upload(spb.MaskedChunk(round_id="nope", total_bytes=total, data=data), codes={grpc.StatusCode.NOT_FOUND})
        assert snapshot(srv) == before
        assert masked_status(a).total_bytes == 0  # nothing was kept for any of those streams
        # a broken stream's prefix (8 bytes) is kept for a resume, and a wrong sha256 drops it: as documented
        a.upload(spb.MaskedChunk(round_id="r1", total_bytes=total, data=data[:8]),
                 spb.MaskedChunk(round_id="r9", offset=8, data=data[8:16]), codes={grpc.StatusCode.INVALID_ARGUMENT})
        assert masked_status(a).committed_offset == 8
        a.upload(spb.MaskedChunk(round_id="r1", total_bytes=total, data=data, sha256="0" * 64),
                 codes={grpc.StatusCode.DATA_LOSS})
        assert masked_status(a).committed_offset == 0
        before = snapshot(srv)
        assert a.stub.Step(spb.SecAggStep(round_id="r1", phase="shares", payload=good), metadata=a.conn.metadata,
                           timeout=20).phase == "masked"  # a retry of the message taken: acknowledged
        a.step("shares", good[:-1] + bytes([good[-1] ^ 1]), codes={grpc.StatusCode.ALREADY_EXISTS})
        a.step("unmask", to_bytes(UnmaskReply("org-a", {}, {})), codes={grpc.StatusCode.FAILED_PRECONDITION})
        assert snapshot(srv) == before
        # two streams of the same client at once: the second is ABORTED while the first holds
        gate = threading.Event()

        def slow():
            yield spb.MaskedChunk(round_id="r1", total_bytes=total, data=data[:8])
            gate.wait(20)

        first = a.stub.UploadMasked.future(slow(), metadata=a.conn.metadata, timeout=30)
        try:
            end = time.monotonic() + 10
            while "org-a" not in srv.secure.sessions["r1"].uploading and time.monotonic() < end:
                time.sleep(0.02)
            a.upload(spb.MaskedChunk(round_id="r1", total_bytes=total, data=data[:8]),
                     codes={grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED})
        finally:
            gate.set()
        with pytest.raises(grpc.RpcError):
            first.result()
        for f in flows[1:]:
            f.masked()
        stub = a.stub
        stub.UploadMasked(iter([spb.MaskedChunk(round_id="r1", total_bytes=total, data=data, sha256=digest)]),
                          metadata=a.conn.metadata, timeout=30)
        a.upload(spb.MaskedChunk(round_id="r1", total_bytes=total, data=data, sha256=digest),
                 codes={grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION})

        # ---------------------------------------------------------------- unmask
        ureq = poll(alice, "masked", UnmaskRequest)
        good = to_bytes(alice.client.unmask(ureq))
        rep = from_bytes(good)
        before = snapshot(srv)
        fuzz(srv, a, "unmask", good, 40)
        seed = dict(rep.seed_shares)
        for hostile in (
                UnmaskReply("org-a", {k: v[:10] for k, v in seed.items()}, {}),
                UnmaskReply("org-a", {k: v + b"\0" for k, v in seed.items()}, {}),
                UnmaskReply("org-a", {k: b"\xff" * len(v) for k, v in seed.items()}, {}),
                UnmaskReply("org-a", {**seed, "org-d": seed["org-b"]}, {}),
                UnmaskReply("org-a", {k: v for k, v in seed.items() if k != "org-b"}, {}),
                UnmaskReply("org-a", seed, {"org-b": seed["org-b"]})):
            a.step("unmask", to_bytes(hostile), codes={grpc.StatusCode.INVALID_ARGUMENT})
        a.step("unmask", to_bytes(UnmaskReply("org-c", seed, {})), codes={grpc.StatusCode.PERMISSION_DENIED})
        assert snapshot(srv) == before
        for f in flows[1:]:
            f.unmask()
        alice._step("unmask", good)
    finally:
        for conn in conns:
            conn.close()
    r = srv.manager.get("r1")
    assert r.wait_closed(60) and r.state == "finalized", r.message
    assert_identical(fetch_secure(srv.target, pki, family, tmp_path), plain_round(family, tmp_path, [0, 1, 2]))


def stub_poll(a: Attacker, phase: str, wait: float) -> spb.SecAggReply:
    return a.stub.Poll(spb.SecAggPoll(round_id="r1", phase=phase, wait_seconds=wait), metadata=a.conn.metadata,
                       timeout=20)


def masked_status(a: Attacker) -> spb.MaskedUploadStatus:
    return a.stub.MaskedStatus(spb.SecureSpecRequest(round_id="r1"), metadata=a.conn.metadata, timeout=20)


# ----------------------------------------------------------------------------- the fixes, each on its own


@pytest.mark.parametrize("header", [{"$t": []}, {"$t": {"$t": 1}}, {"$t": "KeyAdvert", "client_id": {"$b": 7}},
                                    {"$t": "KeyAdvert", "client_id": {"$b": [0, -1]}},
                                    {"$t": "KeyAdvert", "client_id": {"$b": [0, 1, 2]}},
                                    {"$t": "KeyAdvert", "client_id": {"$b": [True, 1]}}])
def test_a_malformed_header_is_a_secagg_error_not_a_crash(header):
    """Was TypeError/ValueError (an UNKNOWN status over gRPC) or, for a negative length, a field
    silently cut short."""
    with pytest.raises(SecAggError):
        from_bytes(frame(header, b"abc"))


def test_a_deeply_nested_header_is_a_secagg_error():
    """Was RecursionError out of json.loads (an UNKNOWN status)."""
    with pytest.raises(SecAggError, match="nested too deeply"):
        from_bytes(struct.pack("<4sBI", MAGIC, VERSION, 40000) + b"[" * 40000)
    with pytest.raises(SecAggError, match="nested too deeply"):
        from_bytes(frame({"$t": "KeyAdvert", "c_pk": "", "s_pk": "", "seed_commit": "", "cert_pem": "", "signature": "",
                          "client_id": json.loads("[" * 900 + "]" * 900)}))  # json takes it, the decoder's recursion not


def test_a_support_bitmap_with_bytes_after_its_deflate_stream_is_refused():
    """Was accepted (zlib keeps bytes after the stream's end in unused_data, which nothing read)."""
    from tiesfed.core.secagg.ring import RingError
    from tiesfed.core.secagg.support import count_support, unpack_support

    good = zlib.compress(b"\x0f" * 4)
    assert count_support(good, 32) == 16
    for check in (count_support, unpack_support):
        with pytest.raises(RingError, match="follow its deflate stream"):
            check(good + b"junk", 32)


def test_poll_stream_chunks_are_not_smaller_than_the_floor(family, pki, secure_server, tmp_path):  # noqa: F811
    """max_chunk_bytes = 1 used to stream the answer a byte per message (work the caller chose);
    now chunks are at least MIN_POLL_CHUNK_BYTES and still reassemble to the answer."""
    from tiesfed.coordinator.secure.servicer import MIN_POLL_CHUNK_BYTES

    srv = secure_server(secure_config())
    conns, flows = flows_for(srv.target, pki, family, FAST)
    try:
        for f in flows:
            f.keys()
        a = Attacker(conns[0])
        chunks = list(a.stub.PollStream(spb.SecAggPoll(round_id="r1", phase="keys", wait_seconds=20,
                                                       max_chunk_bytes=1), metadata=a.conn.metadata, timeout=30))
        assert chunks[0].ready and chunks[0].total_bytes > 1000
        body = b"".join(c.data for c in chunks)
        assert hashlib.sha256(body).hexdigest() == chunks[0].sha256 and isinstance(from_bytes(body), KeyList)
        assert len(chunks) == -(-len(body) // MIN_POLL_CHUNK_BYTES)
    finally:
        for conn in conns:
            conn.close()


@pytest.mark.parametrize("piece", [0, 256])
def test_empty_or_trickled_masked_chunks_do_not_hold_the_phase_open(family, pki, secure_server, tmp_path,  # noqa: F811
                                                                    piece):
    """A masked stream that sends only empty chunks, or a few bytes now and then (2.5 KB/s, far
    below the round's min_rate), used to count as progress, holding the phase open past its
    deadline for as long as it liked; now the phase closes without it, and the round of the
    other two equals their plain round."""
    srv = secure_server(RoundConfig(round_id="r1", participants=CLIENTS, secure_aggregation=True,
                                                   secagg={"bound": 0.125, "threshold": 2, "phase_s": 1.5}))
    conns, flows = flows_for(srv.target, pki, family, FAST)
    stop = threading.Event()
    try:
        for f in flows:
            f.keys()
        for f in flows:
            f.shares()
        flows[0]._poll("shares", MaskRequest)
        s = srv.secure.sessions["r1"]
        total = s.params.layout.width * s.params.layout.bytes_per_element * s.server.support_size

        def idle():
            yield spb.MaskedChunk(round_id="r1", total_bytes=total)
            at = 0
            while not stop.wait(0.1):
                yield spb.MaskedChunk(round_id="r1", offset=at, data=b"\x07" * piece)
                at += piece

        a = Attacker(conns[0])
        stalled = a.stub.UploadMasked.future(idle(), metadata=a.conn.metadata, timeout=60)
        for f in flows[1:]:
            f.masked()
        end = time.monotonic() + 40
        while s.status()["phase"] == "masked" and time.monotonic() < end:
            time.sleep(0.05)
        assert s.status()["phase"] == "unmask" and not stalled.done()  # closed while the empty stream was open
        stop.set()
        with pytest.raises(grpc.RpcError) as e:
            stalled.result()
        assert e.value.code() in REFUSALS
        for f in flows[1:]:
            f.unmask()
    finally:
        stop.set()
        for conn in conns:
            conn.close()
    r = srv.manager.get("r1")
    assert r.wait_closed(60) and r.state == "finalized", r.message
    assert_identical(fetch_secure(srv.target, pki, family, tmp_path), plain_round(family, tmp_path, [1, 2]))


def test_an_unexpected_error_closing_a_phase_fails_the_round_instead_of_hanging_it(family, pki, secure_server, tmp_path,  # noqa: F811
                                                                                 monkeypatch):
    """Only SecAggError and OSError used to be caught: anything else (as the malformed share
    above once was) ended the phase driver, and the round waited forever. Injected here at the
    share phase's close: the round fails naming the error, and a poll says so."""
    import tiesfed.trust.secagg.server as server

    def broken(*a, **kw):
        raise RuntimeError("injected")

    monkeypatch.setattr(server, "merge_supports", broken)
    srv = secure_server(secure_config())
    conns, flows = flows_for(srv.target, pki, family, FAST)
    try:
        for f in flows:
            f.keys()
        for f in flows:
            f.shares()
        a = Attacker(conns[0])
        err = a.refused("Poll", spb.SecAggPoll(round_id="r1", phase="shares", wait_seconds=20),
                        codes={grpc.StatusCode.FAILED_PRECONDITION}, says="closing phase 'shares' failed")
        assert "injected" in err.details()
    finally:
        for conn in conns:
            conn.close()
    r = srv.manager.get("r1")
    assert r.wait_closed(10) and r.state == "failed" and "injected" in r.message


def test_a_secure_round_keeps_the_disk_reserve(family, tmp_path, pki, secure_server):  # noqa: F811
    """Before: the disk reserve (min_free_disk_bytes) guarded plain uploads only; a secure
    round's masked uploads and streamed steps were written whatever the free space. Now a
    chunk that would cross it is RESOURCE_EXHAUSTED naming the setting, nothing is kept, and
    once space is back the same upload completes and the round equals the plain round."""
    import shutil

    from tiesfed.trust.secagg.messages import MaskRequest

    srv = secure_server(secure_config())
    r = srv.manager.get("r1")
    conns, flows = flows_for(srv.target, pki, family, FAST)
    try:
        for f in flows:
            f.keys()
        for f in flows:
            f.shares()
        alice = flows[0]
        data = b"".join(alice.client.masked_stream(alice._poll("shares", MaskRequest), 64))
        stub = spb_grpc.SecureAggregationStub(conns[0].channel)
        chunks = [spb.MaskedChunk(round_id="r1", offset=0, total_bytes=len(data), data=data,
                                  sha256=hashlib.sha256(data).hexdigest())]
        r.min_free_disk_bytes = shutil.disk_usage(r.spool.dir).free + (1 << 40)  # the disk is "full"
        for call in (lambda: stub.UploadMasked(iter(chunks), metadata=conns[0].metadata, timeout=30),
                     lambda: stub.StepStream(iter([spb.StepChunk(round_id="r1", phase="unmask", total_bytes=64,
                                                                 data=b"\0" * 64)]),
                                             metadata=conns[0].metadata, timeout=30)):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.value.code(), e.value.details())
            assert "min_free_disk_bytes" in e.value.details()
        st = stub.MaskedStatus(spb.SecureSpecRequest(round_id="r1"), metadata=conns[0].metadata, timeout=10)
        assert (st.committed_offset, st.committed) == (0, False)
        assert not [p for p in r.spool.dir.rglob("*.incoming")]
        r.min_free_disk_bytes = 0  # space is back
        stub.UploadMasked(iter(chunks), metadata=conns[0].metadata, timeout=30)
        for f in flows[1:]:
            f.masked()
        for f in flows:
            f.unmask()
    finally:
        for conn in conns:
            conn.close()
    assert r.wait_closed(60) and r.state == "finalized", r.message
    assert_identical(fetch_secure(srv.target, pki, family, tmp_path), plain_round(family, tmp_path, [0, 1, 2]))
