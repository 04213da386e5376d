"""Attack tests reuse the end-to-end harness (a qmail root and pyqmail-smtpd processes).

Every test records how many variants of its class it sent (``tally.tried``); the counts are
printed at the end of the run ("attacks tried", tests/conftest.py, which also adds up the counts
of every pytest-xdist worker).
"""

from __future__ import annotations

from tests.e2e.conftest import qmail_root, smtpd

__all__ = ["qmail_root", "smtpd"]
