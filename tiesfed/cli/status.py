"""`tiesfed coordinator status`: a round's progress from a running coordinator, as a table or JSON.

    tiesfed coordinator status --target HOST:PORT --round r1 --tls org-a/
    tiesfed coordinator status --target 127.0.0.1:50051 --round r1 --insecure --client-id org-a --json

It asks GetRoundSpec and GetRoundStatus, which the coordinator answers for the round's
participants: the identity given (a client certificate, or an id with --insecure) must
be on the round's allowlist.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any, Optional

import click

from tiesfed.protos.v1 import tiesfed_pb2 as pb


def _state(value: int) -> str:
    return pb.RoundState.Name(value).removeprefix("ROUND_STATE_").lower()


def status_dict(spec: pb.RoundSpec, st: pb.RoundStatus) -> dict[str, Any]:
    """A round's progress as plain data (what --json prints, what the table shows)."""
    committed = set(st.committed_clients)
    return {
        "round_id": st.round_id,
        "state": _state(st.state),
        "committed": len(committed),
        "expected": st.expected,
        "quorum": st.quorum,
        "deadline_unix": st.deadline_unix or None,
        "method": spec.method,
        "k": spec.k,
        "lambda": getattr(spec, "lambda"),
        "base_fingerprint": spec.base_fingerprint,
        "tensors": len(spec.manifest),
        "participants": [{"client_id": p.client_id, "weight": p.weight, "committed": p.client_id in committed}
                         for p in spec.participants],
        "merged_sha256": st.merged_sha256 or None,
        "merged_bytes": st.merged_bytes or None,
        "majority_sign": st.majority_sign if st.merged_sha256 else None,
        "message": st.message,
    }


def _deadline(unix: Optional[float], now: float) -> str:
    if not unix:
        return "none"
    when = dt.datetime.fromtimestamp(unix, dt.timezone.utc).isoformat(timespec="seconds")
    left = unix - now
    return f"{when} ({'in ' + format(left, '.0f') + ' s' if left >= 0 else format(-left, '.0f') + ' s ago'})"


def format_status(d: dict[str, Any], now: Optional[float] = None) -> str:
    """The table: the round's line, its merge settings, one row per participant, the merge."""
    now = time.time() if now is None else now
    lines = [
        f"round {d['round_id']}: {d['state']}, {d['committed']}/{d['expected']} committed (quorum {d['quorum']}), "
        f"deadline {_deadline(d['deadline_unix'], now)}",
        f"method {d['method']}, k {d['k']:g}, lambda {d['lambda']:g}, {d['tensors']} tensor(s), "
        f"base {d['base_fingerprint'] or '-'}",
    ]
    rows = [("CLIENT", "WEIGHT", "COMMITTED")] + [
        (p["client_id"], f"{p['weight']:g}", "yes" if p["committed"] else "no") for p in d["participants"]
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    if d["merged_sha256"]:
        lines.append(f"merged: sha256 {d['merged_sha256']}, {d['merged_bytes']:,} bytes, "
                     f"majority sign {d['majority_sign']:+d}")
    else:
        lines.append("merged: not yet")
    if d["message"]:
        lines.append(d["message"])
    return "\n".join(lines)


@click.command("status")
@click.option("--target", envvar="TIESFED_COORDINATOR", required=True,
              help="coordinator host:port (env TIESFED_COORDINATOR)")
@click.option("--round", "round_id", required=True, help="round id")
@click.option("--tls", "tls", envvar="TIESFED_TLS", type=click.Path(exists=True, file_okay=False),
              help="a participant's identity folder (from `tiesfed pki issue`): mutual TLS (env TIESFED_TLS)")
@click.option("--insecure", is_flag=True, help="plaintext, with --client-id: only against a loopback "
              "coordinator started --insecure")
@click.option("--client-id", envvar="TIESFED_CLIENT_ID", help="a participant's id, for --insecure "
              "(env TIESFED_CLIENT_ID); with --tls the certificate's")
@click.option("--server-name", help="the name the coordinator's certificate must carry, when it is not the "
              "host in --target")
@click.option("--json", "as_json", is_flag=True, help="print the progress as JSON")
def status(target: str, round_id: str, tls: Optional[str], insecure: bool, client_id: Optional[str],
           server_name: Optional[str], as_json: bool) -> None:
    """Show a round's progress: state, committed/expected, quorum, deadline, who has
    committed, the merged digest. Needs a participant's identity (the RPCs are theirs)."""
    from tiesfed.client.connection import Connection, FederatedError, Retry
    from tiesfed.trust import TrustError

    try:
        with Connection(target, client_id, Retry(attempts=2), tls=tls, insecure=insecure,
                        server_name=server_name) as conn:
            spec = conn.round_spec(round_id)
            st = conn.call("GetRoundStatus", pb.GetRoundStatusRequest(round_id=round_id))
    except (FederatedError, ValueError, TrustError) as e:
        raise click.ClickException(str(e)) from None
    d = status_dict(spec, st)
    click.echo(json.dumps(d, indent=2) if as_json else format_status(d))
