"""The scanners the scanning tests share: one real rspamd and one real clamd per session
(``tests/scanners.py``: about a second each to start), and the e2e harness's fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.conftest import qmail_root, smtpd
from tests.scanners import Clamd, Rspamd

__all__ = ["clamd_server", "qmail_root", "rspamd_server", "smtpd"]


@pytest.fixture(scope="session")
def rspamd_server() -> Iterator[Rspamd]:
    with Rspamd() as server:
        yield server


@pytest.fixture(scope="session")
def clamd_server() -> Iterator[Clamd]:
    with Clamd() as server:
        yield server
