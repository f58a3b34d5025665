"""Seeds and masks: X25519 agreement → HKDF-SHA256 → AES-256-CTR keystream over the ring.

Every derived key names its purpose, the round and both client ids (in sorted order), so
a seed of one pair, round or purpose is never another's. A mask is the AES-CTR keystream
of its 32-byte seed (zero IV; each seed keys exactly one stream), read as little-endian
uint64 and reduced modulo 2^b: for b ≤ 64 a power of two, that is uniform on Z_{2^b}.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tiesfed.core.secagg.ring import RingLayout

MASK_INFO = b"tiesfed.secagg.v1.mask"
SHARE_INFO = b"tiesfed.secagg.v1.share"
SELF_INFO = b"tiesfed.secagg.v1.self"


def _info(purpose: bytes, round_id: str, *ids: str) -> bytes:
    parts = [purpose, round_id.encode()] + [i.encode() for i in ids]
    return b"\x00".join(len(p).to_bytes(2, "big") + p for p in parts)


def hkdf(secret: bytes, purpose: bytes, round_id: str, *ids: str) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=_info(purpose, round_id, *ids)).derive(secret)


def pair_key(sk: X25519PrivateKey, peer_pk: X25519PublicKey, purpose: bytes, round_id: str,
             a: str, b: str) -> bytes:
    """The 32-byte key both `a` and `b` derive from their agreement (symmetric in a, b)."""
    lo, hi = sorted((a, b))
    return hkdf(sk.exchange(peer_pk), purpose, round_id, lo, hi)


def self_seed_key(seed: bytes, round_id: str, client_id: str) -> bytes:
    """The self-mask's PRG key from its Shamir-shared seed b_u."""
    return hkdf(seed, SELF_INFO, round_id, client_id)


def mask(key: bytes, count: int, layout: RingLayout, start: int = 0) -> np.ndarray:
    """Elements start..start+count of the mask: AES-256-CTR(key) keystream as uint64 mod 2^b.

    CTR is seekable, so a range of the ring vector (a chunk of the upload, a shard's part of U)
    gets its part of the mask without generating what comes before it.
    """
    if start < 0 or count < 0:
        raise ValueError("mask range must be non-negative")
    block, skip = divmod(8 * start, 16)
    enc = Cipher(algorithms.AES(key), modes.CTR(block.to_bytes(16, "big"))).encryptor()
    size = skip + 8 * count
    out = bytearray(size + 15)  # the one allocation: the keystream is encrypted zeros, written in place
    done = 0
    for at in range(0, size, len(_ZEROS)):
        done += enc.update_into(_ZEROS[:min(len(_ZEROS), size - at)], memoryview(out)[at:])
    enc.finalize()  # CTR holds nothing back
    if done != size:
        raise RuntimeError(f"AES-CTR wrote {done} of {size} keystream bytes")
    return layout.reduce(np.frombuffer(out, dtype="<u8", count=count, offset=skip))


#: Zeros to encrypt (the keystream's plaintext), shared by every call: page faults on fresh
#: buffers of megabytes each were most of a coordinator's unmasking time.
_ZEROS = memoryview(bytes(1 << 22))


def pair_sign(me: str, peer: str) -> int:
    """+1 if `me` adds the pair's mask, −1 if it subtracts it: the lower id adds."""
    return 1 if me < peer else -1
