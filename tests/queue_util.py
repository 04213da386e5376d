"""Test helpers over the queue's public API: commit through pyqmail-smtpd's own group
commit path, and list what a queue directory holds."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from pyqmail.log import log
from pyqmail.queue.commit import CommitResult, Committer
from pyqmail.queue.format import Envelope, QueueError, Stored
from pyqmail.queue.store import Queue
from pyqmail.queue.writer import QueueWriter


def commit(writers: Sequence[QueueWriter], timeout: float = 30) -> list[Envelope | QueueError]:
    """Commit ``writers`` the way pyqmail-smtpd does: each finished on the loop (a failure
    there is that message's answer, as in ``Session``), all submitted in one loop pass to a
    real ``Committer`` (so the held ones share one segment), and every answer awaited.
    Returns, per writer in order, its envelope or the QueueError that refused it. Held
    writers share a segment only if they share one ``Queue`` object (the committer groups by
    queue, as a HUP may change it), as every session of a pyqmail-smtpd worker does."""

    async def run() -> list[Envelope | QueueError]:
        loop = asyncio.get_running_loop()
        committer = Committer(loop, log=log)
        futures: list[asyncio.Future[CommitResult]] = []
        try:
            for w in writers:
                fut: asyncio.Future[CommitResult] = loop.create_future()
                futures.append(fut)
                try:
                    w.finish()
                except QueueError as exc:
                    fut.set_result(exc)
                    continue
                committer.submit(w, fut.set_result)
            return list(await asyncio.wait_for(asyncio.gather(*futures), timeout))
        finally:
            committer.stop(timeout)

    return asyncio.run(run())


def messages(queue: Queue, sub: str) -> list[tuple[str, Stored]]:
    """Every message in ``sub`` with the name of its file, oldest file first (raises
    QueueError on the first file that does not verify)."""
    return [(name, s) for name in queue.ids(sub) for s in queue.load(sub, name)]
