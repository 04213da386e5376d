"""Attack tests reuse the end-to-end harness (a qmail root and pyqmail-smtpd processes)."""

from tests.e2e.conftest import qmail_root, smtpd

__all__ = ["qmail_root", "smtpd"]
