"""A client's side of a secure round, as a state machine over plain messages (no transport).

advertise → share → masked_input → unmask, each once and in order. The client checks
everything the coordinator relays: each advertised key against its signer's certificate,
that the lists it is handed only shrink (U2 ⊆ U1 ⊆ K) and never fall below t, that its own
survivors lie inside U, and that every share box opens. It answers one unmasking request
only, so it never reveals both the self-mask seed and the mask key of the same client.

Memory is bounded by a block, not by the model. The contribution is a re-readable source of
pieces (`Pieces`: the survivors of consecutive flat ranges, a tensor or a block of one, as
the plain trimmer yields them). Pass 1 (the constructor) quantises each piece, checks it and
writes the support bitmap range by range (`SupportWriter`) to an unlinked temporary file under
`workdir` (deflated, about 0.1 byte a parameter at k = 20 %; a `FileBlob`, read block by block),
keeping a sha256 per piece. Pass 2 (the masked upload,
again on a resume) reads the pieces again, checks each against its pass-1 digest, reads U's
bitmap for the same range (`SupportReader`), lays the piece over those positions and adds the
masks for that range of U (AES-CTR is seekable), `BITMAP_BLOCK` positions of the piece at a
time: memory is one piece, the lanes of one such step and `chunk` positions of U, and the bytes
are those the whole vector would give.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from tiesfed.core.secagg.encode import encode_range, lane_values, quantise, quantise_weight
from tiesfed.core.secagg.ring import RingError, ring_add, ring_sub
from tiesfed.core.secagg.shamir import SHARE_BYTES, share_bytes, share_from_bytes, split
from tiesfed.core.secagg.support import BITMAP_BLOCK, SupportReader, SupportWriter
from tiesfed.trust.identity import Identity
from tiesfed.trust.secagg.blob import FileBlob
from tiesfed.trust.secagg.boxes import open_box, seal
from tiesfed.trust.secagg.keys import (
    RoundKeys,
    SecAggError,
    check_advert,
    load_public,
    private_bytes,
    seed_commitment,
)
from tiesfed.trust.secagg.messages import (
    KeyAdvert,
    KeyList,
    MaskedUpload,
    MaskRequest,
    ShareUpload,
    UnmaskReply,
    UnmaskRequest,
)
from tiesfed.trust.secagg.params import SecAggRound
from tiesfed.trust.secagg.prg import MASK_INFO, SHARE_INFO, mask, pair_key, pair_sign, self_seed_key

STEPS = ("advertise", "share", "masked_input", "unmask", "done")
_BOX = 4 + 2 * SHARE_BYTES  # x, share of b, share of the s key
#: (lo, hi, indices, values): the survivors of the flat range [lo, hi), indices absolute and
#: sorted; a source's pieces come in increasing, disjoint ranges (gaps hold no survivors).
Piece = tuple[int, int, torch.Tensor, torch.Tensor]
#: A contribution that can be read again: each call yields the same pieces.
Pieces = Callable[[], Iterable[Piece]]
#: The largest flat range (`ranges`) and the most positions of U (`positions`) pass 2 has held
#: at once, in this process: what a test of the client's memory bound reads.
PEAK = {"ranges": 0, "positions": 0}


class SecAggClient:
    """One organisation in one secure round. Its trimmed task vector over the round's flat
    parameter space is either `indices`/`values` (sorted unique indices, in memory) or `pieces`
    (read twice, see the module's docstring); quantised at once, so a value beyond the round's
    bound is refused before anything is sent."""

    def __init__(self, identity: Identity, rnd: SecAggRound, indices: Optional[torch.Tensor] = None,
                 values: Optional[torch.Tensor] = None, *, pieces: Optional[Pieces] = None,
                 workdir: Optional[Path] = None) -> None:
        if identity.role != "client" or not identity.name:
            raise SecAggError(f"identity {identity.folder} is not a client certificate")
        if (pieces is None) == (indices is None or values is None):
            raise ValueError("give either indices and values, or pieces")
        if pieces is None:
            whole = (0, rnd.numel, indices, values)
            pieces = lambda: [whole]  # noqa: E731
        self.id = identity.name
        self.round = rnd
        self._identity = identity
        self._layout = rnd.layout
        self._pieces = pieces
        self._qw = quantise_weight(rnd.weight(self.id), self._layout)
        self.survivors = 0  # what the trimmer kept (before quantisation drops values that round to 0)
        self._digests: list[bytes] = []
        with tempfile.TemporaryFile(prefix="secagg-bitmap-", dir=workdir) as f:  # unlinked: gone with the client
            writer = SupportWriter(rnd.numel, f.write)
            for lo, hi, idx, q in self._quantised(count=True):
                writer.add(lo, hi, idx.numpy())
                self._digests.append(_digest(lo, hi, idx, q))
            writer.finish()
            self._bitmap = FileBlob.of(f)  # its own bitmap on disk, read block by block (FileBlob)
        self._keys = RoundKeys.generate()
        self._seed = os.urandom(32)
        self._step = 0
        self._peers: dict[str, KeyAdvert] = {}
        self._x: dict[str, int] = {}
        self._sharers: tuple[str, ...] = ()
        self._held: dict[str, tuple[int, int]] = {}  # sender → (share of b, share of s key)
        self._support = b""  # U's bitmap, once the mask request is accepted
        self._m = 0  # |U|

    def _quantised(self, count: bool = False) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """The source's pieces, quantised and checked: in order, inside the round's space."""
        at, numel = 0, self.round.numel
        for lo, hi, indices, values in self._pieces():
            if count:
                self.survivors += int(indices.numel())
            idx, q = quantise(indices, values, self.round.fixed)
            if idx.numel() and int(idx[-1]) >= numel:
                raise SecAggError(f"positions beyond the round's {numel} parameters")
            if not at <= lo <= hi <= numel:
                raise SecAggError(f"contribution range {lo}..{hi} out of order or outside 0..{numel}")
            if idx.numel() and (int(idx[0]) < lo or int(idx[-1]) >= hi):
                raise SecAggError(f"positions outside their range {lo}..{hi}")
            at = hi
            yield lo, hi, idx, q

    def _advance(self, step: str) -> None:
        if STEPS[self._step] != step:
            raise SecAggError(f"client {self.id!r}: {step} out of order (next step: {STEPS[self._step]})")
        self._step += 1

    # ------------------------------------------------------------------ 1. keys
    def advertise(self) -> KeyAdvert:
        self._advance("advertise")
        k, rid = self._keys, self.round.round_id
        commit = seed_commitment(rid, self.id, self._seed)
        return KeyAdvert(self.id, k.c_pk, k.s_pk, commit, self._identity.cert_pem,
                         k.sign(self._identity, rid, self.id, commit))

    # ------------------------------------------------------------------ 2. support + shares
    def share(self, keys: KeyList) -> ShareUpload:
        """Check every advertised key, then seal Shamir shares of b_u and s_u's key to each peer."""
        rid = self.round.round_id
        if keys.round_id != rid:
            raise SecAggError(f"key list of round {keys.round_id!r}, expected {rid!r}")
        ids = [a.client_id for a in keys.adverts]
        if len(set(ids)) != len(ids):
            raise SecAggError(f"a client is listed twice in the key list: {sorted(ids)}")
        for a in keys.adverts:
            check_advert(rid, a.client_id, a.c_pk, a.s_pk, a.seed_commit, a.cert_pem, a.signature,
                         self._identity.ca_pem)
        mine = {a.client_id: a for a in keys.adverts}.get(self.id)
        if mine is None or (mine.c_pk, mine.s_pk, mine.seed_commit) != (
                self._keys.c_pk, self._keys.s_pk, seed_commitment(rid, self.id, self._seed)):
            raise SecAggError(f"client {self.id!r}: the key list does not carry this client's own keys")
        order = self.round.require(ids, "advertised keys")
        self._advance("share")
        self._peers = {a.client_id: a for a in keys.adverts}
        self._x = {cid: i + 1 for i, cid in enumerate(order)}
        n, t = len(order), self.round.threshold
        b_sh = split(self._seed, n, t)
        s_sh = split(private_bytes(self._keys.s_sk), n, t)
        boxes = {}
        for cid in order:
            x = self._x[cid]
            plain = x.to_bytes(4, "big") + share_bytes(b_sh[x - 1][1]) + share_bytes(s_sh[x - 1][1])
            if cid == self.id:
                self._held[cid] = (b_sh[x - 1][1], s_sh[x - 1][1])
                continue
            key = pair_key(self._keys.c_sk, load_public(self._peers[cid].c_pk, cid), SHARE_INFO, rid, self.id, cid)
            boxes[cid] = seal(key, plain, rid, self.id, cid)
        return ShareUpload(self.id, self._bitmap, boxes)

    # ------------------------------------------------------------------ 3. masked upload
    def _accept(self, req: MaskRequest) -> None:
        """Check the sharers, open the share boxes, place this client's survivors in U."""
        rid = self.round.round_id
        if req.round_id != rid:
            raise SecAggError(f"mask request of round {req.round_id!r}, expected {rid!r}")
        sharers = self.round.require(req.sharers, "shared their keys")
        if self.id not in sharers or not set(sharers) <= set(self._peers):
            raise SecAggError(f"client {self.id!r}: the sharers {list(sharers)} are not a subset of the key "
                              "list that includes this client")
        want = set(sharers) - {self.id}
        if set(req.boxes) != want:
            raise SecAggError(f"client {self.id!r}: share boxes from {sorted(req.boxes)}, expected {sorted(want)}")
        held = {}
        for sender in sorted(want):
            key = pair_key(self._keys.c_sk, load_public(self._peers[sender].c_pk, sender), SHARE_INFO, rid,
                           self.id, sender)
            plain = open_box(key, req.boxes[sender], rid, sender, self.id)
            if len(plain) != _BOX or int.from_bytes(plain[:4], "big") != self._x[self.id]:
                raise SecAggError(f"client {self.id!r}: the shares from {sender!r} are not for this client")
            held[sender] = (share_from_bytes(plain[4:4 + SHARE_BYTES]), share_from_bytes(plain[4 + SHARE_BYTES:]))
        self._m = self._check_support(req.support)
        self._advance("masked_input")
        self._held.update(held)
        self._sharers = sharers
        self._support = req.support

    def _check_support(self, support: bytes) -> int:
        """|U|, reading U's bitmap and this client's own block by block: a malformed U, or (without
        the release rule) a survivor of this client's outside U, is an error before anything is sent."""
        numel, m = self.round.numel, 0
        u, mine = SupportReader(support, numel), SupportReader(self._bitmap, numel)
        for lo in range(0, numel, BITMAP_BLOCK):
            hi = min(numel, lo + BITMAP_BLOCK)
            pos, own = u.take(hi), mine.take(hi)
            if self.round.min_release <= 1 and not np.isin(own, pos, assume_unique=True).all():
                raise RingError("the contribution has positions outside the union support U")
            m += pos.size
        u.close()
        mine.close()
        return m

    def masked_input(self, req: MaskRequest) -> MaskedUpload:
        """The lanes over U plus the self mask, plus/minus one pairwise mask per other sharer."""
        return MaskedUpload(self.id, b"".join(self.masked_stream(req)))

    def masked_stream(self, req: MaskRequest, chunk: int = 1 << 20) -> Iterator[bytes]:
        """`masked_input`'s bytes in pieces of `chunk` positions of U (every check done before
        this returns): memory holds one chunk, whatever the size of U."""
        self._accept(req)
        return self._chunks(chunk)

    def masked_again(self, chunk: int = 1 << 20) -> Iterator[bytes]:
        """The bytes `masked_stream` gave, again (a resumed upload): the lanes and the masks are
        deterministic once the mask request is accepted, so nothing masked needs storing."""
        if self._step <= STEPS.index("masked_input"):
            raise SecAggError(f"client {self.id!r}: masked_again before masked_stream")
        return self._chunks(chunk)

    def _chunks(self, chunk: int) -> Iterator[bytes]:
        """Pass 2: the masked vector in pieces of `chunk` positions of U (the last one shorter)."""
        size = max(1, chunk) * self._layout.width * self._layout.bytes_per_element
        buf = bytearray()
        for data in self._ranges(max(1, chunk)):
            buf += data
            while len(buf) >= size:
                yield bytes(buf[:size])
                del buf[:size]
        if buf:
            yield bytes(buf)

    def _ranges(self, chunk: int) -> Iterator[bytes]:
        """The masked bytes of U range by range, in flat order, each piece of the source read again
        and checked against pass 1 before its bytes go out."""
        lay, rid, numel = self._layout, self.round.round_id, self.round.numel
        keys = [(1, self_seed_key(self._seed, rid, self.id))]
        for peer in self._sharers:
            if peer != self.id:
                pk = load_public(self._peers[peer].s_pk, peer)
                keys.append((pair_sign(self.id, peer), pair_key(self._keys.s_sk, pk, MASK_INFO, rid, self.id, peer)))
        u = SupportReader(self._support, numel)
        base = 0  # positions of U before the current range
        empty = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))

        def lay_over(pos: np.ndarray, idx: torch.Tensor, q: torch.Tensor) -> Iterator[bytes]:
            nonlocal base
            PEAK["positions"] = max(PEAK["positions"], min(chunk, pos.size))
            upos = torch.from_numpy(pos)
            if self.round.min_release > 1:  # the release rule: positions too few touched stay out
                keep = torch.isin(idx, upos)
                idx, q = idx[keep], q[keep]
            at = torch.searchsorted(upos, idx)
            if idx.numel() and (int(at.max()) >= upos.numel() or not bool(torch.equal(upos[at], idx))):
                raise RingError("the contribution has positions outside the union support U")
            vals = lane_values(q, self._qw, lay)
            w = lay.width
            for a in range(0, pos.size, chunk):
                b = min(pos.size, a + chunk)
                y = encode_range(at, vals, a, b, lay)
                for sign, key in keys:
                    (ring_add if sign > 0 else ring_sub)(y, mask(key, y.size, lay, start=(base + a) * w), lay)
                yield lay.to_bytes(y)
            base += pos.size

        def gap(hi: int) -> Iterator[bytes]:
            for a in range(u.at, hi, BITMAP_BLOCK):
                yield from lay_over(u.take(min(hi, a + BITMAP_BLOCK)), *empty)

        n = 0
        for lo, hi, idx, q in self._quantised():
            if n >= len(self._digests) or _digest(lo, hi, idx, q) != self._digests[n]:
                raise SecAggError(f"client {self.id!r}: the contribution read again differs from the one "
                                  f"whose support was sent (range {lo}..{hi}): did the model change?")
            n += 1
            PEAK["ranges"] = max(PEAK["ranges"], hi - lo)
            yield from gap(lo)
            for a in range(lo, hi, BITMAP_BLOCK):  # U's positions and the lanes of one step at a time
                b = min(hi, a + BITMAP_BLOCK)
                i, j = (int(x) for x in torch.searchsorted(idx, torch.tensor([a, b])))
                yield from lay_over(u.take(b), idx[i:j], q[i:j])
        if n != len(self._digests):
            raise SecAggError(f"client {self.id!r}: the contribution read again has {n} pieces, not "
                              f"{len(self._digests)}: did the model change?")
        yield from gap(numel)
        u.close()

    # ------------------------------------------------------------------ 4. unmasking shares
    def unmask(self, req: UnmaskRequest) -> UnmaskReply:
        """Shares of b_v for each survivor v, of s_v's key for each sharer that did not upload."""
        rid = self.round.round_id
        if req.round_id != rid:
            raise SecAggError(f"unmask request of round {req.round_id!r}, expected {rid!r}")
        survivors = self.round.require(req.survivors, "uploaded masked vectors")
        if not set(survivors) <= set(self._sharers) or self.id not in survivors:
            raise SecAggError(f"client {self.id!r}: survivors {list(survivors)} are not a subset of the sharers "
                              "that includes this client")
        self._advance("unmask")
        dropped = [c for c in self._sharers if c not in survivors]
        return UnmaskReply(self.id, {v: share_bytes(self._held[v][0]) for v in survivors},
                           {v: share_bytes(self._held[v][1]) for v in dropped})

    @property
    def x(self) -> Optional[int]:
        """This client's Shamir share position (1..n), once the key list is known."""
        return self._x.get(self.id)


    @property
    def support_size(self) -> int:
        """|U|, once the mask request is accepted (`masked_stream`)."""
        return self._m


def _digest(lo: int, hi: int, idx: torch.Tensor, q: torch.Tensor) -> bytes:
    """What pass 2 checks a piece against: its range and quantised survivors."""
    h = hashlib.sha256(f"{lo}:{hi}:{idx.numel()}".encode())
    h.update(idx.numpy())
    h.update(q.numpy())
    return h.digest()
