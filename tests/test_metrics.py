"""Observability: the Prometheus endpoint scraped during and after a real round, JSON logs
from a real `serve` process, and `tiesfed coordinator status` against a live coordinator."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from tests.test_federated import (
    CLIENTS,
    FAST,
    contribution_bytes,
    coordinator,
    family,
    open_round,
    raw_upload,
    send,
)
from tiesfed.cli import main
from tiesfed.client.federated import submit
from tiesfed.coordinator.metrics import REASONS, rejection_reason
from tiesfed.protos.codec import SparseTensor

REPO = Path(__file__).resolve().parent.parent

__all__ = ["coordinator", "family"]  # fixtures, imported for pytest


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample of the endpoint: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as res:
        text = res.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def phase(samples: dict, round_id: str) -> str:
    (state,) = [dict(lbl)["tiesfed_round_state"] for (n, lbl), v in samples.items()
                if n == "tiesfed_round_state" and dict(lbl)["round"] == round_id and v == 1]
    return state


def huge_values(tensors: list[SparseTensor]) -> list[SparseTensor]:
    """A contribution whose values break the round's max_abs_value bound."""
    return [SparseTensor(t.name, t.shape, t.indices, t.values * 1e9) for t in tensors]


# ----------------------------------------------------------------------------- the endpoint


def test_metrics_scraped_during_and_after_a_round(family, tmp_path, coordinator):
    srv = coordinator(metrics_port=0)
    port = srv.metrics_endpoint.port
    assert port > 0 and srv.metrics_endpoint.host == "127.0.0.1"
    rnd = open_round(srv)
    m = scrape(port)
    assert phase(m, "r1") == "open"
    assert all(value(m, "tiesfed_upload_progress_bytes", round="r1", client=c) == 0 for c in CLIENTS)
    assert value(m, "tiesfed_contributions_accepted_total") == 0
    assert all(value(m, "tiesfed_contributions_rejected_total", reason=r) == 0 for r in REASONS)

    a = send(srv, "r1", "org-a", family, 0)
    b = send(srv, "r1", "org-b", family, 1)
    bad = contribution_bytes(family, 2, model_key="2", mutate=huge_values)
    with pytest.raises(grpc.RpcError) as ei:
        raw_upload(srv, "r1", "org-c", bad, chunk=len(bad))  # one chunk: every byte of it is received
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_abs_value" in ei.value.details()

    m = scrape(port)  # during the round: two committed, one rejected
    assert rnd.state == "open" and phase(m, "r1") == "open"
    assert value(m, "tiesfed_contributions_accepted_total") == 2
    assert value(m, "tiesfed_contributions_rejected_total", reason="value_bound") == 1
    assert sum(value(m, "tiesfed_contributions_rejected_total", reason=r) for r in REASONS) == 1
    assert a.bytes_sent == a.bytes and b.bytes_sent == b.bytes  # no resends: the sums below are exact
    assert value(m, "tiesfed_upload_bytes_received_total") == a.bytes + b.bytes + len(bad)
    assert value(m, "tiesfed_upload_progress_bytes", round="r1", client="org-a") == a.bytes
    assert value(m, "tiesfed_upload_progress_bytes", round="r1", client="org-c") == 0
    assert value(m, "tiesfed_contribution_committed", round="r1", client="org-b") == 1
    assert value(m, "tiesfed_contribution_committed", round="r1", client="org-c") == 0
    assert value(m, "tiesfed_parameters_folded_total") == a.nnz + b.nnz  # folded on arrival, the bad one never
    assert value(m, "tiesfed_fold_seconds_count") > 0
    assert value(m, "tiesfed_upload_slot_wait_seconds_count", call="stream", outcome="granted") == 3

    c = send(srv, "r1", "org-c", family, 2)
    assert rnd.wait_closed(60) and rnd.state == "finalized"
    m = scrape(port)
    assert phase(m, "r1") == "finalized"
    assert value(m, "tiesfed_contributions_accepted_total") == 3
    assert value(m, "tiesfed_contributions_rejected_total", reason="value_bound") == 1
    assert value(m, "tiesfed_upload_bytes_received_total") == a.bytes + b.bytes + c.bytes + len(bad)
    assert value(m, "tiesfed_upload_progress_bytes", round="r1", client="org-c") == c.bytes
    assert value(m, "tiesfed_parameters_folded_total") == a.nnz + b.nnz + c.nnz
    assert value(m, "tiesfed_shard_actor_restarts_total") == 0

    # a second coordinator in the same process has a registry (and port) of its own
    other = coordinator(spool=tmp_path / "other-spool", metrics_port=0)
    assert other.metrics_endpoint.port != port
    assert value(scrape(other.metrics_endpoint.port), "tiesfed_contributions_accepted_total") == 0
    srv.stop(grace=0)  # stopping the coordinator stops its endpoint
    with pytest.raises(urllib.error.URLError):
        scrape(port)


def test_shard_actor_restarts_are_counted(family, coordinator):
    """A shard actor killed mid-round is rebuilt from the spool, and counted."""
    ray = pytest.importorskip("ray")
    srv = coordinator(aggregator="ray", num_shards=2, num_cpus_per_actor=0.25, metrics_port=0)
    rnd = open_round(srv)
    send(srv, "r1", "org-a", family, 0)
    ray.kill(rnd.agg.actors[0], no_restart=False)  # comes back empty
    send(srv, "r1", "org-b", family, 1)
    send(srv, "r1", "org-c", family, 2)
    assert rnd.wait_closed(120) and rnd.state == "finalized", rnd.message
    m = scrape(srv.metrics_endpoint.port)
    assert value(m, "tiesfed_shard_actor_restarts_total") >= 1
    assert phase(m, "r1") == "finalized"


