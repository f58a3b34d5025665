"""Shamir shares sealed from one client to another: AES-256-GCM under the pair's `c` agreement.

The coordinator routes the boxes but cannot open them; the associated data names the round,
sender and recipient, so a box cannot be replayed to another recipient or attributed to
another sender.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tiesfed.trust.secagg.keys import SecAggError


def _ad(round_id: str, sender: str, recipient: str) -> bytes:
    return "\x00".join(("tiesfed.secagg.v1.box", round_id, sender, recipient)).encode()


def seal(key: bytes, plaintext: bytes, round_id: str, sender: str, recipient: str) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _ad(round_id, sender, recipient))


def open_box(key: bytes, box: bytes, round_id: str, sender: str, recipient: str) -> bytes:
    if len(box) < 12 + 16:
        raise SecAggError(f"the share box from {sender!r} is truncated")
    try:
        return AESGCM(key).decrypt(box[:12], box[12:], _ad(round_id, sender, recipient))
    except InvalidTag:
        raise SecAggError(f"the share box from {sender!r} to {recipient!r} does not open "
                          "(altered, misrouted or from another round)") from None
