"""Fixtures of the consumer scenario: cons-mx (provisioned from the installed collection only)
and the client host cons-client."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import testinfra

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared"))

import mailcheck

MX_NAME = "mx.consumer.test"


@pytest.fixture(scope="session")
def mx() -> Any:
    return testinfra.get_host("podman://cons-mx")


@pytest.fixture(scope="session")
def client(mx: Any) -> Any:
    host = testinfra.get_host("podman://cons-client")
    mailcheck.put_file(host, "/tmp/pyqmail-ca.pem", mx.file(mailcheck.CA_PATH).content)
    return host


@pytest.fixture(scope="session")
def playbook_dir() -> Path:
    """The consumer's playbook directory (consumer.sh's WORKDIR/playbook)."""
    return Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "consumer" / "playbook"
