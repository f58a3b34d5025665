"""The coordinator's side of a secure round, as a state machine over plain messages (no transport).

collect adverts → close_keys → collect shares → close_shares → collect masked uploads →
close_masked → collect unmask replies → finish. What it holds: public keys, sealed boxes it
cannot open, support bitmaps (as sent: deflated bits), and ONE running sum of masked vectors
(each upload is added the moment it arrives and not kept). Unmasking reconstructs the self-mask
seeds of the uploaders and the mask keys of the sharers that did not upload, removes their
masks, and decodes the sum into accumulators that `finalize` merges as on every other path.

Memory is bounded by blocks, not by the model: U is formed from the bitmaps block by block
(`merge_supports`) and kept as its bitmap; the running sum is a `RingFile` on disk (under
`workdir`), folded a piece of an upload at a time and unmasked `RING_BLOCK` elements at a
time (AES-CTR masks are seekable); `finish_stream` hands it over as `UnmaskedSums`, decoded a
flat block at a time. The bitmaps stay on disk: a `ShareUpload` parsed with `messages.from_file`
holds its bitmap as a `FileBlob`, and U's bitmap is written to an unlinked temporary file under
`workdir` (`support_packed`, a `FileBlob`), which every `MaskRequest` refers to, not copies.

A message that does not fit the current step is refused with a SecAggError and changes
nothing. Fewer than t clients at any step fail the round before anything is unmasked.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tiesfed.core.accumulators import Accumulator
from tiesfed.core.secagg.decode import secure_finalize
from tiesfed.core.secagg.encode import quantise_weight
from tiesfed.core.secagg.ring import RingError, ring_add, ring_sub
from tiesfed.core.secagg.shamir import SHARE_BYTES, ShamirError, combine, share_from_bytes
from tiesfed.core.secagg.support import count_support, merge_supports, unpack_support
from tiesfed.trust.secagg.blob import FileBlob
from tiesfed.trust.secagg.keys import SecAggError, check_advert, load_public, public_bytes, seed_commitment
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
from tiesfed.trust.secagg.prg import MASK_INFO, mask, pair_key, pair_sign, self_seed_key
from tiesfed.trust.secagg.ringfile import RING_BLOCK, RingFile
from tiesfed.trust.secagg.sums import UnmaskedSums

PHASES = ("keys", "shares", "masked", "unmask", "done")
#: A sealed box's size: nonce, AES-GCM tag, and the plaintext `SecAggClient.share` seals (its x
#: as 4 bytes, a share of b_u and one of s_u's key). The coordinator cannot open a box, but
#: refuses one of another size, which its recipient could not open either.
BOX_BYTES = 12 + 16 + 4 + 2 * SHARE_BYTES


class SecAggServer:
    """The coordinator in one secure round. `ca_pem`: when given, adverts are checked on
    arrival too (the clients check them regardless). `workdir`: where the running sum's file
    goes (the round's spool folder; a temporary folder when None)."""

    def __init__(self, rnd: SecAggRound, ca_pem: Optional[bytes] = None, workdir: Optional[Path] = None) -> None:
        self.round = rnd
        self._ca = ca_pem
        self._workdir = workdir
        self._layout = rnd.layout
        self._phase = 0
        self._adverts: dict[str, KeyAdvert] = {}
        self._keyed: tuple[str, ...] = ()
        self._uploads: dict[str, ShareUpload] = {}
        self._sharers: tuple[str, ...] = ()
        self.support_packed: Union[bytes, FileBlob] = b""  # U's bitmap, as the mask requests carry it
        self.support_size = 0  # |U|
        self._ring: Optional[RingFile] = None
        self._uploaded: list[str] = []
        self._survivors: tuple[str, ...] = ()
        self._replies: dict[str, UnmaskReply] = {}
        self.wrong_shares: set[str] = set()  # repliers caught sending a wrong share (`_rebuild`)

    def _in(self, phase: str, what: str) -> None:
        if PHASES[self._phase] != phase:
            raise SecAggError(f"round {self.round.round_id!r}: {what} arrived in phase "
                              f"{PHASES[self._phase]!r}, expected {phase!r}")

    @property
    def phase(self) -> str:
        return PHASES[self._phase]

    @property
    def support(self) -> torch.Tensor:
        """U's positions, unpacked whole (tests and small rounds: 8 bytes a position)."""
        return unpack_support(bytes(self.support_packed), self.round.numel)

    @property
    def _sum(self) -> Optional[np.ndarray]:
        """The running sum read back whole (tests and small rounds)."""
        return None if self._ring is None else self._ring.read(0, self._ring.count)

    def discard(self) -> None:
        """Delete the running sum's file (a failed or stopped round)."""
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    # ------------------------------------------------------------------ keys
    def receive_advert(self, adv: KeyAdvert) -> None:
        self._in("keys", f"keys from {adv.client_id!r}")
        if adv.client_id in self._adverts:
            raise SecAggError(f"client {adv.client_id!r} advertised keys twice")
        if self._ca is not None:
            check_advert(self.round.round_id, adv.client_id, adv.c_pk, adv.s_pk, adv.seed_commit, adv.cert_pem,
                         adv.signature, self._ca)
        self._adverts[adv.client_id] = adv

    def close_keys(self) -> KeyList:
        self._in("keys", "closing the key phase")
        self._keyed = self.round.require(self._adverts, "advertised keys")
        self._phase += 1
        return KeyList(self.round.round_id, tuple(self._adverts[c] for c in self._keyed))

    # ------------------------------------------------------------------ support + shares
    def receive_shares(self, up: ShareUpload) -> None:
        who = up.client_id
        self._in("shares", f"shares from {who!r}")
        if who not in self._keyed or who in self._uploads:
            raise SecAggError(f"shares from {who!r}: not in the key list, or sent twice")
        want = set(self._keyed) - {who}
        if set(up.boxes) != want:
            raise SecAggError(f"shares from {who!r} are addressed to {sorted(up.boxes)}, expected {sorted(want)}")
        bad = sorted(c for c, box in up.boxes.items() if len(box) != BOX_BYTES)
        if bad:
            raise SecAggError(f"shares from {who!r}: the boxes for {bad} are not {BOX_BYTES} bytes")
        try:
            count_support(up.support, self.round.numel)  # checked now, read again block by block at close
        except RingError as e:
            raise SecAggError(f"support of {who!r}: {e}") from None
        self._uploads[who] = up

    def close_shares(self) -> dict[str, MaskRequest]:
        """U1 (who shared), the union support U, and each sharer's inbox of boxes."""
        self._in("shares", "closing the share phase")
        sharers = self.round.require(self._uploads, "shared their keys")
        self._sharers = sharers
        if self._workdir is not None:
            Path(self._workdir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(prefix="secagg-support-", dir=self._workdir) as f:  # gone when unused
            _, m = merge_supports([self._uploads[c].support for c in sharers], self.round.min_release,
                                  self.round.numel, f.write)
            packed = FileBlob.of(f)
        self.support_packed, self.support_size = packed, m
        self._ring = RingFile(self._layout.width * m, self._layout, self._workdir)
        self._phase += 1
        out = {v: MaskRequest(self.round.round_id, sharers, packed,
                              {u: self._uploads[u].boxes[v] for u in sharers if u != v}) for v in sharers}
        self._uploads.clear()
        return out

    # ------------------------------------------------------------------ masked upload
    def receive_masked(self, up: MaskedUpload) -> None:
        """Add one masked vector to the running sum; the vector itself is not kept."""
        self.receive_masked_stream(up.client_id, len(up.masked), lambda: [up.masked])

    def receive_masked_stream(self, client_id: str, size: int, source: Callable[[], Iterable[bytes]]) -> None:
        """Add a masked vector of `size` bytes that `source()` yields in pieces of any length (a
        spooled upload read back chunk by chunk), one piece at a time, so memory holds the sum and
        one piece. A size that does not fit U is refused up front; a source that then yields more
        or less than it declared is read again (it must yield the same bytes, as a spool file does)
        and subtracted (ring addition is invertible), so a refused upload leaves the sum as it was."""
        who = client_id
        self._in("masked", f"masked upload from {who!r}")
        if who not in self._sharers or who in self._uploaded:
            raise SecAggError(f"masked upload from {who!r}: not a sharer, or sent twice")
        assert self._ring is not None
        k, total = self._layout.bytes_per_element, self._ring.count
        if size != total * k:
            raise SecAggError(f"masked upload from {who!r}: {size} bytes, U needs {total} elements of {k} bytes")
        applied, exact = self._fold_stream(source(), total, ring_add)
        if not exact:
            self._fold_stream(source(), applied, ring_sub)
            raise SecAggError(f"masked upload from {who!r}: the stream does not hold the {size} bytes it declared")
        self._uploaded.append(who)

    def _fold_stream(self, pieces: Iterable[bytes], limit: int, op: Callable[..., np.ndarray]) -> tuple[int, bool]:
        """Apply `op` to sum[:n] and the stream's first n ≤ limit elements, piece by piece on the
        sum's file; (n, whether the stream held exactly `limit` elements)."""
        assert self._ring is not None
        k = self._layout.bytes_per_element
        at, rest = 0, b""
        for piece in pieces:
            rest = rest + piece if rest else piece
            n = min(len(rest) // k, limit - at)
            if n:
                self._ring.apply_wire(at, memoryview(rest)[:n * k], op)
                at, rest = at + n, rest[n * k:]
            if at == limit and rest:
                return at, False
        return at, at == limit and not rest

    def close_masked(self) -> UnmaskRequest:
        self._in("masked", "closing the upload phase")
        self._survivors = self.round.require(self._uploaded, "uploaded masked vectors")
        self._phase += 1
        return UnmaskRequest(self.round.round_id, self._survivors)

    # ------------------------------------------------------------------ unmasking
    def receive_unmask(self, rep: UnmaskReply) -> None:
        who = rep.client_id
        self._in("unmask", f"unmasking shares from {who!r}")
        if who not in self._survivors or who in self._replies:
            raise SecAggError(f"unmasking shares from {who!r}: not a survivor, or sent twice")
        dropped = set(self._sharers) - set(self._survivors)
        if set(rep.seed_shares) != set(self._survivors) or set(rep.key_shares) != dropped:
            raise SecAggError(f"unmasking shares from {who!r} do not cover exactly the survivors' seeds "
                              "and the dropped clients' keys")
        for field, shares in (("seed", rep.seed_shares), ("key", rep.key_shares)):
            for v, share in shares.items():
                try:  # finish_stream reads them again; a malformed one must not get that far
                    share_from_bytes(share)
                except ShamirError as e:
                    raise SecAggError(f"unmasking shares from {who!r}: its share of {v!r}'s {field}: {e}") from None
        self._replies[who] = rep

    def finish(self) -> Accumulator:
        """Remove every mask and decode the sum of the survivors' contributions, whole."""
        sums = self.finish_stream()
        try:
            return sums.accumulator()
        finally:
            sums.close()

    def finish_stream(self) -> UnmaskedSums:
        """Remove every mask from the sum's file, `RING_BLOCK` elements at a time, and hand it over
        to be decoded block by block. Every secret is rebuilt and checked before the file changes."""
        self._in("unmask", "finishing")
        self.round.require(self._replies, "sent unmasking shares")
        lay, rid = self._layout, self.round.round_id
        assert self._ring is not None
        removals: list[tuple[Callable[..., np.ndarray], bytes]] = []
        for v in self._survivors:
            commit = self._adverts[v].seed_commit
            seed = self._rebuild(v, "seed_shares", lambda b, v=v, c=commit: seed_commitment(rid, v, b) == c)
            removals.append((ring_sub, self_seed_key(seed, rid, v)))
        for d in (c for c in self._sharers if c not in self._survivors):
            pk = self._adverts[d].s_pk
            sk = X25519PrivateKey.from_private_bytes(
                self._rebuild(d, "key_shares", lambda b, pk=pk: public_bytes(X25519PrivateKey.from_private_bytes(b)) == pk))
            for u in self._survivors:
                key = pair_key(sk, load_public(self._adverts[u].s_pk, u), MASK_INFO, rid, u, d)
                removals.append((ring_sub if pair_sign(u, d) > 0 else ring_add, key))
        ring = self._ring
        for lo in range(0, ring.count, RING_BLOCK):
            n = min(RING_BLOCK, ring.count - lo)
            y = ring.read(lo, n)
            for op, key in removals:
                op(y, mask(key, n, lay, start=lo), lay)
            ring.write(lo, y)
        weights_q = [quantise_weight(self.round.weight(c), lay) for c in self._survivors]
        self._phase += 1
        self._ring = None
        return UnmaskedSums(ring, self.support_packed, self.round.numel, self.round.spec, lay, weights_q)

    def _rebuild(self, v: str, field: str, right: Callable[[bytes], bool]) -> bytes:
        """`v`'s secret from the repliers' shares, checked by `right` (its advertised commitment or
        public key), so a wrong share cannot pass unseen. With more than t replies, one wrong reply is
        found by leaving each out in turn, named in `wrong_shares`, and the secret rebuilt without it."""
        what = "self-mask seed" if field == "seed_shares" else "mask key"
        t, x = self.round.threshold, {c: i + 1 for i, c in enumerate(self._keyed)}
        try:
            shares = {r: (x[r], share_from_bytes(getattr(rep, field)[v])) for r, rep in self._replies.items()}
        except ShamirError as e:
            raise SecAggError(f"cannot reconstruct the {what} of {v!r}: {e}") from None
        trusted = [r for r in shares if r not in self.wrong_shares]
        for left_out in [None, *trusted] if len(trusted) > t else [None]:
            try:
                secret = combine([shares[r] for r in trusted if r != left_out], t, 32)
            except ShamirError:
                continue
            if right(secret):
                if left_out is not None:
                    self.wrong_shares.add(left_out)
                return secret
        raise SecAggError(f"cannot reconstruct the {what} of {v!r}: the {len(trusted)} unmasking replies hold a "
                          f"wrong share (the result does not match what {v!r} advertised), and "
                          + ("no single reply explains it" if len(trusted) > t else
                             f"with threshold {t} there is no spare reply to find which"))

    def merged(self, acc: Accumulator) -> torch.Tensor:
        """The merged task vector (min_support and the zero-sign rule as on every path)."""
        return secure_finalize(acc, self.round.spec)
