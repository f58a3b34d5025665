"""A client's side of a secure round, as a state machine over plain messages (no transport).

advertise → share → masked_input → unmask, each once and in order. The client checks
everything the coordinator relays: each advertised key against its signer's certificate,
that the lists it is handed only shrink (U2 ⊆ U1 ⊆ K) and never fall below t, that its own
survivors lie inside U, and that every share box opens. It answers one unmasking request
only, so it never reveals both the self-mask seed and the mask key of the same client.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional

import torch

from tiesfed.core.secagg.encode import encode_range, lane_values, quantise, quantise_weight, support_positions
from tiesfed.core.secagg.ring import ring_add, ring_sub
from tiesfed.core.secagg.shamir import SHARE_BYTES, share_bytes, share_from_bytes, split
from tiesfed.core.secagg.support import pack_support, unpack_support
from tiesfed.trust.identity import Identity
from tiesfed.trust.secagg.boxes import open_box, seal
from tiesfed.trust.secagg.keys import RoundKeys, SecAggError, check_advert, load_public, private_bytes
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


class SecAggClient:
    """One organisation in one secure round. `indices`/`values`: its trimmed task vector over
    the round's flat parameter space (sorted unique indices); quantised at once, so a value
    beyond the round's bound is refused before anything is sent."""

    def __init__(self, identity: Identity, rnd: SecAggRound, indices: torch.Tensor, values: torch.Tensor) -> None:
        if identity.role != "client" or not identity.name:
            raise SecAggError(f"identity {identity.folder} is not a client certificate")
        self.id = identity.name
        self.round = rnd
        self._identity = identity
        self._layout = rnd.layout
        self._idx, self._q = quantise(indices, values, rnd.fixed)
        if self._idx.numel() and int(self._idx[-1]) >= rnd.numel:
            raise SecAggError(f"positions beyond the round's {rnd.numel} parameters")
        self._qw = quantise_weight(rnd.weight(self.id), self._layout)
        self._keys = RoundKeys.generate()
        self._seed = os.urandom(32)
        self._step = 0
        self._peers: dict[str, KeyAdvert] = {}
        self._x: dict[str, int] = {}
        self._sharers: tuple[str, ...] = ()
        self._held: dict[str, tuple[int, int]] = {}  # sender → (share of b, share of s key)
        self._plan: tuple[torch.Tensor, torch.Tensor, int] = (torch.zeros(0), torch.zeros(0), 0)

    def _advance(self, step: str) -> None:
        if STEPS[self._step] != step:
            raise SecAggError(f"client {self.id!r}: {step} out of order (next step: {STEPS[self._step]})")
        self._step += 1

    # ------------------------------------------------------------------ 1. keys
    def advertise(self) -> KeyAdvert:
        self._advance("advertise")
        k = self._keys
        return KeyAdvert(self.id, k.c_pk, k.s_pk, self._identity.cert_pem,
                         k.sign(self._identity, self.round.round_id, self.id))

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
            check_advert(rid, a.client_id, a.c_pk, a.s_pk, a.cert_pem, a.signature, self._identity.ca_pem)
        mine = {a.client_id: a for a in keys.adverts}.get(self.id)
        if mine is None or (mine.c_pk, mine.s_pk) != (self._keys.c_pk, self._keys.s_pk):
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
        return ShareUpload(self.id, pack_support(self._idx, self.round.numel), boxes)

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
        support = unpack_support(req.support, self.round.numel)
        idx, q = self._idx, self._q
        if self.round.min_release > 1:  # the release rule: positions too few touched stay out
            keep = torch.isin(idx, support)
            idx, q = idx[keep], q[keep]
        at = support_positions(idx, support)
        self._advance("masked_input")
        self._held.update(held)
        self._sharers = sharers
        self._plan = (at, q, support.numel())

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
        at, q, m = self._plan
        lay, rid, w = self._layout, self.round.round_id, self._layout.width
        keys = [(1, self_seed_key(self._seed, rid, self.id))]
        for peer in self._sharers:
            if peer != self.id:
                pk = load_public(self._peers[peer].s_pk, peer)
                keys.append((pair_sign(self.id, peer), pair_key(self._keys.s_sk, pk, MASK_INFO, rid, self.id, peer)))
        for lo in range(0, m, max(1, chunk)):
            hi = min(m, lo + max(1, chunk))
            a, b = (int(i) for i in torch.searchsorted(at, torch.tensor([lo, hi])))
            y = encode_range(at[a:b], lane_values(q[a:b], self._qw, lay), lo, hi, lay)
            for sign, key in keys:
                (ring_add if sign > 0 else ring_sub)(y, mask(key, y.size, lay, start=lo * w), lay)
            yield lay.to_bytes(y)

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
        return self._plan[2]
