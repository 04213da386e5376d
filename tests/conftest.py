"""Fixtures shared by every test: real certificates generated once per session.

Under CI (``CI=true``) a skipped test is a failure: a skip there almost always means a tool or
package that the project's install scripts forgot, which a green run would hide. A test may
still skip for something that cannot exist on this kind of machine; its reason must then start
with ``IMPOSSIBLE_HERE`` and say why.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.pki import CA, Issued

IMPOSSIBLE_HERE = "not possible on this kind of machine:"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes") or not report.skipped:
        return
    if hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if IMPOSSIBLE_HERE in reason:
        return
    report.outcome = "failed"
    report.longrepr = (
        f"{item.nodeid} skipped under CI, which allows no skip for a missing tool or package: "
        f"{reason.removeprefix('Skipped: ')}"
    )


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
