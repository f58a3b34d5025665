"""Every test that starts Ray binds it to loopback (see DESIGN.md). One PKI for the session:
every coordinator subprocess and its clients speak mutual TLS with these certificates."""

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

PKI_CLIENTS = ("org-a", "org-b", "org-c", "org-d")


@dataclass(frozen=True)
class Pki:
    """A CA folder and identity folders issued by it (as `tiesfed pki issue` writes them)."""

    root: Path

    @property
    def ca(self) -> Path:
        return self.root / "ca"

    @property
    def crl(self) -> Path:
        return self.ca / "crl.pem"

    @property
    def server(self) -> Path:
        """The coordinator's identity, valid for 127.0.0.1 and localhost."""
        return self.root / "server"

    @property
    def admin(self) -> Path:
        return self.root / "admin"

    def client(self, client_id: str) -> Path:
        return self.root / "clients" / client_id


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    """CA + a server identity for 127.0.0.1,localhost + org-a..org-d + an admin (`ops`).
    Tests that revoke make their own certificates: these are shared by the session."""
    from tiesfed.trust import pki as ca

    p = Pki(tmp_path_factory.mktemp("pki"))
    ca.init_ca(p.ca)
    ca.issue(p.ca, p.server, server_names=["127.0.0.1", "localhost"])
    ca.issue(p.ca, p.admin, admin_name="ops")
    for c in PKI_CLIENTS:
        ca.issue(p.ca, p.client(c), client_id=c)
    return p
