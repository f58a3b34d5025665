"""The secure round end to end as state machines (tiesfed.trust.secagg client/server), every message
through its bytes, with real certificates from tiesfed.trust.pki: the result equals a plain fold of the
same quantised values bit for bit (3-5 clients, dropouts before and after the masked upload), fewer
than t fails loudly before anything is unmasked, substituted keys and misrouted shares are caught, and
what the coordinator holds of one client is indistinguishable from uniform and decodes as nothing."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch

from tests.test_secagg_crypto import ORGS, make_pki
from tiesfed.core.accumulators import FinalizeSpec, fold, new_accumulator
from tiesfed.core.secagg import FixedPoint, RingError, decode_sums, quantise, quantise_weight, secure_finalize
from tiesfed.core.secagg.encode import dequantise, encode_lanes, weight_value
from tiesfed.core.secagg.shamir import PRIME, share_bytes, share_from_bytes
from tiesfed.core.secagg.support import release_support, union_support
from tiesfed.protos.codec import CodecError, read_stream
from tiesfed.trust.secagg import SecAggClient, SecAggError, SecAggRound, SecAggServer, from_bytes, to_bytes
from tiesfed.trust.secagg.messages import KeyList, MaskedUpload, MaskRequest, UnmaskRequest

NUMEL = 3000


@pytest.fixture(scope="module")
def ids(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("secagg-pki"))


def contribution(seed: int, density: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    idx = torch.nonzero(torch.rand(NUMEL, generator=g) < density).reshape(-1)
    val = (torch.randn(idx.numel(), generator=g) * 0.05).clamp(-0.9, 0.9).to(torch.float32)
    return idx, val


def wire(msg):
    """Every message crosses as bytes, as the transport will carry it."""
    out = from_bytes(to_bytes(msg))
    assert out == msg
    return out


def make_round(n: int, t: int, spec: FinalizeSpec = FinalizeSpec(min_support=2), **kw) -> SecAggRound:
    return SecAggRound("round-1", NUMEL, t, FixedPoint(bound=1.0, max_clients=5, frac_bits=24), spec, **kw)


def run(ids, rnd: SecAggRound, orgs, drop_before_upload=(), drop_after_upload=(), keep=None, chunk=0, reply=None):
    """One secure round; `keep` collects each client's masked-upload bytes; `reply(client, reply)`
    may change an unmasking reply before it is sent."""
    clients = {c: SecAggClient(ids[c], rnd, *contribution(ORGS.index(c))) for c in orgs}
    server = SecAggServer(rnd, ca_pem=ids["org-a"].ca_pem)
    for c in clients.values():
        server.receive_advert(wire(c.advertise()))
    keys = wire(server.close_keys())
    for c in clients.values():
        server.receive_shares(wire(c.share(keys)))
    for cid, req in server.close_shares().items():
        if chunk:  # streamed in chunks of U, received in byte pieces of another size
            data = b"".join(clients[cid].masked_stream(wire(req), chunk))
            pieces = [data[i:i + 1000] for i in range(0, len(data), 1000)]
            server.receive_masked_stream(cid, len(data), lambda p=pieces: p)
            continue
        up = clients[cid].masked_input(wire(req))
        if cid in drop_before_upload:
            continue  # computed, never sent: the client died before its upload arrived
        b = to_bytes(up)
        if keep is not None:
            keep[cid] = up.masked
        server.receive_masked(from_bytes(b))
    req = wire(server.close_masked())
    for cid in req.survivors:
        if cid not in drop_after_upload:
            rep = clients[cid].unmask(req)
            server.receive_unmask(wire(reply(clients[cid], rep) if reply else rep))
    if reply:
        before = server._sum.copy()
        try:
            acc = server.finish()
        except SecAggError:
            assert server.phase == "unmask" and np.array_equal(server._sum, before), "refused, yet changed"
            raise
        return acc, server.merged(acc), server
    acc = server.finish()
    return acc, server.merged(acc), server


def plain(rnd: SecAggRound, orgs):
    """A plain fold of the same quantised values (and quantised weights), in client id order."""
    lay = rnd.layout
    acc = new_accumulator(NUMEL, rnd.spec)
    for c in sorted(orgs):
        i, q = quantise(*contribution(ORGS.index(c)), rnd.fixed)
        fold(acc, i, dequantise(q, rnd.fixed), weight_value(quantise_weight(rnd.weight(c), lay), lay))
    return acc, secure_finalize(acc, rnd.spec)


def assert_same(acc, merged, ref_acc, ref_merged):
    for field, t in ref_acc.tensors().items():
        assert torch.equal(getattr(acc, field), t), field
    assert acc.contributions == ref_acc.contributions
    assert torch.equal(merged, ref_merged)
    assert merged.abs().sum() > 0


@pytest.mark.parametrize("n", [3, 4, 5])
def test_secure_round_equals_plain_fold_of_quantised_values(ids, n):
    rnd = make_round(n, 2)
    acc, merged, _ = run(ids, rnd, ORGS[:n])
    assert_same(acc, merged, *plain(rnd, ORGS[:n]))
    # min_support=2 is applied: some parameter that one client alone touched stays 0
    assert bool(((acc.c_pos + acc.c_neg == 1) & (merged == 0)).any())


def test_streamed_upload_equals_the_whole_one(ids):
    """Clients mask U chunk by chunk (seekable masks), the coordinator folds byte pieces of another size."""
    rnd = make_round(4, 3)
    acc, merged, _ = run(ids, rnd, ORGS[:4], chunk=97)
    assert_same(acc, merged, *plain(rnd, ORGS[:4]))


def test_upload_of_the_wrong_size_changes_nothing(ids):
    rnd = make_round(3, 2)
    clients, server, keys = setup_keys(ids, rnd, ORGS[:3])
    for c in clients.values():
        server.receive_shares(c.share(keys))
    reqs = server.close_shares()
    ups = {cid: clients[cid].masked_input(req).masked for cid, req in reqs.items()}
    data = ups["org-a"]
    before = server._sum.copy()
    with pytest.raises(SecAggError, match="U needs"):
        server.receive_masked_stream("org-a", len(data) - 4, lambda: [data[:-4]])
    for bad in ([data[:-4]], [data, b"\x00" * 4], [data[:1001], data[1001:-1]]):
        with pytest.raises(SecAggError, match="does not hold"):
            server.receive_masked_stream("org-a", len(data), lambda b=bad: b)
        assert np.array_equal(server._sum, before)
    for cid, d in ups.items():
        server.receive_masked_stream(cid, len(d), lambda d=d: [d[:7], d[7:]])
    req = server.close_masked()
    for c in clients.values():
        server.receive_unmask(c.unmask(req))
    acc = server.finish()
    assert_same(acc, server.merged(acc), *plain(rnd, ORGS[:3]))


def test_weighted_secure_round(ids):
    w = {"org-a": 0.5, "org-b": 1.0, "org-c": 0.25, "org-d": 0.8}
    rnd = make_round(4, 3, FinalizeSpec(weighted=True), weights=w)
    acc, merged, _ = run(ids, rnd, ORGS[:4])
    assert_same(acc, merged, *plain(rnd, ORGS[:4]))


@pytest.mark.parametrize("dropped", [("org-c",), ("org-b", "org-e")])
def test_dropouts_before_the_masked_upload_give_the_survivors_round(ids, dropped):
    rnd = make_round(5, 3)
    acc, merged, _ = run(ids, rnd, ORGS, drop_before_upload=dropped)
    survivors = [c for c in ORGS if c not in dropped]
    assert acc.contributions == len(survivors)
    assert_same(acc, merged, *plain(rnd, survivors))


@pytest.mark.parametrize("silent", [("org-a",), ("org-c", "org-d")])
def test_dropouts_after_the_masked_upload_keep_their_contribution(ids, silent):
    """A client gone after its upload arrived is counted; the others' shares remove its self mask."""
    rnd = make_round(5, 3)
    acc, merged, _ = run(ids, rnd, ORGS, drop_after_upload=silent)
    assert_same(acc, merged, *plain(rnd, ORGS))


