"""The threads the inbound authentication checks run in, and which check may take one when.

Why a pool of their own: a check blocks its thread for as long as its DNS takes (up to
``authtimeout``). In the loop's default executor (``min(32, cpus + 4)`` threads: 6 on two
cores, shared with every other blocking job of the worker) one client whose HELO, sender and
From domains point at servers that never answer could hold every thread; another client's
check then waited for a thread until its time was up and was accepted as ``temperror``, so a
spoofed From of a ``p=reject`` domain got through. Here:

- ``THREADS`` threads per worker, for the checks only (made as checks need them: none at
  rest). A thread counts as taken until its job returns, even when ``inbound.run`` stopped
  waiting for it, so a check that is let in starts at once: its time budget is its own;
- ``PER_CLIENT`` of them at most for one client (its address, or its /64 for IPv6:
  ``pyqmail.smtpd.limits.limit_key``): a client's slow DNS waits for its own threads;
- a check that gets no thread within the wait it is given raises ``BusyError``: the message is
  deferred (``451``, ``inbound.busy``), never accepted unchecked. Only a check that ran and
  whose DNS did not answer in time is a ``temperror`` and accepted (RFC 7489 section 6.6.3).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from pyqmail.smtpd.limits import limit_key

T = TypeVar("T")

# A check is DNS waits, not CPU (a few ms of RSA per signature): its threads are cheap and
# made only under load. One client may hold a quarter of them, so it takes four clients
# (addresses or /64s) with DNS that never answers to fill a worker's; what is left over then
# is deferred, not accepted.
THREADS = 16
PER_CLIENT = 4


class BusyError(Exception):
    """No thread came free for a check in time; ``str()`` says why (``busy``: every
    thread of the worker, ``busy-client``: the client's share)."""


class CheckPool:
    """One worker's check threads and who holds them (counted on the loop's thread)."""

    def __init__(self, threads: int = THREADS, per_client: int = PER_CLIENT) -> None:
        self.threads = threads
        self.per_client = per_client
        self.busy = 0  # threads taken, over all clients
        self.clients: dict[str, int] = {}  # threads taken per client key
        self._executor: ThreadPoolExecutor | None = None  # made with the first check
        self._waiters: list[asyncio.Future[None]] = []

    def _free(self, key: str) -> bool:
        """Room for one more check of ``key``'s: a free thread, and the client under its
        share."""
        return self.busy < self.threads and self.clients.get(key, 0) < self.per_client

    async def _take(self, key: str, wait: float) -> None:
        """A thread for ``key``, waiting at most ``wait`` seconds for one (else BusyError).
        Every release wakes every waiter, each looks again: there are at most as many
        waiters as sessions in DATA, and a release is one check's end."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while not self._free(key):
            woken: asyncio.Future[None] = loop.create_future()
            self._waiters.append(woken)
            try:
                async with asyncio.timeout_at(deadline):
                    await woken
            except TimeoutError:
                full = self.clients.get(key, 0) >= self.per_client
                raise BusyError("busy-client" if full else "busy") from None
            finally:
                self._waiters.remove(woken)
        self.busy += 1
        self.clients[key] = self.clients.get(key, 0) + 1

    def _release(self, key: str) -> None:
        """A job ended (on the loop): its thread is free for the next check."""
        self.busy -= 1
        left = self.clients[key] - 1
        if left:
            self.clients[key] = left
        else:
            del self.clients[key]
        for woken in self._waiters:
            if not woken.done():
                woken.set_result(None)

    async def start(
        self, ip: str, wait: float, func: Callable[..., T], *args: object
    ) -> asyncio.Future[T]:
        """``func(*args)`` started in a thread for client ``ip``'s check once one is free
        for it (``BusyError`` after ``wait`` seconds); the future of its result."""
        key = limit_key(ip)
        await self._take(key, wait)
        loop = asyncio.get_running_loop()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.threads, "authcheck")
        try:
            job = self._executor.submit(func, *args)
        except BaseException:  # shut down meanwhile: nothing runs, nothing to hold
            self._release(key)
            raise

        def ended(_job: Future[T]) -> None:  # in the check's thread
            # RuntimeError: the worker's loop is gone, nobody counts any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._release, key)

        job.add_done_callback(ended)
        return asyncio.wrap_future(job, loop=loop)

    def shutdown(self) -> None:
        """The worker stops: jobs not started are dropped, running ones end on their own
        deadline (the interpreter joins them at exit)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
