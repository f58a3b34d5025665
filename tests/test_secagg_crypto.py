"""Secure aggregation's crypto (tiesfed.trust.secagg.keys/prg/boxes), with real certificates from
tiesfed.trust.pki: signed X25519 advertisements and what a substituted key looks like to a
client; HKDF seeds bound to the round, the pair and the purpose; AES-CTR masks uniform on the
ring; sealed share boxes that open only for their recipient."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tiesfed.core.accumulators import FinalizeSpec
from tiesfed.core.secagg import FixedPoint, RingLayout
from tiesfed.trust import pki as ca
from tiesfed.trust.identity import Identity
from tiesfed.trust.secagg.boxes import open_box, seal
from tiesfed.trust.secagg.keys import RoundKeys, SecAggError, check_advert
from tiesfed.trust.secagg.prg import MASK_INFO, SHARE_INFO, mask, pair_key

ORGS = ("org-a", "org-b", "org-c", "org-d", "org-e")


def make_pki(root: Path) -> dict[str, Identity]:
    """A CA, five client identities, the coordinator's server identity and a client of another CA."""
    ca.init_ca(root / "ca")
    out = {}
    for c in ORGS:
        ca.issue(root / "ca", root / c, client_id=c)
        out[c] = Identity.load(root / c)
    ca.issue(root / "ca", root / "server", server_names=["127.0.0.1"])
    out["server"] = Identity.load(root / "server")
    ca.init_ca(root / "other-ca")
    ca.issue(root / "other-ca", root / "rogue", client_id="org-b")
    out["rogue"] = Identity.load(root / "rogue")
    return out


@pytest.fixture(scope="module")
def ids(tmp_path_factory) -> dict[str, Identity]:
    return make_pki(tmp_path_factory.mktemp("secagg-pki"))


COMMIT = bytes(range(32))  # a seed commitment (any 32 bytes sign and verify alike)


def advert(ident: Identity, keys: RoundKeys, round_id: str = "r1", client_id: str | None = None):
    cid = client_id or ident.name
    return (round_id, cid, keys.c_pk, keys.s_pk, COMMIT, ident.cert_pem, keys.sign(ident, round_id, cid, COMMIT))


def test_signed_keys_verify_against_the_certificate(ids):
    k = RoundKeys.generate()
    check_advert(*advert(ids["org-a"], k), ids["org-b"].ca_pem)  # no error


def test_substituted_public_key_is_detected(ids):
    """The coordinator swaps org-a's mask key for one it holds, keeping org-a's signature and certificate."""
    k, evil = RoundKeys.generate(), RoundKeys.generate()
    rid, cid, c_pk, _, commit, cert, sig = advert(ids["org-a"], k)
    with pytest.raises(SecAggError, match="not the ones it signed"):
        check_advert(rid, cid, c_pk, evil.s_pk, commit, cert, sig, ids["org-b"].ca_pem)
    with pytest.raises(SecAggError, match="not the ones it signed"):
        check_advert(rid, cid, evil.c_pk, k.s_pk, commit, cert, sig, ids["org-b"].ca_pem)
    # ... or its seed commitment (to pass off a seed rebuilt from wrong shares)
    with pytest.raises(SecAggError, match="not the ones it signed"):
        check_advert(rid, cid, c_pk, k.s_pk, bytes(32), cert, sig, ids["org-b"].ca_pem)
    with pytest.raises(SecAggError, match="seed commitment .* 31 bytes"):
        check_advert(rid, cid, c_pk, k.s_pk, commit[:31], cert, sig, ids["org-b"].ca_pem)


def test_keys_signed_by_another_certificate_are_refused(ids):
    evil = RoundKeys.generate()
    # the coordinator signs keys for org-a with its own (server) certificate
    rid, _, c_pk, s_pk, commit, cert, sig = advert(ids["server"], evil, client_id="org-a")
    with pytest.raises(SecAggError, match="certificate of '127.0.0.1'"):
        check_advert(rid, "org-a", c_pk, s_pk, commit, cert, sig, ids["org-b"].ca_pem)
    # org-c signs keys claiming to be org-a
    rid, _, c_pk, s_pk, commit, cert, sig = advert(ids["org-c"], evil, client_id="org-a")
    with pytest.raises(SecAggError, match="certificate of 'org-c'"):
        check_advert(rid, "org-a", c_pk, s_pk, commit, cert, sig, ids["org-b"].ca_pem)
    # a certificate for org-b from another CA
    with pytest.raises(SecAggError, match="not issued by CA"):
        check_advert(*advert(ids["rogue"], evil), ids["org-a"].ca_pem)


