"""``inbound.check``: every check of one message, SPF, DKIM, DMARC and ARC, in one job."""

from __future__ import annotations

import time

from pyqmail.checks import inbound
from pyqmail.checks.resolver import make_resolver
from pyqmail.checks.settings import AuthSettings
from tests.dnsserver import silent_server

SPOOF = b"From: CEO <ceo@mail.bank.test>\r\nTo: u@mx.test\r\nSubject: pay now\r\n\r\nwire it\r\n"


def test_the_job_ends_with_its_budget_when_dns_never_answers():
    """DNS that never answers for the HELO, the sender and the From domain: the job ends
    within ``authtimeout`` (2 s here) with temperror results, so one message's checks never
    hold a check thread past their budget. (DMARC's record lookup once took the resolver's
    whole lifetime after SPF's share: 2.7 s here, 13 s with the defaults.)"""
    with silent_server() as server:
        res = make_resolver([server], timeout=2.0)  # as settings.load: min(authtimeout, 5)
        settings = AuthSettings(enabled=True, authserv_id="mx.test", timeout=2, resolver=res)
        start = time.monotonic()
        outcome = inbound.check(settings, "192.0.2.66", "mx.slow.test", "a@slow.test", SPOOF)
        elapsed = time.monotonic() - start
    assert elapsed < 2.3, elapsed
    assert outcome.verdict.action == "accept"
    assert "spf=temperror" in outcome.verdict.log
    assert "dmarc=temperror" in outcome.verdict.log
