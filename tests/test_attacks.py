"""Attacks on a running coordinator that the other suites do not cover: hostile admin
requests (enum values outside the proto's, JSON nested past Python's recursion limit,
non-finite numbers), hostile upload streams and downloads, each over real gRPC on
loopback. Every refused call gets a status naming the problem (never UNKNOWN or
INTERNAL) and leaves the round as it was (`snapshot`); the honest round still merges
exactly the local engine's model.
"""

from __future__ import annotations

import math

import grpc
import pytest

from tests.test_admin import admin_call, round_dirs
from tests.test_federated import (  # noqa: F401
    CLIENTS,
    assert_identical,
    assert_same_state,
    contribution_bytes,
    coordinator,
    family,
    fetch_model,
    local_model,
    open_round,
    raw_upload,
    rejected,
    send,
    snapshot,
)
from tiesfed.protos.v1 import tiesfed_pb2 as pb

TOKEN = "s3cret-admin"
DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON, nested past Python's recursion limit


def _open(**fields) -> pb.OpenRoundRequest:
    return pb.OpenRoundRequest(**{"round_id": "r2", "participants": [pb.Participant(client_id="org-a")],
                                  "base_fingerprint": "0" * 64,
                                  "manifest": [pb.TensorSpec(name="w", shape=[4], dtype="F32")], **fields})


HOSTILE_ROUNDS = {
    "late policy outside the enum": (dict(late_policy=99), "late_policy"),
    "replace policy outside the enum": (dict(replace_policy=-3), "replace_policy"),
    "options nested past the recursion limit": (dict(options_json=DEEP), "options_json"),
    "secagg nested past the recursion limit": (dict(secure_aggregation=True, secagg_json=DEEP), "secagg_json"),
    "NaN weight": (dict(participants=[pb.Participant(client_id="org-a", weight=math.nan)]), "weight"),
    "NaN deadline": (dict(deadline_unix=math.nan), "deadline"),
    "infinite deadline seconds": (dict(deadline_seconds=math.inf), "deadline"),
    "NaN bound": (dict(max_abs_value=math.nan), "max_abs_value"),
    "path traversal in the round id": (dict(round_id="../../etc"), "round_id"),
    "round id of dots": (dict(round_id=".."), "round_id"),
    "path traversal in a client id": (dict(participants=[pb.Participant(client_id="../x")]), "client_id"),
}


@pytest.mark.parametrize("case", list(HOSTILE_ROUNDS))
def test_hostile_open_round_is_a_clear_refusal(family, tmp_path, coordinator, case):
    """Before: an enum value outside the proto's (proto3 enums are open) and JSON nested
    past the recursion limit were UNKNOWN (a KeyError, a RecursionError), and a NaN or
    infinite deadline opened a round. Now each is INVALID_ARGUMENT naming the field,
    nothing written, the open round untouched."""
    srv = coordinator(admin_token=TOKEN)
    rnd = open_round(srv)
    before, dirs = snapshot(rnd), round_dirs(srv)
    fields, match = HOSTILE_ROUNDS[case]
    with pytest.raises(grpc.RpcError) as ei:
        admin_call(srv, "OpenRound", _open(**fields), TOKEN)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (ei.value.code(), ei.value.details()[:300])
    assert match in ei.value.details(), ei.value.details()[:300]
    assert round_dirs(srv) == dirs and set(srv.manager.rounds) == {"r1"}
    assert_same_state(before, snapshot(rnd))


# ----------------------------------------------------------------------------- upload streams

HOSTILE_HEADERS = {
    "trim not an object": ({"trim": "topk"}, "trim"),
    "trim a list": ({"trim": [1, 2]}, "trim"),
}


@pytest.mark.parametrize("case", list(HOSTILE_HEADERS))
def test_hostile_stream_header_is_refused_and_changes_nothing(family, tmp_path, coordinator, case):
    """Before: a header whose 'trim' was not an object was INTERNAL (an AttributeError in
    the header check). Now INVALID_ARGUMENT naming the key; the round as it was."""
    srv = coordinator()
    rnd = open_round(srv)
    send(srv, "r1", "org-b", family, 1)
    header, match = HOSTILE_HEADERS[case]
    data = contribution_bytes(family, 0, header=header)
    rejected(srv, rnd, data, grpc.StatusCode.INVALID_ARGUMENT, match)
    for i, c in [(0, "org-a"), (2, "org-c")]:
        send(srv, "r1", c, family, i)
    assert rnd.wait_closed(60) and rnd.state == "finalized"
    assert_identical(fetch_model(srv, family, tmp_path), local_model(family, tmp_path, [0, 1, 2]))
