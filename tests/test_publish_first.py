"""`publish_first` (issue 11): a round is finalized, and clients fetch, as soon as the merged
stream is signed; the coordinator writes its own model copy after. A failed copy is
retried and reported but does not fail the round, and a restart writes an unfinished
copy again. The default (the copy part of finalization) is tested in test_durability."""

from __future__ import annotations

import errno
from pathlib import Path

from tests.test_federated import (  # noqa: F401  (fixtures)
    CLIENTS,
    assert_identical,
    coordinator,
    family,
    fetch_model,
    load_folder,
    local_model,
    open_round,
    send,
)
from tiesfed.coordinator.rounds import model_copy
from tiesfed.io import materialize


def full_round(srv, family):
    rnd = open_round(srv)
    for i, c in enumerate(CLIENTS):
        send(srv, "r1", c, family, i)
    assert rnd.wait_closed(60) and rnd.state == "finalized"
    return rnd


def test_published_first_then_the_same_model_copy(family, tmp_path, coordinator):
    srv = coordinator(publish_first=True)
    rnd = full_round(srv, family)
    want = local_model(family, tmp_path, [0, 1, 2])
    assert_identical(fetch_model(srv, family, tmp_path), want)
    rnd._finalizer.join(60)  # the copy is written on the finalizer thread, after the event
    assert not rnd.model_pending and "model_pending" not in rnd.spool.load_state()
    assert_identical(load_folder(rnd.spool.model_dir), want)
    assert (rnd.spool.model_dir / "README.md").exists()  # the model card too


def test_a_failed_copy_does_not_fail_the_round_and_a_restart_writes_it(family, tmp_path, coordinator,
                                                                       monkeypatch):
    real = materialize.apply_merged
    calls = []

    def full_disk(base, merged_path, out_dir, **kw):
        calls.append(out_dir)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "partial.safetensors").write_bytes(b"half a shard")
        raise OSError(errno.ENOSPC, "No space left on device", str(out_dir))

    monkeypatch.setattr(materialize, "apply_merged", full_disk)
    monkeypatch.setattr(model_copy, "BACKOFF_S", 0.01)
    spool = tmp_path / "spool"
    srv = coordinator(spool=spool, publish_first=True)
    rnd = full_round(srv, family)
    rnd._finalizer.join(60)
    assert len(calls) == model_copy.COPY_ATTEMPTS
    assert rnd.state == "finalized" and rnd.model_pending and "No space left" in rnd.message
    assert rnd.spool.load_state()["model_pending"] is True
    assert not rnd.spool.model_dir.exists()  # no partial copy left behind
    want = local_model(family, tmp_path, [0, 1, 2])
    assert_identical(fetch_model(srv, family, tmp_path), want)  # the merge itself is published
    srv.stop(grace=0)

    monkeypatch.setattr(materialize, "apply_merged", real)
    again = coordinator(spool=spool, publish_first=True)
    r2 = again.manager.rounds["r1"]
    assert r2.state == "finalized" and r2.merged.sha256 == rnd.merged.sha256
    r2._finalizer.join(60)
    assert not r2.model_pending and "model_pending" not in r2.spool.load_state()
    assert_identical(load_folder(r2.spool.model_dir), want)
