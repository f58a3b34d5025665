"""The release rule (`min_release` = 2) when a client drops after U was formed (issue 13).

org-c shares (its support counts towards U) and is SIGKILLed before its masked upload. A
position of U that only org-c and one survivor covered would come out of the unmasking as
that survivor's own value: the round fails before anything is unmasked, saying why. When the
survivors still cover every position of U twice (all three hold the same fine-tune here) the
round completes and equals the plain round of the survivors. Real processes over mutual TLS.
"""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.test_federated import assert_identical
from tests.test_secagg_round import (  # noqa: F401
    CLIENTS,
    PHASE_S,
    client_process,
    family,
    fetch_secure,
    plain_round,
    secure_server,
    submit_threads,
    wait_advertised,
    wait_line,
)
from tiesfed.client.federated import FederatedError
from tiesfed.coordinator.rounds import RoundConfig


@pytest.mark.parametrize("same_models", [False, True], ids=["thin-positions-fail", "covered-completes"])
def test_a_drop_after_sharing_under_min_release(family, tmp_path, pki, secure_server, same_models):  # noqa: F811
    srv = secure_server(RoundConfig(round_id="r1", participants=CLIENTS, secure_aggregation=True,
                                    secagg={"bound": 0.125, "threshold": 2, "phase_s": PHASE_S, "min_release": 2}))
    models = [0, 0, 0] if same_models else [0, 1, 2]
    stopping = client_process(pki, family, srv.target, models[2], "shares", client="org-c")
    wait_advertised(srv.target, pki, "org-c")
    with ThreadPoolExecutor(1) as pool:
        results = pool.submit(submit_threads, pki, family, srv.target, [0, 1], [family[1][m] for m in models])
        wait_line(stopping, "STOPPED shares")
        stopping.send_signal(signal.SIGKILL)
        stopping.wait()
        results = results.result(120)
    r = srv.manager.get("r1")
    assert r.wait_closed(60)
    if same_models:
        assert all(not isinstance(x, Exception) for x in results), results
        assert r.state == "finalized" and r.message.endswith("org-a, org-b"), r.message
        want = plain_round(family, tmp_path, [0, 0], ["org-a", "org-b"])
        assert_identical(fetch_secure(srv.target, pki, family, tmp_path), want)
        return
    why = "position(s) of U are covered by fewer than min_release = 2 of the 2 client(s) that uploaded"
    for x in results:
        assert isinstance(x, FederatedError) and why in str(x), x
    assert r.state == "failed" and why in r.message and "after org-c dropped out" in r.message, r.message
    assert not r.spool.merged_path.exists()
    assert not (r.spool.dir / "secagg" / "masked").exists()  # the masked vectors went with the failure
    assert "masked" not in srv.secure.sessions["r1"].outbox  # no unmask request was ever formed
