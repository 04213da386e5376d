"""Fixtures shared by every test: real certificates generated once per session."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.pki import CA, Issued


@dataclass
class PKI:
    ca: CA
    server: Issued  # localhost, mx.test, 127.0.0.1
    client: Issued  # client auth, relay.test
    other_ca: CA  # a CA nobody trusts
    rogue_client: Issued  # client auth, signed by other_ca
    dir: Path

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PKI]:
    d = tmp_path_factory.mktemp("pki")
    ca = CA()
    other = CA("untrusted CA")
    bundle = PKI(
        ca=ca,
        server=ca.issue(["localhost", "mx.test", "127.0.0.1"]),
        client=ca.issue(["relay.test"], client=True),
        other_ca=other,
        rogue_client=other.issue(["relay.test"], client=True),
        dir=d,
    )
    bundle.ca_file.write_bytes(ca.cert_pem)
    yield bundle
