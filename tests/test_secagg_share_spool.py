"""The share phase's messages stay on disk on the coordinator (issue 13 follow-up): a share
upload is written to a file as its chunks come and parsed with its bitmap left there, U is
formed block by block into a file, and each sharer's mask request is served from it piece
by piece. So what the coordinator allocates over the share phase is a block's working set,
not the clients' bitmaps or n copies of U; the bytes a client receives are those of the
in-memory path."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import tiesfed.core.secagg.support as support_mod
import tiesfed.trust.secagg.blob as blob_mod
from tiesfed.coordinator.rounds import RoundError
from tiesfed.coordinator.rounds.config import RoundConfig, TensorEntry
from tiesfed.coordinator.rounds.round import Round
from tiesfed.coordinator.rounds.state import default_aggregator_factory
from tiesfed.coordinator.secure.session import SecureSession
from tiesfed.coordinator.spool import RoundSpool
from tiesfed.core.accumulators import FinalizeSpec
from tiesfed.core.secagg import FixedPoint
from tiesfed.core.secagg.support import merge_supports, pack_support
from tiesfed.trust.identity import Identity
from tiesfed.trust.secagg import SecAggClient, SecAggRound, SecAggServer
from tiesfed.trust.secagg.blob import FileBlob, Outgoing
from tiesfed.trust.secagg.messages import (
    KeyAdvert,
    MaskRequest,
    ShareUpload,
    from_blob,
    from_bytes,
    from_file,
    to_bytes,
    to_parts,
)
from tiesfed.trust.secagg.server import BOX_BYTES

ORGS = ("org-a", "org-b", "org-c")
CHUNK = 32 << 10  # the stream's and the poll's chunk, and the coordinator's read piece, in this test


def bitmap(numel: int, density: float, seed: int) -> bytes:
    """A random support bitmap of `numel` (a multiple of 8) positions, deflated fast (level 1:
    any deflate stream is a bitmap; `SupportWriter` uses 9)."""
    rng, z, block, out = np.random.default_rng(seed), zlib.compressobj(1), 1 << 22, []
    for lo in range(0, numel, block):
        out.append(z.compress(np.packbits(rng.random(min(block, numel - lo), dtype=np.float32) < density).tobytes()))
    return b"".join(out) + z.flush()


def session(tmp: Path, numel: int) -> SecureSession:
    """A secure round's session on the coordinator, its key phase closed (unsigned adverts: a
    session without a CA takes them; the clients are who check them)."""
    cfg = RoundConfig(round_id="r1", participants=list(ORGS), secure_aggregation=True,
                      secagg={"bound": 0.125, "threshold": 2}, manifest=[TensorEntry(name="w", shape=(numel,))])
    s = SecureSession(Round.create(cfg, RoundSpool(tmp / "spool", "r1"), default_aggregator_factory), None)
    for c in ORGS:
        s.step(c, "keys", to_bytes(KeyAdvert(c, os.urandom(32), os.urandom(32), os.urandom(32), b"", b"")), None)
    _wait(s, "shares")
    return s


def share_phase_figures(tmp: Path, numel: int) -> dict:
    """One secure session of 3 clients through its share phase: the messages streamed in by
    file as `StepStream` does, the phase closed, each mask request read in chunks as
    `PollStream` sends it. The peak of what Python and numpy allocated meanwhile (tracemalloc),
    the bitmaps' sizes, and whether U and every mask request equal the in-memory path's."""
    support_mod.BITMAP_BLOCK = 1 << 14  # the coordinator's working set scaled down with its pieces
    support_mod.INPUT_PIECE = blob_mod.PIECE_BYTES = CHUNK
    support_mod.INFLATE_MIN = 4 << 10
    s = session(tmp, numel)
    try:
        sent = {}
        for i, c in enumerate(ORGS):
            boxes = {v: os.urandom(BOX_BYTES) for v in ORGS if v != c}
            up = ShareUpload(c, bitmap(numel, 0.2, i), boxes)
            (tmp / f"{c}.msg").write_bytes(to_bytes(up))
            sent[c] = (up.support, boxes)
        del up
        sizes = [len(b) for b, _ in sent.values()]

        def share_phase() -> dict[str, tuple[int, str]]:
            for c in ORGS:  # what `_gather` does: the chunks to a file, then the session takes it
                path, f = s.journal.incoming("shares", c)
                sha = hashlib.sha256()
                with f, open(tmp / f"{c}.msg", "rb") as src:
                    while data := src.read(CHUNK):
                        f.write(data)
                        sha.update(data)
                s.step_file(c, "shares", path, sha.hexdigest(), None)
            got = {}
            for c in ORGS:  # what `PollStream` sends, chunk by chunk
                out = s.poll(c, "shares", 30.0)
                assert out is not None, s.status()
                sha, n = hashlib.sha256(), 0
                for data in out.chunks(CHUNK):
                    sha.update(data)
                    n += len(data)
                got[c] = (n, sha.hexdigest(), out.sha256)
            return got

        tracemalloc.start()
        try:
            got = share_phase()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        # the in-memory path: U from the bitmaps as bytes, each mask request to bytes
        u, m = merge_supports([b for b, _ in sent.values()], 1, numel)
        same = {}
        for c in ORGS:
            want = to_bytes(MaskRequest("r1", ORGS, u, {v: sent[v][1][c] for v in ORGS if v != c}))
            h = hashlib.sha256(want).hexdigest()
            same[c] = got[c] == (len(want), h, h)
        req = from_bytes(s.poll("org-a", "shares", 0).whole())  # as a client reads it
        journalled = from_file(s.journal.message_path("shares", "org-b"))
        files = sorted(p.name for p in (tmp / "spool" / "rounds" / "r1").iterdir() if p.name.endswith(".incoming"))
        return {"peak": peak, "bitmaps": sizes, "u": len(u), "m": m, "size": s.server.support_size, "same": same,
                "u_same": req.support == u and s.server.support_packed == u, "boxes": req.boxes == {
                    v: sent[v][1]["org-a"] for v in ORGS if v != "org-a"},
                "journalled": journalled.support == sent["org-b"][0] and type(journalled.support).__name__,
                "incoming": files}
    finally:
        s.stop()


def _wait(s: SecureSession, phase: str) -> None:
    end = time.monotonic() + 30
    while s.status()["phase"] != phase:
        assert time.monotonic() < end, s.status()
        time.sleep(0.05)


def test_share_phase_messages_stay_on_disk(tmp_path):
    """2^26 parameters, 3 sharers at k = 20 %: each bitmap is ~6 MB and U ~8 MB, and the
    coordinator's share phase (three uploads taken, U formed, three mask requests served)
    allocates under a quarter of one bitmap, with the bytes the in-memory path gives. In a
    fresh process: no other test's threads allocate while tracemalloc counts."""
    numel = 1 << 26
    code = ("import json, sys; from pathlib import Path; from tests.test_secagg_share_spool import "
            "share_phase_figures; print(json.dumps(share_phase_figures(Path(sys.argv[1]), int(sys.argv[2]))))")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(numel)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    f = json.loads(out.stdout.strip().splitlines()[-1])
    assert min(f["bitmaps"]) > numel // 16 and f["u"] > numel // 10, f  # the sizes the bound is measured against
    assert f["same"] == dict.fromkeys(ORGS, True) and f["u_same"] and f["boxes"], f
    assert f["m"] == f["size"] and numel // 3 < f["m"] < numel * 2 // 3, f
    assert f["journalled"] == "FileBlob" and f["incoming"] == [], f  # kept in its file; nothing left behind
    assert f["peak"] < min(f["bitmaps"]) // 4, f


