"""``inbound.run`` when a check job overruns its time: the sender chooses how much work a
message costs (DKIM body hashes, ARC sets of a large message), so an overrun must not switch
DMARC off. DMARC's verdict, once computed, is applied even when ARC after it overran; a job
that overran before DMARC's verdict is deferred (451 4.7.0), not accepted as a temperror
(the old ``unanswered`` accepted both with dmarc=temperror and auth_error=timeout)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from pyqmail.checks import arcverify, dkimverify, inbound
from pyqmail.checks.checkpool import CheckPool
from pyqmail.checks.resolver import make_resolver
from pyqmail.checks.settings import AuthSettings
from tests.dnsserver import DnsServer, silent_server

ZONES = {
    "bank.test.": '_dmarc TXT "v=DMARC1; p=reject"\n@ TXT "v=spf1 -all"\n',
    "shop.test.": '_dmarc TXT "v=DMARC1; p=quarantine"\n@ TXT "v=spf1 -all"\n',
    "attacker.test.": '@ TXT "v=spf1 +all"\n',
}
CLIENT = "192.0.2.66"


def spoof(domain: str) -> bytes:
    """A From of ``domain`` sent by someone else, unsigned: DMARC fails."""
    return (
        f"From: CEO <ceo@{domain}>\r\nTo: u@mx.test\r\nSubject: pay now\r\n\r\nwire it\r\n"
    ).encode()


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsServer]:
    with DnsServer(ZONES) as server:
        yield server


@pytest.fixture
def settings(dns_server: DnsServer) -> AuthSettings:
    res = make_resolver([(dns_server.host, dns_server.port)], timeout=1.0)
    return AuthSettings(enabled=True, authserv_id="mx.test", timeout=1, resolver=res)


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Lets a stalled check thread go once the test is done with it."""
    event = threading.Event()
    yield event
    event.set()


def stalled(release: threading.Event, then: Callable[..., object]) -> Callable[..., object]:
    """A check step that holds its thread until ``release`` (far past ``run``'s wait: a
    large message's hashes on a loaded host), then does what ``then`` does."""

    def step(*args: object, **kwargs: object) -> object:
        release.wait(30)
        return then(*args, **kwargs)

    return step


def run(settings: AuthSettings, message: bytes) -> tuple[inbound.Outcome, float]:
    """``inbound.run`` of ``message`` on a pool of its own, and how long it took."""

    async def scenario() -> tuple[inbound.Outcome, float]:
        pool = CheckPool(threads=2, per_client=2)
        start = time.monotonic()
        outcome = await inbound.run(
            settings, CLIENT, "mx.attacker.test", "a@attacker.test", message, pool=pool
        )
        elapsed = time.monotonic() - start
        pool.shutdown()
        return outcome, elapsed

    return asyncio.run(scenario())


def test_dmarc_reject_stands_when_arc_after_it_overruns(settings, release, monkeypatch):
    """DMARC failed a p=reject From in the thread, then ARC ran on past ``run``'s wait:
    550 5.7.1 as without the overrun (was: 250, dmarc=temperror)."""
    monkeypatch.setattr(arcverify, "verify", stalled(release, arcverify.verify))
    outcome, elapsed = run(settings, spoof("bank.test"))
    assert outcome.verdict.action == "refuse"
    assert outcome.verdict.code == 550
    assert outcome.verdict.text.startswith("5.7.1 DMARC policy of bank.test")
    assert "dmarc=fail" in outcome.verdict.log
    assert "auth_error=timeout" in outcome.verdict.log
    assert 1.9 < elapsed < 2.6, elapsed


