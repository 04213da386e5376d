"""Fixtures of the default scenario: the mail server mx1 and the client host."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import testinfra

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared"))

import mailcheck

MX_NAME = "mx1.pyqmail.test"


@pytest.fixture(scope="session")
def mx() -> Any:
    return testinfra.get_host("podman://mx1")


@pytest.fixture(scope="session")
def client(mx: Any) -> Any:
    host = testinfra.get_host("podman://client")
    mailcheck.put_file(host, "/tmp/pyqmail-ca.pem", mx.file(mailcheck.CA_PATH).content)
    return host


@pytest.fixture(scope="session")
def listen_ip(mx: Any) -> str:
    """The address site.yml picked by default: the host's primary IPv4 address."""
    return str(mx.check_output("hostname -I").split()[0])