def test_dropouts_on_both_sides_of_the_upload(ids):
    rnd = make_round(5, 3)
    acc, merged, _ = run(ids, rnd, ORGS, drop_before_upload=("org-b",), drop_after_upload=("org-d",))
    assert_same(acc, merged, *plain(rnd, [c for c in ORGS if c != "org-b"]))


def test_release_rule_keeps_positions_fewer_than_m_touched_out_of_every_sum(ids):
    """min_release = 2: U holds only positions two or more sharers touched, so no sum the coordinator
    unmasks is one organisation's value; the merge with min_support = 2 is the plain round's."""
    rnd = make_round(5, 3, min_release=2)
    acc, merged, server = run(ids, rnd, ORGS)
    quantised = [quantise(*contribution(k), rnd.fixed) for k in range(5)]
    u = release_support([i for i, _ in quantised], 2, NUMEL)
    assert torch.equal(server.support, u)
    assert 0 < u.numel() < union_support([i for i, _ in quantised]).numel()
    ref = new_accumulator(NUMEL, rnd.spec)
    for i, q in quantised:
        keep = torch.isin(i, u)
        fold(ref, i[keep], dequantise(q[keep], rnd.fixed))
    support = acc.c_pos + acc.c_neg
    assert bool(((support == 0) | (support >= 2)).all())
    assert_same(acc, merged, ref, secure_finalize(ref, rnd.spec))
    assert torch.equal(merged, plain(make_round(5, 3), ORGS)[1])


