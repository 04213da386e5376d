"""The inbound checks' own threads (pyqmail.checks.checkpool) and ``inbound.run`` on them.

The review's scenario: a client keeps every check thread busy with messages whose DNS never
answers, then sends a From of a p=reject domain. That check must not be accepted as a
temperror because it never started: it is deferred (451). A check that did start and whose
DNS did not answer stays a temperror, accepted, within its budget.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from pyqmail.checks import inbound
from pyqmail.checks.checkpool import BusyError, CheckPool
from pyqmail.checks.resolver import make_resolver
from pyqmail.checks.settings import AuthSettings
from tests.dnsserver import silent_server

SPOOF = b"From: CEO <ceo@mail.bank.test>\r\nTo: u@mx.test\r\nSubject: pay now\r\n\r\nwire it\r\n"
ATTACKER = "192.0.2.66"
VICTIM_CLIENT = "198.51.100.7"


@pytest.fixture
def settings() -> Iterator[AuthSettings]:
    """Checks with a one-second budget against DNS that never answers (the resolver as
    ``settings.load`` makes it: its lifetime the budget, at most 5 s)."""
    with silent_server() as server:
        res = make_resolver([server], timeout=1.0)
        yield AuthSettings(enabled=True, authserv_id="mx.test", timeout=1, resolver=res)


async def _hold(pool: CheckPool, ip: str, release: threading.Event) -> asyncio.Future[bool]:
    """A check of ``ip``'s that holds its thread until ``release`` (slow DNS, say)."""
    return await pool.start(ip, 0, release.wait, 30)


def test_a_check_that_finds_no_thread_is_deferred_not_accepted(settings):
    """Every thread held by another client: the spoof gets 451 after the budget, not
    250 with dmarc=temperror (the old shared pool accepted it: auth_error=timeout)."""

    async def scenario() -> tuple[inbound.Outcome, float]:
        pool = CheckPool(threads=2, per_client=2)
        release = threading.Event()
        held = [await _hold(pool, ATTACKER, release) for _ in range(2)]
        start = time.monotonic()
        outcome = await inbound.run(
            settings, VICTIM_CLIENT, "mx.attacker.test", "a@attacker.test", SPOOF, pool=pool
        )
        elapsed = time.monotonic() - start
        release.set()
        await asyncio.gather(*held)
        pool.shutdown()
        return outcome, elapsed

    outcome, elapsed = asyncio.run(scenario())
    assert outcome.verdict.action == "defer"
    assert outcome.verdict.code == 451
    assert outcome.verdict.text.startswith("4.3.0 ")
    assert outcome.verdict.log == "auth_error=busy"
    assert 0.9 < elapsed < 1.5, elapsed


def test_a_check_that_ran_into_dead_dns_is_temperror_within_its_budget(settings):
    """A check that started keeps RFC 7489's answer to DNS trouble (temperror, accepted),
    and its own lookups, DMARC's included, end with its budget: it neither holds its thread
    longer nor runs into ``run``'s timeout (the old DMARC lookup took the resolver's
    lifetime on top of SPF's share: auth_error=timeout)."""

    async def scenario() -> tuple[inbound.Outcome, float, int]:
        pool = CheckPool(threads=1, per_client=1)
        start = time.monotonic()
        outcome = await inbound.run(
            settings, VICTIM_CLIENT, "mx.client.test", "a@client.test", SPOOF, pool=pool
        )
        elapsed = time.monotonic() - start
        await asyncio.sleep(0.05)
        busy = pool.busy
        pool.shutdown()
        return outcome, elapsed, busy

    outcome, elapsed, busy = asyncio.run(scenario())
    assert outcome.verdict.action == "accept"
    assert "dmarc=temperror" in outcome.verdict.log
    assert "auth_error" not in outcome.verdict.log
    assert outcome.message.startswith(b"Authentication-Results: mx.test;")
    assert elapsed < 1.6, elapsed
    assert busy == 0  # the thread is free again


def test_one_client_holds_at_most_its_share():
    """A client at its share waits (then ``busy-client``) while another client still gets
    a thread at once; the addresses of one IPv6 /64 are one client."""

    async def scenario() -> tuple[str, str, bool]:
        pool = CheckPool(threads=4, per_client=1)
        release = threading.Event()
        held = [await _hold(pool, ATTACKER, release), await _hold(pool, "2001:db8::1", release)]
        with pytest.raises(BusyError) as same:
            await pool.start(ATTACKER, 0.2, release.wait, 30)
        with pytest.raises(BusyError) as neighbour:
            await pool.start("2001:db8::2", 0.2, release.wait, 30)
        other = await pool.start(VICTIM_CLIENT, 0.2, lambda: True)
        ran = await other
        release.set()
        await asyncio.gather(*held)
        pool.shutdown()
        return str(same.value), str(neighbour.value), ran

    assert asyncio.run(scenario()) == ("busy-client", "busy-client", True)


def test_a_thread_stays_taken_until_its_job_ends():
    """``run`` giving up on a job does not free its thread (the thread still works on it):
    the next check waits for the job's end, then gets the thread."""

    async def scenario() -> tuple[int, int, bool]:
        pool = CheckPool(threads=1, per_client=1)
        release = threading.Event()
        job = await _hold(pool, ATTACKER, release)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(job, 0.05)  # cancels our future, not the thread's work
        still = pool.busy
        asyncio.get_running_loop().call_later(0.2, release.set)
        later = await pool.start(VICTIM_CLIENT, 2, lambda: True)
        ran = await later
        await asyncio.sleep(0.05)
        after = pool.busy
        pool.shutdown()
        return still, after, ran

    assert asyncio.run(scenario()) == (1, 0, True)
