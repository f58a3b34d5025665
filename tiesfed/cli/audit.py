"""`tiesfed coordinator audit`: check a round's spool offline, as a table or JSON.

    tiesfed coordinator audit --spool spool/ --round r1 --ca ca/ca.pem
    tiesfed coordinator audit --spool spool/ --round r1 --json | jq .ok

Exit status: 0 when every digest and signature checks out, 1 when anything does
not (each problem is listed), 2 when the round cannot be audited at all, so a
script can tell "tampered" from "wrong path".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import click

from tiesfed.coordinator.audit import AuditError, AuditReport, audit_round


def _short(hex_digest: str) -> str:
    return f"{hex_digest[:16]}…" if hex_digest else "-"


def _verdict(valid: bool, signed: bool) -> str:
    return "valid" if valid else ("INVALID" if signed else "unsigned")


def _ca(value: Optional[bool]) -> str:
    return "-" if value is None else ("valid" if value else "INVALID")


def format_report(r: AuditReport) -> str:
    """The report as a table: one row per contribution, then the merged stream, then the problems."""
    lines = [f"round {r.round_id} ({r.state}) in spool {r.spool}; certificates checked against a CA: "
             f"{'yes' if r.ca_checked else 'no (give --ca)'}"]
    head = ("CLIENT", "CERT SERIAL", "CERT FINGERPRINT", "POINTER SHA256", "FILE SHA256", "SIGNATURE", "CA")
    rows = [head] + [
        (c.client_id, c.cert_serial[:16] or "-", _short(c.cert_fingerprint), _short(c.pointer_sha256),
         _short(c.file_sha256), _verdict(c.signature_valid, c.signed), _ca(c.chain_valid))
        for c in r.contributions
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    if not r.contributions:
        lines.append("(no committed contributions)")
    m = r.merged
    if m is None:
        lines.append("merged: none (the round is not finalized)")
    else:
        lines.append(f"merged: stored sha256 {_short(m.stored_sha256)}, file sha256 {_short(m.file_sha256)}, "
                     f"signed sha256 {_short(m.signed_sha256)}")
        lines.append(f"merged signature: {_verdict(m.signature_valid, m.signed)} (coordinator certificate "
                     f"{_short(m.cert_fingerprint)}, CA {_ca(m.chain_valid)}); lists exactly the committed "
                     f"contributions: {'yes' if m.lists_committed else 'NO'}")
    problems = r.all_problems()
    if problems:
        lines.append(f"FAILED: {len(problems)} problem(s)")
        lines += [f"  - {p}" for p in problems]
    else:
        lines.append("OK: every digest and signature checks out")
    return "\n".join(lines)


@click.command("audit")
@click.option("--spool", "spool_dir", required=True, type=click.Path(file_okay=False),
              help="the coordinator's spool folder")
@click.option("--round", "round_id", required=True, help="round id")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--ca", "ca_path", type=click.Path(exists=True, dir_okay=False),
              help="the federation's ca.pem: also check that the CA issued every signing certificate")
def audit(spool_dir: str, round_id: str, as_json: bool, ca_path: Optional[str]) -> None:
    """Check a round's spool offline: each contribution's digests and signature, the merged
    stream's digest and signature, and that the merge lists exactly the committed contributions.
    Exits 1 if anything does not verify, 2 if the round cannot be audited."""
    try:
        report = audit_round(spool_dir, round_id, ca_pem=Path(ca_path).read_bytes() if ca_path else None)
    except AuditError as e:
        err = click.ClickException(str(e))
        err.exit_code = 2
        raise err from None
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else format_report(report))
    if not report.ok:
        raise SystemExit(1)