def test_fewer_than_t_uploads_fail_loudly_before_any_unmasking(ids):
    rnd = make_round(5, 3)
    with pytest.raises(SecAggError, match="only 2 client\\(s\\) uploaded masked vectors, fewer than the threshold t = 3"):
        run(ids, rnd, ORGS, drop_before_upload=("org-a", "org-b", "org-c"))


def test_fewer_than_t_unmasking_replies_fail_loudly(ids):
    rnd = make_round(5, 3)
    with pytest.raises(SecAggError, match="only 2 client\\(s\\) sent unmasking shares"):
        run(ids, rnd, ORGS, drop_after_upload=("org-a", "org-b", "org-c"))


def shifted_share(share: bytes, x: int, xs: list[int]) -> bytes:
    """A wrong share crafted to move the secret the shares at `xs` rebuild by +1 (so it still looks
    like a 32-byte secret): y + 1/λ_x, λ_x the Lagrange coefficient of x at 0."""
    lam = 1
    for j in xs:
        if j != x:
            lam = lam * j * pow(j - x, -1, PRIME) % PRIME
    return share_bytes((share_from_bytes(share) + pow(lam, -1, PRIME)) % PRIME)


def forge(culprit: str, field: str, owner: str, xs_of):
    """An unmasking-reply hook: `culprit` sends a crafted wrong share of `owner`'s secret."""
    def hook(client, rep):
        if client.id != culprit:
            return rep
        shares = dict(getattr(rep, field))
        shares[owner] = shifted_share(shares[owner], client.x, xs_of(client))
        return dataclasses.replace(rep, **{field: shares})
    return hook


def test_exactly_t_replies_with_a_crafted_wrong_seed_share_fail_loudly(ids):
    """With exactly t replies a wrong share cannot be outvoted; the seed it rebuilds does not match the
    commitment org-c signed, so the round fails naming why, and the sum's file is left as it was."""
    rnd = make_round(5, 3)
    xs = lambda c: [1, 2, 3]  # noqa: E731  (org-a..org-c reply: x = 1..3)
    with pytest.raises(SecAggError, match="self-mask seed of 'org-c'.*wrong share.*no spare reply"):
        run(ids, rnd, ORGS, drop_after_upload=("org-d", "org-e"), reply=forge("org-b", "seed_shares", "org-c", xs))


