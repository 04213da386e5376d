"""pyqmail-queue: what is queued, for whom, why it is deferred; and a way to flush.

``pyqmail-queue [--root /var/qmail] list``
    one block per message (``new/`` = not picked up yet, ``mess/`` = being delivered): id, age,
    size, sender, then each recipient with its status (pending, deferred, done, failed), the
    time of the last attempt and its last error.
``pyqmail-queue [--root /var/qmail] show ID [--body]``
    the envelope, the delivery records of ``state/ID`` and the message headers (or all of it).
    On a terminal the message's control characters are shown as ``less`` shows them (``^[``
    for ESC, ``<U+009B>`` for a C1 control; TAB and line ends kept): a queued message is
    anyone's text, and escape sequences in it (OSC 52 writes the clipboard, others retitle
    the window or remap keys) would otherwise reach root's terminal. Into a pipe or a file
    the text goes unchanged, for scripts.
``pyqmail-queue [--root /var/qmail] flush``
    sends ALRM to pyqmail-send (the process the kernel says holds the lock on
    ``queue/lock/sendpid``), which retries every deferred recipient now, rescans ``new/``
    and reads again any queue file it could not read. Also pokes the trigger FIFO. Exit 1
    with a message when pyqmail-send is not running.

Run it as root or as pyqmail-send's user: ``mess/`` and ``state/`` are theirs alone (see
"Permissions" in ``pyqmail.queue.store``). It reads the queue through ``pyqmail.queue``
alone (files, state records), never through the daemon's code.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import re
import signal
import struct
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from pyqmail.headers import header_section
from pyqmail.queue.format import QueueError, Stored
from pyqmail.queue.state import Attempt, Ended, Record, Signed, ended_messages, read_state
from pyqmail.queue.store import PIDFILE, Queue
from pyqmail.send.delivery import one_line


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def recipient_status(records: list[Record], count: int) -> list[Attempt | None]:
    """Per recipient: the final attempt if any, else the last deferral, else None (pending)."""
    status: list[Attempt | None] = [None] * count
    for record in records:
        if not isinstance(record, Attempt) or not 0 <= record.rcpt < count:
            continue
        last = status[record.rcpt]
        if last is not None and last.event in ("done", "failed"):
            continue
        status[record.rcpt] = record
    return status


def list_queue(queue: Queue, out: TextIO, now: float | None = None) -> int:
    now = time.time() if now is None else now
    total = 0
    for sub in ("mess", "new"):
        for stored in _messages(queue, sub, out):
            env = stored.env
            queue_id = env.queue_id
            total += 1
            where = "waiting for pickup" if sub == "new" else "in delivery"
            out.write(
                f"{queue_id}  age {_age(now - env.received)}  {env.size} bytes  {where}\n"
                f"  from <{one_line(env.sender)}>\n"
            )
            records = read_state(queue.path("state", queue_id))
            for address, st in zip(
                env.recipients, recipient_status(records, len(env.recipients)), strict=True
            ):
                line = f"  {'pending' if st is None else st.event:8} <{one_line(address)}>"
                if st is not None:
                    line += f"  last try {_age(now - st.time)} ago"
                    if st.detail:
                        line += f"  {one_line(st.detail)}"
                out.write(line + "\n")
    out.write(f"{total} message(s) in the queue\n")
    return 0


def _messages(queue: Queue, sub: str, out: TextIO) -> list[Stored]:
    """The messages of ``sub`` that have not ended (a segment lists its ended ones in
    ``state/<segment id>``); unreadable files are reported on ``out``."""
    found: list[Stored] = []
    for name in queue.ids(sub):
        try:
            stored = queue.load(sub, name)
        except QueueError as exc:
            out.write(f"{name} ({sub}) unreadable: {exc}\n")
            continue
        ended = set()
        if sub == "mess" and stored[0].span is not None:
            ended = ended_messages(queue.path("state", name))
        found.extend(s for s in stored if s.env.queue_id not in ended)
    return found


def _find(queue: Queue, queue_id: str) -> tuple[str, Stored | QueueError] | None:
    """Where message ``queue_id`` is: a file of its own, or a record of a segment."""
    for sub in ("mess", "new", "bad"):
        if queue.path(sub, queue_id).exists():
            try:
                return sub, queue.read_stored(sub, queue_id, None)
            except QueueError as exc:
                return sub, exc
    for sub in ("mess", "new", "bad"):
        for name in queue.ids(sub):
            try:  # bad/ holds files set aside for not being named by their ids, too
                stored = queue.load(sub, name, named=sub != "bad")
            except QueueError:
                continue
            for s in stored:
                if s.env.queue_id != queue_id:
                    continue
                if s.span is not None:
                    return f"{sub}, segment {name}", s
                if sub == "bad":
                    return f"{sub}, file {name}", s
    return None


# C0 controls but TAB and LF (a CR of CRLF is gone before this), DEL, and the C1 controls
# (U+0080-U+009F: a UTF-8 terminal may take U+009B for CSI).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _caret(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x20 or code == 0x7F:
        return "^" + chr(code ^ 0x40)
    return f"<U+{code:04X}>"


def visible(text: str) -> str:
    """``text`` with its control characters made visible the way ``less`` does: what
    ``show`` writes to a terminal (why: the module's docstring)."""
    return _CONTROL.sub(_caret, text)


def show(queue: Queue, queue_id: str, body: bool, out: TextIO) -> int:
    if "/" in queue_id or queue_id.startswith("."):
        out.write(f"invalid queue id {queue_id!r}\n")
        return 2
    found = _find(queue, queue_id)
    if found is None:
        out.write(f"no message {queue_id} in the queue\n")
        return 1
    sub, stored = found
    if isinstance(stored, QueueError):
        out.write(f"{queue_id}: {stored}\n")
        return 1
    env, message = stored.env, stored.body
    out.write(f"id {env.queue_id} ({sub})\nreceived {time.ctime(env.received)}\n")
    out.write(f"from <{one_line(env.sender)}>\n")
    for index, address in enumerate(env.recipients):
        out.write(f"to {index} <{one_line(address)}>\n")
    for key, value in env.meta.items():
        out.write(f"meta {key} {one_line(value)}\n")
    for record in read_state(queue.path("state", queue_id)):
        fields = record.to_json()
        parts = [f"{k}={one_line(str(v))}" for k, v in fields.items() if k not in ("ev", "t")]
        when = time.ctime(0 if isinstance(record, Ended | Signed) else record.time)
        out.write(f"state {when} {fields['ev']} {' '.join(parts)}\n")
    out.write("\n")
    raw = message if body else header_section(message) + b"\r\n"
    text = raw.replace(b"\r\n", b"\n").decode("utf-8", "replace")
    out.write(visible(text) if out.isatty() else text)
    return 0


# struct flock (Linux, 64-bit file offsets): l_type, l_whence, l_start, l_len, l_pid
_FLOCK = "hhqqi4x"


def sender_pid(queue: Queue) -> int | None:
    """The pid of the process holding pyqmail-send's lock on lock/sendpid, as the kernel
    gives it (F_GETLK; ``pyqmail.send.manager.lock_pidfile`` says why this lock); None
    when nobody holds it, 0 when the holder is in a pid namespace this one cannot see.
    Not the pid written in the file: until a starting pyqmail-send writes its own, that is
    the previous instance's. Takes no lock: a shared one taken here once made a
    pyqmail-send starting at that moment exit."""
    path = queue.root / PIDFILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
    finally:
        os.close(fd)
    kind, _, _, _, pid = struct.unpack(_FLOCK, answer)
    return None if kind == fcntl.F_UNLCK else max(pid, 0)


def _alarm(queue: Queue, pid: int) -> bool:
    """SIGALRM to ``pid`` if it still holds pyqmail-send's lock; False if it does not.
    The process is pinned first (a pidfd), then the lock asked about again: a pid that
    was reused since ``sender_pid`` answered is never signalled (ALRM would kill it)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError as exc:  # a kernel without pidfds (before 5.3): ask again, then kill
        if exc.errno != errno.ENOSYS or sender_pid(queue) != pid:
            raise
        os.kill(pid, signal.SIGALRM)
        return True
    try:
        if sender_pid(queue) != pid:
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGALRM)
    finally:
        os.close(pidfd)
    return True


def flush(queue: Queue, out: TextIO) -> int:
    pid = sender_pid(queue)
    if pid == 0:
        out.write("pyqmail-send runs in another pid namespace: run flush in its own\n")
        return 1
    try:
        sent = pid is not None and _alarm(queue, pid)
    except OSError as exc:
        out.write(f"cannot signal pyqmail-send (pid {pid}): {exc.strerror}\n")
        return 1
    if not sent:
        out.write(f"pyqmail-send is not running on {queue.root} (no lock on {PIDFILE})\n")
        return 1
    queue.poke()
    out.write(f"sent ALRM to pyqmail-send (pid {pid}): retrying every deferred delivery now\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyqmail-queue", description="inspect the mail queue")
    parser.add_argument("--root", default=os.environ.get("PYQMAIL_ROOT", "/var/qmail"))
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list queued messages and their recipients' status")
    show_p = sub.add_parser(
        "show",
        help="show one message: envelope, delivery log, headers",
        description="Show one message: envelope, delivery log, headers (or all of it). On a"
        " terminal the message's control characters are shown as less shows them (^[ for"
        " ESC, <U+009B> for a C1 control), so escape sequences in a message cannot act on"
        " the terminal; into a pipe or a file the text is written unchanged.",
    )
    show_p.add_argument("queue_id")
    show_p.add_argument("--body", action="store_true", help="print the whole message")
    sub.add_parser("flush", help="make pyqmail-send retry every deferred delivery now")
    args = parser.parse_args(argv)
    queue = Queue(os.path.join(args.root, "queue"))
    try:
        queue.check()
    except QueueError as exc:
        sys.stderr.write(f"pyqmail-queue: {exc}\n")
        return 2
    try:
        if args.command == "list":
            return list_queue(queue, sys.stdout)
        if args.command == "show":
            return show(queue, args.queue_id, args.body, sys.stdout)
        return flush(queue, sys.stdout)
    except PermissionError as exc:
        sys.stderr.write(
            f"pyqmail-queue: {exc.filename}: {exc.strerror} (mess/ and state/ are pyqmail-send's:"
            " run as root or as its user)\n"
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
