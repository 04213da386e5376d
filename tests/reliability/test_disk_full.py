"""Disk full and I/O errors while queueing: ``451``, never ``250``; recovery without restart.

The queue directory of a throw-away qmail root is a small tmpfs mounted for the test (root
only; skipped with the reason otherwise) and unmounted in teardown. Faults:

- no space at all (a filler file takes every block) - the tmp file cannot even get its header;
- space for the header but not the message (runs out in the middle of DATA);
- no inodes left (``nr_inodes``) - the tmp file cannot be created;
- the filesystem remounted read-only (EROFS, what an ext4 I/O error turns into).

Each time: the client gets ``451 4.3.0`` after DATA, nothing is left in ``tmp/`` or ``new/``,
and the session stays usable; once the fault is gone the same daemon queues (``250``).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.queue.store import Queue
from tests.attacks.wire import Wire
from tests.conftest import IMPOSSIBLE_HERE
from tests.e2e.conftest import DROP_USER, IS_ROOT, QmailRoot, StartDaemon
from tests.e2e.helpers import MESSAGE

SIZE = 4 * 1024 * 1024


class SmallQueue:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def mount(self, options: str) -> None:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "pyqmail-test-queue", str(self.path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            pytest.skip(
                f"{IMPOSSIBLE_HERE} cannot mount a tmpfs for the queue: {proc.stderr.strip()}"
            )
        Queue(self.path).create()
        if IS_ROOT:
            pw = pwd.getpwnam(DROP_USER)
            for p in [self.path, *self.path.rglob("*")]:
                os.chown(p, pw.pw_uid, pw.pw_gid)

    def fill(self, leave: int = 0) -> None:
        """Take every free block but ``leave`` bytes (as root: no reserved blocks on tmpfs)."""
        st = os.statvfs(self.path)
        want = st.f_bavail * st.f_frsize - leave
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (want, 4096, 4096, 4096) if leave == 0 else (want,):
                with contextlib.suppress(OSError):
                    os.write(fd, b"\0" * max(0, size))
        finally:
            os.close(fd)
        if leave == 0:
            assert os.statvfs(self.path).f_bavail == 0

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def remount(self, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], check=True)

    def umount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)

    def leftovers(self) -> dict[str, list[str]]:
        return {
            sub: os.listdir(self.path / sub)
            for sub in ("tmp", "new")
            if os.listdir(self.path / sub)
        }


@pytest.fixture
def small_queue(qmail_root: QmailRoot) -> Iterator[SmallQueue]:
    if not IS_ROOT:
        pytest.skip(f"{IMPOSSIBLE_HERE} mounting a tmpfs needs root")
    q = SmallQueue(qmail_root.path / "queue")
    yield q
    q.umount()


def send(port: int, body: bytes) -> list[int]:
    """One session with two attempts; the codes after DATA (session must stay usable)."""
    codes = []
    with Wire(port) as w:
        assert w.reply()[0] == 220
        assert w.cmd("EHLO client.test")[0] == 250
        for _ in range(2):
            assert w.cmd("MAIL FROM:<sender@remote.test>")[0] == 250
            assert w.cmd("RCPT TO:<user@example.test>")[0] == 250
            assert w.cmd("DATA")[0] == 354
            w.send(body)
            code, text = w.cmd(b".")
            if code != 250:
                assert text.startswith("451 4.3.0"), text
            codes.append(code)
        assert w.cmd("QUIT")[0] == 221
    return codes


BIG = MESSAGE + b"x" * 998 + b"\r\n" + (b"y" * 78 + b"\r\n") * 12_000  # about 1 MB


@pytest.mark.parametrize("fault", ["no-space", "mid-message", "no-inodes", "read-only"])
def test_queue_fault_gives_451_then_recovers(
    small_queue: SmallQueue, smtpd: StartDaemon, fault: str
) -> None:
    small_queue.mount(f"size={SIZE},nr_inodes={64 if fault == 'no-inodes' else 4096},mode=0750")
    d = smtpd(workers=1)
    assert send(d.port, MESSAGE) == [250, 250]
    for qid in os.listdir(small_queue.path / "new"):  # keep the small fs empty
        (small_queue.path / "new" / qid).unlink()

    if fault == "no-space":
        small_queue.fill()
        body = MESSAGE
    elif fault == "mid-message":
        small_queue.fill(leave=64 * 1024)
        body = BIG
    elif fault == "no-inodes":
        n = 0
        with contextlib.suppress(OSError):
            while True:
                (small_queue.path / f"inode-{n}").touch()
                n += 1
        body = MESSAGE
    else:
        small_queue.remount("ro")
        body = MESSAGE

    codes = send(d.port, body)
    assert codes == [451, 451], f"{fault}: replies after DATA {codes} (must be 451, never 250)"
    assert small_queue.leftovers() == {}, f"{fault}: half-written files left"
    d.wait_for(r"queue-fail ")

    if fault == "read-only":
        small_queue.remount("rw")
    elif fault == "no-inodes":
        for p in small_queue.path.glob("inode-*"):
            p.unlink()
    else:
        small_queue.free()
    assert send(d.port, body) == [250, 250], f"{fault}: no recovery without restart"
    assert d.proc.poll() is None
    assert len(os.listdir(small_queue.path / "new")) == 2
    assert small_queue.leftovers().get("tmp") is None