@pytest.mark.parametrize("field", ["seed_shares", "key_shares"])
def test_one_wrong_share_among_more_than_t_replies_is_found_and_left_out(ids, field):
    """Four replies, t = 3: org-b's crafted share of org-c's seed (or of dropped org-e's mask key) is
    found by leaving each reply out in turn, named, and the round equals the plain one."""
    rnd = make_round(5, 3)
    owner, drop = ("org-c", ()) if field == "seed_shares" else ("org-e", ("org-e",))
    orgs = [c for c in ORGS if c not in drop]
    acc, merged, server = run(ids, rnd, ORGS, drop_before_upload=drop,
                              reply=forge("org-b", field, owner, lambda c: [1, 2, 3]))
    assert server.wrong_shares == {"org-b"}
    assert_same(acc, merged, *plain(rnd, orgs))


def test_fewer_than_t_keys_fail(ids):
    rnd = make_round(5, 3)
    server = SecAggServer(rnd)
    for c in ORGS[:2]:
        server.receive_advert(SecAggClient(ids[c], rnd, *contribution(0)).advertise())
    with pytest.raises(SecAggError, match="only 2 client\\(s\\) advertised keys"):
        server.close_keys()
    assert server.phase == "keys"


def setup_keys(ids, rnd, orgs):
    clients = {c: SecAggClient(ids[c], rnd, *contribution(ORGS.index(c))) for c in orgs}
    server = SecAggServer(rnd)
    for c in clients.values():
        server.receive_advert(c.advertise())
    return clients, server, server.close_keys()


def test_coordinator_substituting_a_public_key_is_detected(ids):
    rnd = make_round(4, 3)
    clients, _, keys = setup_keys(ids, rnd, ORGS[:4])
    evil = SecAggClient(ids["org-e"], rnd, *contribution(9)).advertise()
    adverts = [dataclasses.replace(a, s_pk=evil.s_pk) if a.client_id == "org-b" else a for a in keys.adverts]
    forged = KeyList(keys.round_id, tuple(adverts))
    for cid in ("org-a", "org-c", "org-d"):
        with pytest.raises(SecAggError, match="keys advertised for 'org-b' .* not the ones it signed"):
            clients[cid].share(forged)
    # re-signing with a certificate it holds does not help either
    resigned = [dataclasses.replace(evil, client_id="org-b") if a.client_id == "org-b" else a for a in keys.adverts]
    with pytest.raises(SecAggError, match="certificate of 'org-e'"):
        clients["org-a"].share(KeyList(keys.round_id, tuple(resigned)))
    # the refused key list left the clients where they were: the honest one still works
    assert clients["org-a"].share(keys).client_id == "org-a"


def test_misrouted_share_box_is_caught(ids):
    rnd = make_round(4, 3)
    clients, server, keys = setup_keys(ids, rnd, ORGS[:4])
    for c in clients.values():
        server.receive_shares(c.share(keys))
    reqs = server.close_shares()
    a, d = reqs["org-a"], reqs["org-d"]
    swapped = MaskRequest(a.round_id, a.sharers, a.support, {**a.boxes, "org-b": d.boxes["org-b"]})
    with pytest.raises(SecAggError, match="from 'org-b' to 'org-a' does not open"):
        clients["org-a"].masked_input(swapped)
    assert clients["org-a"].masked_input(a).client_id == "org-a"


def test_clients_refuse_lists_that_grow_or_fall_below_t(ids):
    rnd = make_round(4, 3)
    clients, server, keys = setup_keys(ids, rnd, ORGS[:4])
    for c in clients.values():
        server.receive_shares(c.share(keys))
    reqs = server.close_shares()
    for cid, req in reqs.items():
        server.receive_masked(clients[cid].masked_input(req))
    with pytest.raises(SecAggError, match="not a subset"):
        clients["org-a"].unmask(UnmaskRequest("round-1", ("org-a", "org-b", "org-e")))
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        clients["org-a"].unmask(UnmaskRequest("round-1", ("org-a", "org-b")))
    req = server.close_masked()
    clients["org-a"].unmask(req)
    with pytest.raises(SecAggError, match="out of order"):  # one unmasking answer only
        clients["org-a"].unmask(UnmaskRequest("round-1", ("org-a", "org-b", "org-c")))


