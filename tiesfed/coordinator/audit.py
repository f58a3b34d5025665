"""The offline audit of one round's spool: can its merged stream be traced back to signed
inputs, and was any file edited after it was written?

Pure reading: no server, nothing changed, so it can run on a copy of a spool, on a
stopped coordinator's or beside a running one. Every digest is recomputed from the
files and every signature verified against the certificate stored with it (and,
given the CA, that certificate's issuer), so a flipped byte in a contribution, an
edited signature file or an edited merged stream each show as a named problem.

    report = audit_round("spool/", "r1", ca_pem=Path("ca/ca.pem").read_bytes())
    report.ok, report.to_dict()
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from tiesfed.coordinator.rounds.config import RoundConfig
from tiesfed.coordinator.rounds.provenance import (
    CONTRIBUTION_FIELDS,
    MERGED_FIELDS,
    expected_manifest,
    read_record,
    record_problem,
)
from tiesfed.coordinator.rounds.recovery import load_config
from tiesfed.coordinator.spool import Committed, RoundSpool
from tiesfed.io.files import DamagedFileError, sha256_file
from tiesfed.trust import SignatureError, TrustError, describe, signing


class AuditError(Exception):
    """The round cannot be audited at all (no such spool or round); the message says which."""


@dataclass
class ContributionAudit:
    """One committed contribution: who signed it, the digests, whether the signature holds."""

    client_id: str
    cert_serial: str = ""
    cert_fingerprint: str = ""
    pointer_sha256: str = ""  # what the client's pointer file says was committed
    file_sha256: str = ""  # recomputed from the contribution file ("" when it is missing)
    signed: bool = False
    signature_valid: bool = False  # the stored certificate's key signed this round's manifest of this file
    chain_valid: Optional[bool] = None  # the certificate was issued by the CA (None: no CA given)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class MergedAudit:
    """The merged stream: its digests and the coordinator's signature over what it folded."""

    stored_sha256: str = ""  # state.json
    file_sha256: str = ""  # recomputed from merged.tfs
    signed_sha256: str = ""  # the coordinator's signed manifest
    signed: bool = False
    signature_valid: bool = False
    chain_valid: Optional[bool] = None
    cert_fingerprint: str = ""
    lists_committed: bool = False  # the signed manifest lists exactly the committed contributions
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class AuditReport:
    """Everything the audit found; `ok` only when every digest and signature checks out."""

    round_id: str
    spool: str
    state: str
    ca_checked: bool
    contributions: list[ContributionAudit] = field(default_factory=list)
    merged: Optional[MergedAudit] = None
    problems: list[str] = field(default_factory=list)  # the round's own files

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.contributions) and (self.merged is None or self.merged.ok)

    def all_problems(self) -> list[str]:
        out = list(self.problems)
        out += [f"{c.client_id}: {p}" for c in self.contributions for p in c.problems]
        out += [f"merged: {p}" for p in (self.merged.problems if self.merged else [])]
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        for c, row in zip(self.contributions, d["contributions"]):
            row["ok"] = c.ok
        if self.merged is not None:
            d["merged"]["ok"] = self.merged.ok
        return d


def _chain(cert_pem: str, ca_pem: Optional[bytes], problems: list[str]) -> Optional[bool]:
    """Issued by the CA? (None without one.) Time is not checked: a certificate that expired
    since it signed still tells who signed."""
    if ca_pem is None:
        return None
    try:
        signing.verify_chain(cert_pem, ca_pem, check_time=False)
        return True
    except SignatureError as e:
        problems.append(f"certificate not issued by the given CA: {e}")
        return False


def _contribution(spool: RoundSpool, config: Optional[RoundConfig], c: Committed,
                  ca_pem: Optional[bytes]) -> tuple[ContributionAudit, Optional[dict[str, Any]]]:
    a = ContributionAudit(c.client_id, pointer_sha256=c.sha256, signed=c.signed)
    if not c.path.is_file():
        a.problems.append(f"its file {c.path.name} is missing")
    else:
        a.file_sha256 = sha256_file(c.path)
        if a.file_sha256 != c.sha256:
            a.problems.append(f"its file {c.path.name} hashes to {a.file_sha256[:16]}…, the pointer says "
                              f"{c.sha256[:16]}… (edited after commit)")
    if not c.signed:
        a.problems.append("unsigned (committed without mutual TLS)" + (
            f", yet {c.sig_path.name} exists: its pointer was edited" if c.sig_path.exists() else ""))
        return a, None
    try:
        rec = read_record(c.sig_path, "signature file", CONTRIBUTION_FIELDS)
    except DamagedFileError as e:
        a.problems.append(str(e))
        return a, None
    a.cert_serial, a.cert_fingerprint = rec["cert_serial"], rec["cert_fingerprint"]
    digest = a.file_sha256 or c.sha256  # the file's, when there is one: the signature must cover these bytes
    want = expected_manifest(config, c.client_id, digest) if config is not None else {
        **rec["manifest"], "client_id": c.client_id, "round_id": spool.round_id, "stream_sha256": digest}
    problem = record_problem(rec, want)
    if problem:
        a.problems.append(f"{c.sig_path.name}: {problem}")
    a.signature_valid = problem is None
    a.chain_valid = _chain(rec["cert_pem"], ca_pem, a.problems)
    return a, rec


