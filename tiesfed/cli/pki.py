"""`tiesfed pki`: run the federation's small CA from the command line (see tiesfed.trust.pki)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from tiesfed.trust import pki as ca
from tiesfed.trust.certs import CertInfo, TrustError

_DIR = click.Path(file_okay=False, path_type=Path)


def _days(default: int) -> click.Option:
    return click.option("--days", type=click.IntRange(min=1), default=default, show_default=True,
                        help="validity in days")


def _said(info: CertInfo) -> str:
    return f"{info.role} {info.common_name!r} (serial {info.serial_hex}, expires {info.not_after:%Y-%m-%d})"


@click.group()
def pki() -> None:
    """A small certificate authority for mutual TLS: identities for the coordinator, clients and admins."""


@pki.command("init")
@click.argument("ca_dir", type=_DIR)
@_days(ca.CA_DAYS)
def init_cmd(ca_dir: Path, days: int) -> None:
    """Create a CA in CA_DIR; its key (ca-key.pem) never leaves the folder."""
    try:
        info = ca.init_ca(ca_dir, days=days)
    except TrustError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"created CA {info.common_name!r} in {ca_dir} (expires {info.not_after:%Y-%m-%d})")


@pki.command("issue")
@click.argument("ca_dir", type=_DIR)
@click.option("--server", "server", metavar="NAME[,NAME...]", help="a coordinator: DNS names and IP addresses")
@click.option("--client", "client_id", metavar="ID", help="a participant: its client id")
@click.option("--admin", "admin_name", metavar="NAME", help="an operator allowed admin operations")
@click.option("-o", "--out", "out_dir", required=True, type=_DIR, help="identity folder to write")
@_days(ca.CERT_DAYS)
def issue_cmd(ca_dir: Path, server: Optional[str], client_id: Optional[str], admin_name: Optional[str],
              out_dir: Path, days: int) -> None:
    """Issue an identity (cert.pem, key.pem, ca.pem) into OUT: exactly one of --server, --client, --admin."""
    if sum(x is not None for x in (server, client_id, admin_name)) != 1:
        raise click.ClickException("give exactly one of --server, --client or --admin")
    names = [n.strip() for n in server.split(",")] if server is not None else None
    try:
        info = ca.issue(ca_dir, out_dir, server_names=names, client_id=client_id, admin_name=admin_name, days=days)
    except TrustError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"issued {_said(info)} into {out_dir}")


@pki.command("request")
@click.option("--client", "client_id", required=True, metavar="ID", help="the client id to ask for")
@click.option("-o", "--out", "out_dir", required=True, type=_DIR, help="folder for key.pem and request.csr")
def request_cmd(client_id: str, out_dir: Path) -> None:
    """Make a key and a certificate request in OUT; send only request.csr to the CA, the key stays."""
    try:
        csr = ca.request(out_dir, client_id)
    except TrustError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {csr}; send it to the CA (keep {out_dir / ca.KEY} here)")


@pki.command("sign")
@click.argument("ca_dir", type=_DIR)
@click.argument("csr", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=_DIR, help="folder for cert.pem and ca.pem")
@_days(ca.CERT_DAYS)
def sign_cmd(ca_dir: Path, csr: Path, out_dir: Path, days: int) -> None:
    """Sign a client's CSR: OUT gets cert.pem and ca.pem to send back (the role is always client)."""
    try:
        info = ca.sign(ca_dir, csr, out_dir, days=days)
    except TrustError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"issued {_said(info)} into {out_dir}")


@pki.command("revoke")
@click.argument("ca_dir", type=_DIR)
@click.argument("id_or_serial")
def revoke_cmd(ca_dir: Path, id_or_serial: str) -> None:
    """Revoke every certificate of an id, or one serial (decimal or hex), and re-sign crl.pem."""
    try:
        done = ca.revoke(ca_dir, id_or_serial)
    except TrustError as e:
        raise click.ClickException(str(e)) from None
    for info in done:
        click.echo(f"revoked {_said(info)}")
