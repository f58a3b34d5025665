"""Identity and trust for a federation across organisations: a small CA (pki), mutual-TLS
identities and verified peers (identity), and signed manifests (signing).

Layer: the standard library, `cryptography`, `grpc` and tiesfed.core only. `pki.sign` (a CSR)
and `signing.sign` (a manifest) share a name, so neither is re-exported here: call them by module.
"""

from tiesfed.trust.certs import ID_PATTERN, ROLES, CertInfo, TrustError, describe, fingerprint, valid_id
from tiesfed.trust.identity import (
    Identity,
    IdentityError,
    Peer,
    RevocationError,
    RevocationList,
    channel_credentials,
    channel_options,
    peer_identity,
    secure_channel,
    server_credentials,
)
from tiesfed.trust.pki import PkiError, init_ca, issue, request, revoke
from tiesfed.trust.signing import (
    SignatureError,
    canonical_json,
    contribution_manifest,
    merged_manifest,
    verify,
    verify_chain,
)

__all__ = [
    "ID_PATTERN", "ROLES", "CertInfo", "Identity", "IdentityError", "Peer", "PkiError", "RevocationError",
    "RevocationList", "SignatureError", "TrustError", "canonical_json", "channel_credentials", "channel_options",
    "contribution_manifest", "describe", "fingerprint", "init_ca", "issue", "merged_manifest", "peer_identity",
    "request", "revoke", "secure_channel", "server_credentials", "valid_id", "verify",
    "verify_chain",
]
