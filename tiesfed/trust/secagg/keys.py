"""Per-round X25519 key pairs, advertised under the client's certificate key.

Each client makes two fresh X25519 pairs a round (Bonawitz et al. 2017): `c` agrees the
keys that encrypt its Shamir shares to each peer, `s` the seeds of its pairwise masks.
It signs both public keys, with the round id and its own id, with the same certificate
key it signs its contributions with (`tiesfed.trust.signing`, ECDSA P-256), and every
other client checks that signature against the advertiser's certificate, the
certificate against the round's CA, and the certificate's subject against the id. A
coordinator relaying the keys can drop an advertisement but not substitute a key.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from tiesfed.trust import signing
from tiesfed.trust.certs import TrustError, common_name, role
from tiesfed.trust.identity import Identity

ADVERT_KIND = "tiesfed.secagg.keys.v1"
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


def advert_manifest(round_id: str, client_id: str, c_pk: bytes, s_pk: bytes) -> dict[str, str]:
    """What a client signs: both public keys, bound to the round and to itself."""
    return {"kind": ADVERT_KIND, "round_id": round_id, "client_id": client_id,
            "c_pk": c_pk.hex(), "s_pk": s_pk.hex()}


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

    def sign(self, identity: Identity, round_id: str, client_id: str) -> bytes:
        return signing.sign(identity.key_pem, advert_manifest(round_id, client_id, self.c_pk, self.s_pk))


def check_advert(round_id: str, client_id: str, c_pk: bytes, s_pk: bytes, cert_pem: bytes,
                 signature: bytes, ca_pem: bytes) -> None:
    """Raise SecAggError unless `client_id`'s certificate (issued by the round's CA, role
    client) signed these keys for this round."""
    try:
        signing.verify_chain(cert_pem, ca_pem)
        cn, r = common_name(cert_pem), role(cert_pem)
    except TrustError as e:
        raise SecAggError(f"keys advertised for {client_id!r}: {e}") from None
    if cn != client_id or r != "client":
        raise SecAggError(f"keys advertised for {client_id!r} come with the certificate of {cn!r} (role {r!r})")
    load_public(c_pk, client_id), load_public(s_pk, client_id)
    try:
        signing.verify(cert_pem, advert_manifest(round_id, client_id, c_pk, s_pk), signature)
    except TrustError as e:
        raise SecAggError(f"keys advertised for {client_id!r} in round {round_id!r} are not the ones "
                          f"it signed (substituted or replayed): {e}") from None
