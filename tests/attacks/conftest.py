"""Attack tests reuse the end-to-end harness (a qmail root and pyqmail-smtpd processes).

Every test records how many variants of its class it sent (``tally.tried``); the counts are
printed at the end of the run ("attacks tried").
"""

from __future__ import annotations

import pytest

from tests.attacks.tally import TRIED
from tests.e2e.conftest import qmail_root, smtpd

__all__ = ["qmail_root", "smtpd"]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TRIED:
        return
    terminalreporter.section("attacks tried (variants sent to a running pyqmail-smtpd)")
    for cls, count in sorted(TRIED.items()):
        terminalreporter.write_line(f"{cls:<28} {count}")
    terminalreporter.write_line(f"{'total':<28} {sum(TRIED.values())}")
