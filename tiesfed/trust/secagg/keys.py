"""Per-round X25519 key pairs, advertised under the client's certificate key.

Each client makes two fresh X25519 pairs a round (Bonawitz et al. 2017): `c` agrees the
keys that encrypt its Shamir shares to each peer, `s` the seeds of its pairwise masks.
It signs both public keys, with the round id and its own id, with the same certificate
key it signs its contributions with (`tiesfed.trust.signing`, ECDSA P-256), and every
other client checks that signature against the advertiser's certificate, the
certificate against the round's CA, and the certificate's subject against the id. A
coordinator relaying the keys can drop an advertisement but not substitute a key.

The advert also carries a commitment to the client's self-mask seed b_u (a hash, bound to the
round and the client): whoever rebuilds b_u from Shamir shares can tell a right seed from one
a wrong share produced (the mask key needs no commitment: its public key is advertised).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from tiesfed.trust import signing
from tiesfed.trust.certs import TrustError, common_name, role
from tiesfed.trust.identity import Identity

ADVERT_KIND = "tiesfed.secagg.keys.v2"
SEED_COMMIT_KIND = b"tiesfed.secagg.seed-commitment.v1"
RAW = serialization.Encoding.Raw


class SecAggError(TrustError):
    """A secure-aggregation step refused: a bad key, share or message, or too few clients."""


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(RAW, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def load_public(data: bytes, who: str) -> X25519PublicKey:
    if len(data) != 32:
        raise SecAggError(f"X25519 public key of {who!r} is {len(data)} bytes, not 32")
    return X25519PublicKey.from_public_bytes(data)


def seed_commitment(round_id: str, client_id: str, seed: bytes) -> bytes:
    """sha256 of the self-mask seed, bound to the round and the client (each part length-prefixed).
    The seed is 32 random bytes, so the hash reveals nothing of it."""
    h = hashlib.sha256(SEED_COMMIT_KIND)
    for part in (round_id.encode(), client_id.encode(), seed):
        h.update(len(part).to_bytes(4, "big") + part)
    return h.digest()


def advert_manifest(round_id: str, client_id: str, c_pk: bytes, s_pk: bytes, seed_commit: bytes) -> dict[str, str]:
    """What a client signs: both public keys and its seed commitment, bound to the round and to itself."""
    return {"kind": ADVERT_KIND, "round_id": round_id, "client_id": client_id,
            "c_pk": c_pk.hex(), "s_pk": s_pk.hex(), "seed_commit": seed_commit.hex()}


@dataclass(frozen=True)
class RoundKeys:
    """A client's two fresh key pairs for one round (never reused across rounds)."""

    c_sk: X25519PrivateKey
    s_sk: X25519PrivateKey

    @classmethod
    def generate(cls) -> "RoundKeys":
        return cls(X25519PrivateKey.generate(), X25519PrivateKey.generate())

    @property
    def c_pk(self) -> bytes:
        return public_bytes(self.c_sk)

    @property
    def s_pk(self) -> bytes:
        return public_bytes(self.s_sk)

    def sign(self, identity: Identity, round_id: str, client_id: str, seed_commit: bytes) -> bytes:
        return signing.sign(identity.key_pem, advert_manifest(round_id, client_id, self.c_pk, self.s_pk, seed_commit))


def check_advert(round_id: str, client_id: str, c_pk: bytes, s_pk: bytes, seed_commit: bytes, cert_pem: bytes,
                 signature: bytes, ca_pem: bytes) -> None:
    """Raise SecAggError unless `client_id`'s certificate (issued by the round's CA, role
    client) signed these keys and this seed commitment for this round."""
    try:
        signing.verify_chain(cert_pem, ca_pem)
        cn, r = common_name(cert_pem), role(cert_pem)
    except TrustError as e:
        raise SecAggError(f"keys advertised for {client_id!r}: {e}") from None
    if cn != client_id or r != "client":
        raise SecAggError(f"keys advertised for {client_id!r} come with the certificate of {cn!r} (role {r!r})")
    load_public(c_pk, client_id), load_public(s_pk, client_id)
    if len(seed_commit) != 32:
        raise SecAggError(f"the seed commitment of {client_id!r} is {len(seed_commit)} bytes, not 32")
    try:
        signing.verify(cert_pem, advert_manifest(round_id, client_id, c_pk, s_pk, seed_commit), signature)
    except TrustError as e:
        raise SecAggError(f"keys advertised for {client_id!r} in round {round_id!r} are not the ones "
                          f"it signed (substituted or replayed): {e}") from None