def test_server_refuses_out_of_phase_and_duplicate_messages(ids):
    rnd = make_round(3, 2)
    clients, server, keys = setup_keys(ids, rnd, ORGS[:3])
    up = clients["org-a"].share(keys)
    server.receive_shares(up)
    with pytest.raises(SecAggError, match="sent twice"):
        server.receive_shares(up)
    with pytest.raises(SecAggError, match="phase 'shares', expected 'masked'"):
        server.receive_masked(MaskedUpload("org-a", b"\x00" * 10))
    with pytest.raises(SecAggError, match="not in the key list"):
        server.receive_shares(dataclasses.replace(up, client_id="org-e"))
    assert server.phase == "shares"


def test_stored_upload_is_uniform_and_decodes_as_nothing(ids):
    rnd = make_round(5, 3)
    kept: dict[str, bytes] = {}
    acc, merged, server = run(ids, rnd, ORGS, keep=kept)
    masked = kept["org-a"]
    # the coordinator kept no client's vector: after the round it holds no bytes or ring vector at all
    assert not [k for k, v in vars(server).items()
                if isinstance(v, np.ndarray) or (isinstance(v, bytes) and len(v) >= len(masked))]
    # byte histogram: chi-square with 255 degrees of freedom below mean + 6 sd
    data = np.frombuffer(masked, dtype=np.uint8)
    assert data.size > 10_000
    assert chi_square(data) < 255 + 6 * (2 * 255) ** 0.5
    bits = np.unpackbits(data)
    assert abs(bits.mean() - 0.5) < 5 * 0.5 / bits.size ** 0.5
    # the same client's unmasked lanes are far from uniform: the test can tell
    lay = rnd.layout
    i, q = quantise(*contribution(0), rnd.fixed)
    u = union_support([quantise(*contribution(k), rnd.fixed)[0] for k in range(5)])
    plain_bytes = np.frombuffer(lay.to_bytes(encode_lanes(i, q, 1, u, lay)), dtype=np.uint8)
    assert chi_square(plain_bytes) > 10 * 255
    # it is no contribution stream, and as ring lanes it decodes to no valid contribution
    with pytest.raises(CodecError):
        list(read_stream(io.BytesIO(masked)))
    with pytest.raises(RingError, match="not a valid one"):
        decode_sums(lay.from_bytes(masked, lay.width * u.numel()), u, NUMEL, rnd.spec, lay, [1])


def chi_square(data: np.ndarray) -> float:
    counts = np.bincount(data, minlength=256).astype(np.float64)
    expected = data.size / 256
    return float(((counts - expected) ** 2 / expected).sum())


def test_messages_round_trip_and_malformed_bytes_are_refused(ids):
    rnd = make_round(3, 2)
    clients, server, keys = setup_keys(ids, rnd, ORGS[:3])
    b = to_bytes(keys)
    assert from_bytes(b) == keys
    for bad in (b"", b"XXXX" + b[4:], b[:20], b[:-1]):
        with pytest.raises(SecAggError):
            from_bytes(bad)
    mangled = b.replace(b'"round_id"', b'"round_ix"')
    with pytest.raises(SecAggError, match="needs fields"):
        from_bytes(mangled)


def test_value_beyond_the_round_bound_is_refused_before_anything_is_sent(ids):
    rnd = make_round(3, 2)
    with pytest.raises(RingError, match="public bound"):
        SecAggClient(ids["org-a"], rnd, torch.tensor([1, 2]), torch.tensor([0.5, 1.5]))