def test_refused_and_repeated_share_messages_leave_no_file(tmp_path):
    """A share message taken from its file: refused (malformed, another client's, a bad bitmap)
    or repeated, its file is deleted and the journal keeps only the one taken; an identical
    retry is acknowledged, a different one is ALREADY_EXISTS."""
    numel = 1 << 20
    s = session(tmp_path, numel)
    try:
        boxes = {v: os.urandom(BOX_BYTES) for v in ORGS if v != "org-a"}
        good = to_bytes(ShareUpload("org-a", bitmap(numel, 0.2, 1), boxes))
        assert len(good) > 64 << 10  # its bitmap is a field left in the file
        refusals = [(good[:-1], "INVALID_ARGUMENT"),  # truncated: a field points outside it
                    (to_bytes(ShareUpload("org-b", bitmap(numel, 0.2, 1), boxes)), "PERMISSION_DENIED"),
                    (to_bytes(ShareUpload("org-a", bitmap(numel + 8, 0.2, 1), boxes)), "INVALID_ARGUMENT")]
        for payload, code in refusals:
            with pytest.raises(RoundError) as e:
                s.step("org-a", "shares", payload, None)
            assert e.value.code == code, e.value
        round_dir = s.journal.dir.parent
        assert list(round_dir.glob(".*.incoming")) == [] and s.journal.message_path("shares", "org-a") is None
        assert s.step("org-a", "shares", good, None) == "shares"
        assert s.step("org-a", "shares", good, None) == "shares"  # its ack was lost: acknowledged again
        with pytest.raises(RoundError) as e:
            s.step("org-a", "shares", to_bytes(ShareUpload("org-a", bitmap(numel, 0.2, 2), boxes)), None)
        assert e.value.code == "ALREADY_EXISTS"
        assert list(round_dir.glob(".*.incoming")) == [] and s.status()["arrived"] == ["org-a"]
        assert [p.name for p in (s.journal.dir / "shares").iterdir()] == ["org-a.msg"]
        assert s.journal.message_path("shares", "org-a").read_bytes() == good
    finally:
        s.stop()


