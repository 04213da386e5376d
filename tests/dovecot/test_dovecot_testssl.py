"""testssl.sh against Dovecot's IMAPS (993) and POP3S (995) with the role's TLS settings.

Same judge as the SMTP listeners (tests/reliability/test_testssl.py): nothing above LOW,
SSLv2/3 and TLS 1.0/1.1 not offered, TLS 1.2 and 1.3 offered. The server certificate is the
production-like leaf (90 days, revocation URIs) that test uses, in servercert.pem.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import PKI
from tests.dovecot.conftest import MailHost, StartDovecot
from tests.reliability.test_testssl import FULL, QUICK, judge, production_like_leaf, run_testssl


@pytest.fixture
def ports(mailhost: MailHost, dovecot: StartDovecot, pki: PKI) -> dict[str, int]:
    mailhost.add("alice", "alice-password-1")
    mailhost.qroot.servercert(production_like_leaf(pki.ca))
    return dovecot().ports


def test_testssl_quick_imaps_and_pop3s(ports: dict[str, int], pki: PKI, tmp_path: Path) -> None:
    start = time.monotonic()
    for name in ("imaps", "pop3s"):
        findings = run_testssl(ports[name], False, QUICK, pki.ca_file, tmp_path / f"{name}.json")
        judge(f"quick {name}", findings)
    print(f"testssl quick imaps+pop3s: {time.monotonic() - start:.0f}s")


@pytest.mark.slow
def test_testssl_full_imaps_and_pop3s(ports: dict[str, int], pki: PKI, tmp_path: Path) -> None:
    total: Counter[str] = Counter()
    for name in ("imaps", "pop3s"):
        findings = run_testssl(ports[name], False, FULL, pki.ca_file, tmp_path / f"{name}.json")
        total += judge(f"full {name}", findings)
    print(f"testssl full imaps+pop3s: totals {dict(total)}")