def test_keys_of_another_round_are_refused(ids):
    k = RoundKeys.generate()
    _, cid, c_pk, s_pk, commit, cert, sig = advert(ids["org-a"], k, round_id="r0")
    with pytest.raises(SecAggError, match="replayed"):
        check_advert("r1", cid, c_pk, s_pk, commit, cert, sig, ids["org-b"].ca_pem)


def test_pair_seeds_agree_and_are_bound_to_round_pair_and_purpose():
    a, b, c = RoundKeys.generate(), RoundKeys.generate(), RoundKeys.generate()
    ab = pair_key(a.s_sk, b.s_sk.public_key(), MASK_INFO, "r1", "org-a", "org-b")
    assert ab == pair_key(b.s_sk, a.s_sk.public_key(), MASK_INFO, "r1", "org-b", "org-a")
    others = {
        pair_key(a.s_sk, b.s_sk.public_key(), MASK_INFO, "r2", "org-a", "org-b"),
        pair_key(a.s_sk, b.s_sk.public_key(), SHARE_INFO, "r1", "org-a", "org-b"),
        pair_key(a.s_sk, b.s_sk.public_key(), MASK_INFO, "r1", "org-a", "org-x"),
        pair_key(a.s_sk, c.s_sk.public_key(), MASK_INFO, "r1", "org-a", "org-b"),
    }
    assert ab not in others and len(others) == 4


@pytest.mark.parametrize("clients", [5, 50])
def test_masks_are_uniform_on_the_ring(clients):
    lay = RingLayout.of(FinalizeSpec(), FixedPoint(1.0, clients, frac_bits=24))
    m = mask(b"\x01" * 32, 200_000, lay)
    assert np.array_equal(m, mask(b"\x01" * 32, 200_000, lay))  # deterministic in its seed
    assert not np.array_equal(m, mask(b"\x02" * 32, 200_000, lay))
    assert int(m.max()) < 1 << lay.bits
    # every one of the b bits is set in half the elements (± 5 sigma)
    n = m.size
    for bit in range(lay.bits):
        ones = int(((m >> np.uint64(bit)) & np.uint64(1)).sum())
        assert abs(ones - n / 2) < 5 * (n / 4) ** 0.5, bit


def test_mask_ranges_are_slices_of_the_whole_mask():
    lay = RingLayout.of(FinalizeSpec(), FixedPoint(1.0, 5))
    whole = mask(b"\x03" * 32, 1001, lay)
    for start, count in ((0, 1), (1, 10), (2, 7), (999, 2), (500, 0), (333, 333)):
        assert np.array_equal(mask(b"\x03" * 32, count, lay, start), whole[start:start + count]), (start, count)


def test_a_mask_is_the_aes_ctr_keystream_reduced_to_the_ring():
    """Element i is little-endian bytes 8i..8i+8 of AES-256-CTR(key, counter 0) over zeros, mod 2^b,
    including ranges longer than the zeros `mask` encrypts at once (4 MiB) and odd starts."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    lay = RingLayout.of(FinalizeSpec(), FixedPoint(1.0, 5))
    key, count = b"\x05" * 32, 600_001
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    stream = enc.update(bytes(8 * (count + 9))) + enc.finalize()
    want = np.frombuffer(stream, dtype="<u8").astype(np.uint64) & np.uint64((1 << lay.bits) - 1)
    for start in (0, 1, 8):
        assert np.array_equal(mask(key, count, lay, start), want[start:start + count]), start


def test_share_boxes_open_only_for_their_recipient():
    key = b"\x07" * 32
    box = seal(key, b"shares", "r1", "org-a", "org-b")
    assert open_box(key, box, "r1", "org-a", "org-b") == b"shares"
    for args in (("r1", "org-a", "org-c"), ("r1", "org-c", "org-b"), ("r2", "org-a", "org-b")):
        with pytest.raises(SecAggError, match="does not open"):
            open_box(key, box, *args)
    with pytest.raises(SecAggError, match="does not open"):
        open_box(b"\x08" * 32, box, "r1", "org-a", "org-b")
    tampered = box[:-1] + bytes([box[-1] ^ 1])
    with pytest.raises(SecAggError, match="does not open"):
        open_box(key, tampered, "r1", "org-a", "org-b")
