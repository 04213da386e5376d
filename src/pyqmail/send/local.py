"""Local delivery (qmail-local): Maildir deliveries and forwards for one local recipient.

Maildir durability protocol (``maildir_deliver``), as in qmail-local and the Maildir spec:

1. create ``tmp/<unique>`` with O_EXCL (unique = time, microseconds, pid, counter, random
   and host name), write ``Return-Path`` + ``Delivered-To`` + the message with LF line ends;
2. ``fsync(file)``, ``link(tmp/<unique>, new/<unique>)``, ``unlink(tmp/<unique>)``;
3. ``fsync(new/)``, shared by the deliveries that run at once into the same Maildir
   (``pyqmail.queue.dirsync.DirSync``: an fsync started after a delivery's link covers
   it, so a thread whose link an in-flight fsync may have missed waits for it, then one of
   the waiting threads runs the next fsync for all of them; if it fails, every delivery it
   was for is deferred). Only then is the recipient reported done (and
   recorded in the queue state by pyqmail-send). A crash before 3 at worst leaves a
   stale tmp file that mail readers ignore and clean up; a crash after 3 but before the
   state is written delivers the message again on restart (a duplicate, never a loss).

Forwards are re-queued as one new message (``Queue.enqueue``, itself durable) to all the
forwarding addresses of the ``.qmail`` file, with the same envelope sender and a
``Delivered-To`` line prepended so that a loop is detected when it comes back.

A missing Maildir is created (mode 0700: ``cur`` and ``new``, synced, then ``tmp``, so that
a delivery that can use ``tmp`` finds ``new`` durable; a ``tmp`` without ``new`` is made
whole) when its parent directory exists; otherwise delivery is deferred so that a
not-yet-provisioned home loses nothing.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from pyqmail.control.send import Control
from pyqmail.headers import header_fields
from pyqmail.queue.dirsync import DirSync, fsync_dir
from pyqmail.queue.format import Envelope, QueueError
from pyqmail.queue.store import Queue
from pyqmail.queue.writeall import write_all
from pyqmail.send.delivery import Result, split_address
from pyqmail.send.dotqmail import Instruction, Mailboxes, MailboxesError, Plan, resolve

_counter = itertools.count()
# The Maildir++ folder a quarantined message goes to: the name Dovecot's configuration marks
# \Junk (roles/pyqmail_dovecot) and the mailbox role creates in every mailbox; a test holds
# the three together (tests/roles/test_junk_folder.py).
JUNK_FOLDER = "Junk"
_HOST = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
# The queue meta that decides how a message is delivered, which a forwarded copy keeps:
# ``junk`` (a DMARC quarantine or a scanner's Junk verdict: ``.Junk`` at the final mailbox,
# however many aliases lie between) and ``smtputf8`` (remote delivery uses SMTPUTF8:
# ``pyqmail.send.remote.needs_smtputf8``). The rest says how the original arrived (client,
# helo, auth, tls) or what it was (``origin``: the copy is not signed again, its signatures
# travel in front of it; ``bounce_of``), and is not the copy's to claim.
# tests/checks/test_junk.py holds this list to every ``meta.get`` of the delivery code.
FORWARDED_META = ("junk", "smtputf8")


def _ensure_maildir(maildir: Path) -> None:
    """Create the Maildir, ``tmp/`` last, once ``new/`` and the Maildir itself are durable.

    The child's threads deliver at once: the first jobs for a new mailbox all come here,
    and the others use the Maildir as soon as ``tmp/`` exists. Made ``tmp/`` first, a
    delivery could write its file there and then find no ``new/`` to link it into (a
    deferral, found as a 100 s round of ``bench/e2e_throughput.py``), or link it before
    the fsyncs that make ``new/`` durable had run. This order leaves neither window; every
    caller runs the mkdirs (each may find it done) and the fsyncs itself.
    """
    if (maildir / "new").is_dir() and (maildir / "tmp").is_dir():
        return
    if not maildir.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "home directory does not exist", str(maildir.parent))
    for sub in ("", "cur", "new"):
        with contextlib.suppress(FileExistsError):
            os.mkdir(maildir / sub, 0o700)
    if not (maildir / "new").is_dir():  # a file in its place: say so, before tmp/
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(maildir / "new"))
    fsync_dir(maildir)
    fsync_dir(maildir.parent)
    with contextlib.suppress(FileExistsError):
        os.mkdir(maildir / "tmp", 0o700)
    fsync_dir(maildir)


def _create_tmp(maildir: str, name: str) -> int:
    path = os.path.join(maildir, "tmp", name)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


def maildir_deliver(maildir: str | os.PathLike[str], data: bytes) -> str:
    """Deliver ``data`` into ``maildir`` durably; return the file name in new/."""
    md = os.fspath(maildir).rstrip("/")
    now = time.time()
    sec, usec = int(now), int(now * 1_000_000) % 1_000_000
    # Unique on this host by time, pid and counter already; the random part only keeps
    # hosts sharing a Maildir apart, so ``random`` (reseeded in forked children) does,
    # without a getrandom() syscall per delivery.
    name = f"{sec}.M{usec}P{os.getpid()}Q{next(_counter)}R{random.getrandbits(64):016x}.{_HOST}"
    try:
        fd = _create_tmp(md, name)
    except FileNotFoundError:  # first delivery: create the Maildir (if its parent exists)
        _ensure_maildir(Path(md))
        fd = _create_tmp(md, name)
    tmp = os.path.join(md, "tmp", name)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        new = DirSync.of(os.path.join(md, "new"))
        try:
            ticket = new.ticket()  # before the link: an fsync of new/ failing after it fails us
        except FileNotFoundError:  # tmp/ without new/ (made by hand, or half made before)
            _ensure_maildir(Path(md))
            ticket = new.ticket()
        os.link(tmp, os.path.join(md, "new", name))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.unlink(tmp)
    new.sync(ticket)
    return name


def _return_path(sender: str) -> str:
    return f"<{sender}>"


def _failed(exc: Exception, done: list[str]) -> Result:
    """A temporary failure that says what was delivered before it."""
    partial = f" after {'; '.join(done)}" if done else ""
    return Result.temp(f"local delivery failed: {exc}{partial} (#4.3.0)", "4.3.0")


@dataclass(frozen=True)
class Forward:
    """What a local delivery leaves to the queue's owner: re-queue the message to
    ``recipients`` with a ``Delivered-To: delivered_to`` line prepended. ``done`` lists what
    was delivered before (Maildirs), ``source`` the ``.qmail`` file or mailbox that said so.

    The local delivery child cannot write the queue (``pyqmail.send.spawn``): it returns
    this, and the manager calls ``LocalDelivery.forward``."""

    recipients: tuple[str, ...]
    delivered_to: str
    done: tuple[str, ...]
    source: str


class LocalDelivery:
    """Delivers one recipient of one queued message according to its ``.qmail`` file.

    ``queue`` is needed for forwards only (``forward``); the local delivery child has none.
    """

    def __init__(self, control: Control, queue: Queue | None) -> None:
        self.control = control
        self.queue = queue
        self.mailboxes = Mailboxes(control.mailboxes_file)

    def plan(self, recipient: str) -> Plan | Result:
        """Where ``recipient`` goes. ``postmaster`` of a virtual domain that has none of
        its own (its ``prefix-postmaster`` unknown) is the local postmaster: pyqmail-smtpd
        accepts postmaster in every domain (RFC 5321 4.5.1), and a bounce would go to a
        sender who wrote to the one address that must always work."""
        local = self.control.is_local(recipient)
        if local is None:
            return Result.perm(f"{recipient} is not a local address (#5.1.2)", "5.1.2")
        name, domain = split_address(recipient)
        domain = domain or self.control.me.lower()
        try:
            boxes = self.mailboxes.get()
        except (MailboxesError, OSError, UnicodeDecodeError) as exc:
            return Result.temp(f"mailboxes file unusable: {exc} (#4.3.0)", "4.3.0")
        alias_dir, me = self.control.alias_dir, self.control.me
        found = resolve(local, f"{local.lower()}@{domain}", boxes, alias_dir, me)
        virtual_postmaster = name.lower() == "postmaster" and local.lower() != "postmaster"
        if virtual_postmaster and isinstance(found, Result) and found.status == "5.1.1":
            return resolve("postmaster", f"postmaster@{domain}", boxes, alias_dir, me)
        return found

    def deliver(self, env: Envelope, message: bytes, recipient: str) -> Result:
        """Deliver everything, forwards included (needs ``queue``)."""
        step = self.deliver_mailboxes(env, message, recipient)
        return step if isinstance(step, Result) else self.forward(env, message, step)

    def deliver_mailboxes(self, env: Envelope, message: bytes, recipient: str) -> Result | Forward:
        """Everything but the queue: the Maildirs, then what is left to forward (if any)."""
        plan = self.plan(recipient)
        if isinstance(plan, Result):
            return plan
        delivered_to = plan.delivered_to
        looping = self._looping(message, delivered_to)
        if looping is not None:
            return looping
        refused = [i for i in plan.instructions if i.kind == "refused"]
        if refused:
            return Result.perm(refused[0].target + " (#5.7.1)", "5.7.1")
        return self._execute(env, message, plan, delivered_to)

    def _looping(self, message: bytes, delivered_to: str) -> Result | None:
        """qmail-local's loop check (our own Delivered-To line is already there) and the hop
        limit: ``maxhops`` plus the Received line this host added when it took the message
        in (pyqmail-smtpd let ``maxhops`` through). Reads the bounded header section once."""
        fields = header_fields(message)
        mine = delivered_to.lower().encode("utf-8", "surrogateescape")
        if any(name == "delivered-to" and value.lower() == mine for name, value in fields):
            return Result.perm(
                f"this message is looping: it already has my Delivered-To line "
                f"({delivered_to}) (#5.4.6)",
                "5.4.6",
            )
        limit = self.control.maxhops + 1
        hops = sum(1 for name, _ in fields if name in ("received", "delivered-to"))
        if hops > limit:
            return Result.perm(f"too many hops ({hops}, over {limit}); looping? (#5.4.6)", "5.4.6")
        return None

    def _execute(
        self, env: Envelope, message: bytes, plan: Plan, delivered_to: str
    ) -> Result | Forward:
        """Deliver into the plan's Maildirs, then hand back its forwards. A plan without
        instructions (a ``.qmail`` of comments only, its first line one of them: one whose
        first line is blank never gets here, ``pyqmail.send.dotqmail`` defers it) delivers
        nowhere, as qmail does: the message is done, logged as discarded by that file."""
        if not plan.instructions:
            return Result.ok(f"discarded: {plan.source} has no delivery instruction")
        done: list[str] = []
        forwards = [i.target for i in plan.instructions if i.kind == "forward"]
        maildirs = [i for i in plan.instructions if i.kind == "maildir"]
        try:
            if maildirs:
                head = (
                    f"Return-Path: {_return_path(env.sender)}\nDelivered-To: {delivered_to}\n"
                ).encode("utf-8", "surrogateescape")
                data = head + message.replace(b"\r\n", b"\n")
                junk = env.meta.get("junk") == "1"  # DMARC quarantine, scanner's Junk verdict
                for ins in maildirs:
                    done.append(f"maildir {ins.target}{self._maildir(ins, data, junk)}")
        except OSError as exc:
            return _failed(exc, done)
        if forwards:
            return Forward(tuple(forwards), delivered_to, tuple(done), plan.source)
        return Result.ok(f"{'; '.join(done)} via {plan.source}")

    def forward(self, env: Envelope, message: bytes, fwd: Forward) -> Result:
        """Re-queue the message to the forwarding addresses (one new message, durable),
        with the meta that decides its delivery (``FORWARDED_META``): a quarantined message
        sent to an alias of a local mailbox still lands in that mailbox's ``.Junk``."""
        done = list(fwd.done)
        if self.queue is None:
            return _failed(QueueError("no queue to forward through"), done)
        prefix = f"Delivered-To: {fwd.delivered_to}\r\n".encode("utf-8", "surrogateescape")
        meta = {key: env.meta[key] for key in FORWARDED_META if key in env.meta}
        meta |= {"forwarded_for": fwd.delivered_to, "origin": env.queue_id}
        try:
            queued = self.queue.enqueue(env.sender, list(fwd.recipients), prefix + message, meta)
        except (OSError, QueueError) as exc:
            return _failed(exc, done)
        done.append(f"forwarded to {', '.join(fwd.recipients)} as {queued.queue_id}")
        return Result.ok(f"{'; '.join(done)} via {fwd.source}")

    @staticmethod
    def _maildir(ins: Instruction, data: bytes, junk: bool = False) -> str:
        """Into the Maildir, or its Maildir++ folder ``.Junk`` for a quarantined message
        (created on first use, as IMAP servers read it: Dovecot's Junk folder)."""
        if junk:
            maildir = ins.target.rstrip("/")
            _ensure_maildir(Path(maildir))  # the folder's parent: the mailbox's own Maildir
            folder = f".{JUNK_FOLDER}"
            return f"{folder}/new/" + maildir_deliver(f"{maildir}/{folder}", data)
        return "new/" + maildir_deliver(ins.target, data)