def test_a_clients_bitmap_and_u_stay_in_files(tmp_path, pki):
    """The client side: its own bitmap is written to a file as pass 1 makes it, its share upload
    is laid out for sending with the bitmap left there (`to_parts`), and a mask request received
    into a file (`from_blob`) keeps U there; the bytes are those of the in-memory path, and the
    client accepts that request and masks over U read from the file."""
    numel = 1 << 20
    rnd = SecAggRound("round-1", numel, 2, FixedPoint(bound=1.0, max_clients=5), FinalizeSpec())
    g = torch.Generator().manual_seed(3)
    clients = []
    for i, c in enumerate(("org-a", "org-b")):
        idx = torch.nonzero(torch.rand(numel, generator=g) < 0.2).reshape(-1)
        val = (torch.randn(idx.numel(), generator=g) * 0.05).to(torch.float32)
        clients.append(SecAggClient(Identity.load(pki.client(c)), rnd, idx, val, workdir=tmp_path))
        assert isinstance(clients[-1]._bitmap, FileBlob) and clients[-1]._bitmap == pack_support(idx, numel)
    assert list(tmp_path.iterdir()) == []  # unlinked: nothing left behind
    server = SecAggServer(rnd, workdir=tmp_path)
    for c in clients:
        server.receive_advert(c.advertise())
    keys = server.close_keys()
    ups = [c.share(keys) for c in clients]
    parts = to_parts(ups[0])
    assert any(isinstance(p, FileBlob) and len(p) > 64 << 10 for p in parts)  # sent from its file
    assert Outgoing(parts).whole() == to_bytes(ups[0])
    for up in ups:
        server.receive_shares(up)
    req = server.close_shares()["org-a"]
    wire = Outgoing(to_parts(req)).whole()
    path = tmp_path / "answer"
    path.write_bytes(wire)
    got = from_blob(FileBlob.open(path))
    assert isinstance(got.support, FileBlob) and got == from_bytes(wire)
    masked = sum(len(p) for p in clients[0].masked_stream(got, 1 << 16))  # U read from the file
    assert masked == server.support_size * rnd.layout.width * rnd.layout.bytes_per_element