def test_dmarc_quarantine_stands_and_the_header_says_what_was_known(settings, release, monkeypatch):
    """The same for p=quarantine: Junk, and our header has the results DMARC's verdict was
    made of (no arc= result: ARC was never finished)."""
    monkeypatch.setattr(arcverify, "verify", stalled(release, arcverify.verify))
    outcome, _ = run(settings, spoof("shop.test"))
    assert outcome.verdict.action == "accept"
    assert outcome.junk
    head = outcome.message.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"Authentication-Results: mx.test;")
    assert b"dmarc=fail" in head
    assert b"spf=pass smtp.mailfrom=attacker.test" in head
    assert b"\tarc=" not in head


def test_a_job_that_overruns_before_dmarc_is_deferred(settings, release, monkeypatch):
    """DKIM (before DMARC) ran on past ``run``'s wait: 451 4.7.0, the client tries again
    (was: 250 with dmarc=temperror, a p=reject spoof delivered)."""
    monkeypatch.setattr(dkimverify, "verify", stalled(release, dkimverify.verify))
    outcome, elapsed = run(settings, spoof("bank.test"))
    assert outcome.verdict.action == "defer"
    assert outcome.verdict.code == 451
    assert outcome.verdict.text.startswith("4.7.0 ")
    assert outcome.verdict.log == "auth_error=timeout"
    assert 1.9 < elapsed < 2.6, elapsed


def test_a_dmarc_temperror_after_the_deadline_is_the_overrun_not_dns(monkeypatch):
    """DKIM's work took the job past its deadline, DMARC's lookup then got its last 0.1 s
    and did not make it: that temperror is the overrun's doing, deferred (was: accepted)."""
    real = dkimverify.verify

    def slow(*args: object, **kwargs: object) -> object:
        time.sleep(1.0)  # SPF's share of dead DNS (1/3 s) and this: past the 1 s deadline
        return real(*args, **kwargs)

    monkeypatch.setattr(dkimverify, "verify", slow)
    with silent_server() as server:
        res = make_resolver([server], timeout=1.0)
        settings = AuthSettings(enabled=True, authserv_id="mx.test", timeout=1, resolver=res)
        outcome, elapsed = run(settings, spoof("bank.test"))
    assert outcome.verdict.action == "defer"
    assert outcome.verdict.code == 451
    assert outcome.verdict.log == "auth_error=overrun"
    assert elapsed < 1.9, elapsed  # the job's own answer, not run's timeout


def test_a_dmarc_temperror_after_work_that_ended_just_in_time_is_the_overrun(monkeypatch):
    """DKIM's work ended just before the deadline, leaving DMARC's lookup less than DNS
    alone would have: its temperror is the work's doing too (was: accepted)."""
    real = dkimverify.verify

    def slow(*args: object, **kwargs: object) -> object:
        time.sleep(1.0)  # after SPF's 2/3 s of dead DNS: ends some 0.3 s before the 2 s
        return real(*args, **kwargs)

    monkeypatch.setattr(dkimverify, "verify", slow)
    with silent_server() as server:
        res = make_resolver([server], timeout=2.0)
        settings = AuthSettings(enabled=True, authserv_id="mx.test", timeout=2, resolver=res)
        outcome, _ = run(settings, spoof("bank.test"))
    assert (outcome.verdict.code, outcome.verdict.log) == (451, "auth_error=overrun")


def test_a_failing_step_after_dmarc_keeps_its_verdict(settings, monkeypatch):
    """ARC raising (a library's bug a message may trigger) after DMARC failed the From:
    still 550 (was: 250, dmarc=temperror); before DMARC it is deferred like an overrun."""

    def broken(*_args: object, **_kwargs: object) -> object:
        raise AttributeError("dkimpy tripped")

    monkeypatch.setattr(arcverify, "verify", broken)
    refused, _ = run(settings, spoof("bank.test"))
    monkeypatch.setattr(dkimverify, "verify", broken)
    deferred, _ = run(settings, spoof("bank.test"))
    assert (refused.verdict.code, deferred.verdict.code) == (550, 451)
    assert "auth_error=AttributeError" in refused.verdict.log
    assert deferred.verdict.log == "auth_error=AttributeError"