def test_rejection_reasons_come_from_a_fixed_vocabulary():
    cases = {
        ("INVALID_ARGUMENT", "tensor 'w' carries |value| 1e9, over the max_abs_value 1e6 of round 'r1'"): "value_bound",
        ("INVALID_ARGUMENT", "contribution of 'a' carries more than 10 nonzeros (at 'w'): over the budget"): "budget",
        ("INVALID_ARGUMENT", "tensor 'w' has shape [4], the round's base has [2, 2]"): "shape",
        ("INVALID_ARGUMENT", "malformed contribution from 'a': bad magic"): "validation",
        ("FAILED_PRECONDITION", "contribution of 'a' was computed against base 'x'"): "base",
        ("FAILED_PRECONDITION", "round 'r1': the deadline passed 3.0 s ago and the late-upload policy is reject"):
            "late",
        ("FAILED_PRECONDITION", "round 'r1' is finalized: it takes no more uploads"): "closed",
        ("UNAUTHENTICATED", "upload of 'a' is not signed"): "signature",
        ("PERMISSION_DENIED", "client 'm' is not on the allowlist of round 'r1'"): "permission",
        ("ABORTED", "cannot resume the upload"): "aborted",
        ("INTERNAL", "coordinator error"): "internal",
        ("DATA_LOSS", "something new"): "other",
    }
    for (code, message), reason in cases.items():
        assert rejection_reason(code, message) == reason, message
        assert reason in REASONS


def test_a_taken_metrics_port_is_one_clear_error(family, tmp_path, coordinator):
    srv = coordinator(metrics_port=0)
    with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{srv.metrics_endpoint.port}"):
        coordinator(spool=tmp_path / "second", metrics_port=srv.metrics_endpoint.port)


# ----------------------------------------------------------------------------- logs


def test_serve_logs_one_json_object_a_line(family, tmp_path, pki):
    """`serve --log-format json`: every stderr line is a JSON object with time, level, logger
    and message; round events carry round and client; upload, commit, finalization and the
    model written are logged at the default level."""
    port_file = tmp_path / "port"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    p = subprocess.Popen(
        [sys.executable, "-m", "tiesfed.cli", "coordinator", "serve", "--spool", str(tmp_path / "spool"),
         "--base", str(family[0]), "--listen", "127.0.0.1:0", "--port-file", str(port_file), "--aggregator",
         "local", "--tls", str(pki.server), "--round", "r1", "--clients", "org-a", "--metrics-port", "0",
         "--log-format", "json"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(p.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        end = time.monotonic() + 120
        while not port_file.exists():
            assert p.poll() is None and time.monotonic() < end, "".join(err)
            time.sleep(0.1)
        target = f"127.0.0.1:{int(port_file.read_text())}"
        submit(target, "r1", None, family[0], family[1][0], retry=FAST, tls=pki.client("org-a"))
        while not any("ROUND_FINALIZED" in line for line in err):
            assert p.poll() is None and time.monotonic() < end, "".join(err)
            time.sleep(0.1)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(30)
        reader.join(10)
    records = [json.loads(line) for line in err if line.strip()]
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    by_event = {r.get("event"): r for r in records if r.get("round") == "r1"}
    assert by_event["UPLOAD_COMMITTED"]["client"] == "org-a" and by_event["UPLOAD_COMMITTED"]["level"] == "INFO"
    assert len(by_event["UPLOAD_COMMITTED"]["sha256"]) == 64 and by_event["UPLOAD_COMMITTED"]["bytes"] > 0
    assert by_event["ROUND_FINALIZED"]["state"] == "finalized"
    messages = [r["message"] for r in records]
    assert any(r.get("client") == "org-a" and "upload from org-a started" in r["message"] for r in records)
    assert any("merged 1 contribution(s) in" in m for m in messages)
    assert any("merged model written to" in m for m in messages)
    assert any(m.startswith("metrics on http://127.0.0.1:") for m in messages)


# ----------------------------------------------------------------------------- status


def test_status_prints_the_rounds_progress(family, coordinator):
    srv = coordinator()
    rnd = open_round(srv)
    send(srv, "r1", "org-a", family, 0)
    runner = CliRunner()
    args = ["coordinator", "status", "--target", srv.target, "--round", "r1", "--insecure", "--client-id", "org-b"]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith("round r1: open, 1/3 committed (quorum 3), deadline none")
    assert lines[2].split() == ["CLIENT", "WEIGHT", "COMMITTED"]
    assert [ln.split() for ln in lines[3:6]] == [["org-a", "1", "yes"], ["org-b", "1", "no"], ["org-c", "1", "no"]]
    assert "merged: not yet" in res.output

    send(srv, "r1", "org-b", family, 1)
    send(srv, "r1", "org-c", family, 2)
    assert rnd.wait_closed(60)
    res = runner.invoke(main, args + ["--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert (d["state"], d["committed"], d["expected"], d["quorum"]) == ("finalized", 3, 3, 3)
    assert d["merged_sha256"] == rnd.merged.sha256 and all(p["committed"] for p in d["participants"])
    res = runner.invoke(main, args)
    assert f"merged: sha256 {rnd.merged.sha256}" in res.output

    res = runner.invoke(main, args[:-1] + ["mallory"])  # the RPCs are the participants'
    assert res.exit_code == 1 and "PERMISSION_DENIED" in res.output
    res = runner.invoke(main, args[:6])  # neither --tls nor --insecure
    assert res.exit_code == 1 and "--tls" in res.output
