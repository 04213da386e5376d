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

from tests.attacks.tally import TRIED
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


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A pytest-xdist worker hands its attack counts to the controller, which prints them."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["attacks_tried"] = dict(TRIED)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    """pytest-xdist's controller: add up what each worker tried (see pytest_sessionfinish)."""
    for cls, count in getattr(node, "workeroutput", {}).get("attacks_tried", {}).items():
        TRIED[cls] += count


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How many variants of each attack class the run sent (tests/attacks/tally.py)."""
    if not TRIED:
        return
    terminalreporter.section("attacks tried (variants sent to a running pyqmail-smtpd)")
    for cls, count in sorted(TRIED.items()):
        terminalreporter.write_line(f"{cls:<28} {count}")
    terminalreporter.write_line(f"{'total':<28} {sum(TRIED.values())}")


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