def _merged(spool: RoundSpool, state: dict[str, Any], committed: dict[str, Committed],
            records: dict[str, Optional[dict[str, Any]]], ca_pem: Optional[bytes]) -> MergedAudit:
    m = MergedAudit(stored_sha256=str(state.get("merged_sha256", "")))
    if not spool.merged_path.is_file():
        m.problems.append(f"{spool.merged_path.name} is missing")
    else:
        m.file_sha256 = sha256_file(spool.merged_path)
        if m.file_sha256 != m.stored_sha256:
            m.problems.append(f"{spool.merged_path.name} hashes to {m.file_sha256[:16]}…, the state file says "
                              f"{m.stored_sha256[:16]}… (edited after finalization)")
    if not spool.merged_sig_path.exists():
        m.problems.append(f"unsigned: no {spool.merged_sig_path.name} (finalized without a coordinator identity)")
        return m
    m.signed = True
    try:
        rec = read_record(spool.merged_sig_path, "merged signature", MERGED_FIELDS)
        info = describe(rec["cert_pem"])
    except (DamagedFileError, TrustError) as e:
        m.problems.append(f"{spool.merged_sig_path.name}: {e}")
        return m
    m.cert_fingerprint = info.fingerprint
    try:  # a bad signature is one problem; what the manifest claims is checked all the same
        signing.verify(rec["cert_pem"], rec["manifest"], bytes.fromhex(rec["signature_hex"]))
        m.signature_valid = True
    except SignatureError as e:
        m.problems.append(f"{spool.merged_sig_path.name}: {e}")
    if info.role != "server":
        m.problems.append(f"signed by a {info.role or 'role-less'} certificate ({info.common_name!r}), "
                          "not a coordinator's")
    m.chain_valid = _chain(rec["cert_pem"], ca_pem, m.problems)
    manifest = rec["manifest"]
    m.signed_sha256 = str(manifest.get("merged_sha256", ""))
    if manifest.get("kind") != signing.MERGED_KIND or manifest.get("round_id") != spool.round_id:
        m.problems.append(f"the signed manifest is a {manifest.get('kind')!r} of round {manifest.get('round_id')!r}")
    if m.signed_sha256 != (m.file_sha256 or m.stored_sha256):
        m.problems.append(f"the signed manifest names the merged sha256 {m.signed_sha256[:16]}…, "
                          f"the file is {m.file_sha256[:16]}…")
    listed = {str(r.get("client_id")): r for r in manifest.get("contributions") or [] if isinstance(r, dict)}
    before = len(m.problems)
    if set(listed) != set(committed):
        m.problems.append(f"the signed manifest lists {sorted(listed)}, the spool commits {sorted(committed)}")
    for cid in sorted(set(listed) & set(committed)):
        row, c, rec_c = listed[cid], committed[cid], records.get(cid)
        if row.get("sha256") != c.sha256:
            m.problems.append(f"the signed manifest gives {cid!r} the sha256 {str(row.get('sha256'))[:16]}…, "
                              f"its pointer {c.sha256[:16]}…")
        sig, fp = (rec_c["signature_hex"], rec_c["cert_fingerprint"]) if rec_c else ("", "")
        if (row.get("signature_hex"), row.get("cert_fingerprint")) != (sig, fp):
            m.problems.append(f"the signed manifest gives {cid!r} another signature or certificate than its "
                              "signature file holds")
    m.lists_committed = len(m.problems) == before
    return m


def audit_round(spool_dir: Union[str, Path], round_id: str, ca_pem: Optional[bytes] = None) -> AuditReport:
    """Audit round `round_id` of the spool at `spool_dir` (see the module). Raises AuditError
    only when there is no such round; damage of any kind is reported, never raised."""
    try:
        spool = RoundSpool(spool_dir, round_id)
    except ValueError as e:
        raise AuditError(str(e)) from None
    if not spool.exists():
        raise AuditError(f"no round {round_id!r} in the spool {spool_dir} (no {spool.round_file})")
    report = AuditReport(round_id, str(spool_dir), "unknown", ca_checked=ca_pem is not None)
    config: Optional[RoundConfig] = None
    try:
        config = load_config(spool)
    except DamagedFileError as e:
        report.problems.append(f"{e}: signed manifests are checked against their own base and options")
    state: dict[str, Any] = {}
    try:
        state = spool.load_state()
        report.state = str(state.get("state"))
    except DamagedFileError as e:
        report.problems.append(str(e))
    good, bad = spool.scan_committed()
    report.problems += [str(e) for e in bad.values()]
    records: dict[str, Optional[dict[str, Any]]] = {}
    for cid, c in good.items():
        a, records[cid] = _contribution(spool, config, c, ca_pem)
        report.contributions.append(a)
    if report.state == "finalized" or spool.merged_path.exists() or spool.merged_sig_path.exists():
        report.merged = _merged(spool, state, good, records, ca_pem)
    return report
