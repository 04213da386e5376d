"""Crash-durability soak: SMTP load + SIGKILLs under real daemontools ``supervise``.

What it proves (the durability promise of ``pyqmail.queue.writer``): every message that got ``250``
after DATA is delivered at least once, duplicates are only counted, and no delivered file is
partial.

Set-up, all under one temporary directory and on 127.0.0.1 only:

- a qmail root (``control/``, ``queue/``, ``users/mailboxes``) with Maildirs for ``u0..u3``;
- ``pyqmail-smtpd --mode smtp --workers 2`` and ``pyqmail-send``, each under its own real
  ``supervise`` process (run scripts in ``service/<name>/run``), as on a host;
- ``CLIENTS`` load threads sending messages (plain and STARTTLS sessions, 1-3 messages per
  session, 1-2 recipients each, bodies with dot-leading lines) whose headers carry a unique
  id, the body size and its SHA-256; a ledger keeps every message acknowledged with ``250``;
- a killer sending SIGKILL at random moments to: one smtpd worker (its parent respawns it),
  the smtpd parent alone (supervise restarts it; the orphaned workers must stop by
  themselves), the whole smtpd (parent and workers), pyqmail-send (its spawners and delivery
  children die with it), or one of pyqmail-send's delivery children (remote or local: its
  jobs in flight are deferred, its spawner starts another).

At the end: load stops, the queue drains (ALRM via ``svc -a``), then every Maildir file is
checked: id known, size and hash equal to what was sent (a partial or torn delivery fails),
and each acknowledged (message, recipient) is found at least once. Processes are stopped with
``svc -dx`` and then by PID (only processes whose command line names our temporary root).

Command line (``make stress``): ``python -m tests.stress.soak --seconds 300``; the last line
printed is ``acknowledged=N delivered=N duplicates=D lost=L kills=K``; exit status 1 if
anything was lost or partial.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import pwd
import random
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pyqmail.queue.store import Queue
from tests.pki import CA

BIN = Path(sys.executable).parent
IS_ROOT = os.geteuid() == 0
RUN_USER = "nobody" if IS_ROOT else pwd.getpwuid(os.geteuid()).pw_name
MAILBOXES = ("u0", "u1", "u2", "u3")
CLIENTS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Sent:
    """One acknowledged message: its recipients (mailbox names) and what was sent."""

    recipients: tuple[str, ...]
    size: int
    digest: str


@dataclass
class Result:
    acknowledged: int = 0
    delivered: int = 0
    duplicates: int = 0
    lost: int = 0
    kills: int = 0
    kill_kinds: Counter[str] = field(default_factory=Counter)
    sessions: int = 0
    tls_sessions: int = 0
    refused: int = 0  # MAIL or DATA answered with 4xx/5xx - not acknowledged
    refused_codes: Counter[int] = field(default_factory=Counter)
    broken: int = 0  # sessions cut by a kill
    unacked_delivered: int = 0  # committed but the 250 never reached us: allowed
    partial: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    lost_ids: list[str] = field(default_factory=list)
    bad_queue_files: int = 0
    queue_tmp_left: int = 0
    maildir_tmp_left: int = 0
    drained: bool = False
    drain_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            self.drained
            and self.lost == 0
            and not self.partial
            and not self.unknown
            and self.bad_queue_files == 0
            and self.acknowledged > 0
        )

    def summary(self) -> str:
        return (
            f"acknowledged={self.acknowledged} delivered={self.delivered} "
            f"duplicates={self.duplicates} lost={self.lost} kills={self.kills}"
        )

    def details(self) -> str:
        kinds = " ".join(f"{k}={v}" for k, v in sorted(self.kill_kinds.items()))
        return (
            f"sessions={self.sessions} tls_sessions={self.tls_sessions} broken={self.broken} "
            f"refused={self.refused} {dict(self.refused_codes)} "
            f"unacked_delivered={self.unacked_delivered} "
            f"partial={len(self.partial)} unknown={len(self.unknown)} "
            f"bad_queue_files={self.bad_queue_files} queue_tmp_left={self.queue_tmp_left} "
            f"maildir_tmp_left={self.maildir_tmp_left} drained={self.drained} "
            f"drain_seconds={self.drain_seconds:.1f} kill_kinds: {kinds}"
        )


def make_body(rng: random.Random) -> bytes:
    """CRLF lines, some starting with a dot (dot-stuffing on the wire), random sizes."""
    lines = []
    target = rng.choice([40, 400, 4000, 40_000, 150_000])
    size = 0
    while size < target:
        width = rng.randint(0, 120)
        line = "".join(rng.choices("abcdefghij .,-", k=width))
        if rng.random() < 0.1:
            line = "." + line
        lines.append(line.encode() + b"\r\n")
        size += width + 2
    return b"".join(lines)


def body_digest(body_crlf: bytes) -> tuple[int, str]:
    """Size and SHA-256 of the body as Maildir stores it (LF line ends)."""
    lf = body_crlf.replace(b"\r\n", b"\n")
    return len(lf), hashlib.sha256(lf).hexdigest()


class Soak:
    def __init__(self, seconds: float, seed: int, workdir: Path | None = None) -> None:
        self.seconds = seconds
        self.rng = random.Random(seed)
        self.base = Path(tempfile.mkdtemp(prefix="pyqmail-soak-", dir=workdir))
        self.base.chmod(0o755)
        self.root = self.base / "qmail"
        self.services = self.base / "service"
        self.port = free_port()
        self.ledger: dict[str, Sent] = {}
        self.ledger_lock = threading.Lock()
        self.stop_load = threading.Event()
        self.result = Result()
        self.supervisors: list[subprocess.Popen[bytes]] = []
        self.ca = CA("soak CA")

    # -- set-up ------------------------------------------------------------------------

    def setup(self) -> None:
        control = self.root / "control"
        control.mkdir(parents=True)
        (control / "me").write_text("mx.test\n")
        (control / "rcpthosts").write_text("example.test\n")
        (control / "locals").write_text("example.test\n")
        (control / "timeoutterm").write_text("2\n")
        server = self.ca.issue(["localhost", "mx.test", "127.0.0.1"])
        cert = control / "servercert.pem"
        cert.write_bytes(server.key_pem + server.cert_pem + self.ca.cert_pem)
        cert.chmod(0o400)
        (self.base / "ca.pem").write_bytes(self.ca.cert_pem)
        (self.root / "alias").mkdir()
        users = self.root / "users"
        users.mkdir()
        lines = []
        for name in MAILBOXES:
            home = self.base / "homes" / name
            for sub in ("tmp", "new", "cur"):
                (home / "Maildir" / sub).mkdir(parents=True, mode=0o700)
            lines.append(f"{name}:{home}\n")
        (users / "mailboxes").write_text("".join(lines))
        Queue(self.root / "queue").create()
        if IS_ROOT:
            pw = pwd.getpwnam(RUN_USER)
            for path in [self.base, *self.base.rglob("*")]:
                os.chown(path, pw.pw_uid, pw.pw_gid)
        smtpd = [
            str(BIN / "pyqmail-smtpd"),
            *("--root", str(self.root), "--listen", f"127.0.0.1:{self.port}"),
            *("--mode", "smtp", "--workers", "2"),
            *(("--user", RUN_USER) if IS_ROOT else ()),
        ]
        send = [str(BIN / "pyqmail-send"), "--root", str(self.root), "--user", RUN_USER]
        self._service("smtpd", smtpd)
        self._service("send", send)

    def _service(self, name: str, argv: list[str]) -> None:
        d = self.services / name
        d.mkdir(parents=True)
        log = self.base / f"{name}.log"
        run = d / "run"
        run.write_text(f"#!/bin/sh\nexec >>{log} 2>&1\nexec {' '.join(argv)}\n")
        run.chmod(0o755)

    def start(self) -> None:
        for name in ("smtpd", "send"):
            proc = subprocess.Popen(
                ["supervise", str(self.services / name)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.supervisors.append(proc)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._smtp_ready() and self.service_pid("send"):
                return
            time.sleep(0.1)
        raise RuntimeError(f"services did not come up; smtpd log:\n{self.log('smtpd')}")

    def _smtp_ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                return s.recv(3) == b"220"
        except OSError:
            return False

    def log(self, name: str) -> str:
        path = self.base / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- processes -----------------------------------------------------------------------

    def service_pid(self, name: str) -> int | None:
        out = subprocess.run(
            ["svstat", str(self.services / name)], capture_output=True, text=True, check=False
        ).stdout
        if ": up (pid " not in out:
            return None
        return int(out.split("(pid ", 1)[1].split(")", 1)[0])

    def service_uptime(self, name: str) -> int:
        """Seconds the service has been up (svstat), 0 when it is not up."""
        out = subprocess.run(
            ["svstat", str(self.services / name)], capture_output=True, text=True, check=False
        ).stdout
        if ": up (pid " not in out:
            return 0
        words = out.split(")", 1)[1].split()
        return int(words[0]) if words and words[0].isdigit() else 0

    def ours(self, pid: int) -> bool:
        """A process running with our temporary root on its command line."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return str(self.root).encode() in cmdline

    def children(self, pid: int) -> list[int]:
        kids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
        return kids

    def all_ours(self) -> list[int]:
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid() and self.ours(int(entry)):
                pids.append(int(entry))
        return pids

    def kill(self, pid: int) -> bool:
        if not self.ours(pid):
            return False
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def killer(self) -> None:
        kinds = ["smtpd-worker", "smtpd-parent", "smtpd-all", "send", "send-child"]
        while not self.stop_load.wait(self.rng.uniform(0.3, 2.5)):
            kind = self.rng.choice(kinds)
            if kind == "send":
                pids = [p] if (p := self.service_pid("send")) else []
            elif kind == "send-child":  # a delivery child (its spawner starts another)
                manager = self.service_pid("send")
                spawners = self.children(manager) if manager else []
                kids = [k for s in spawners for k in self.children(s) if self.ours(k)]
                pids = [self.rng.choice(kids)] if kids else []
            else:
                parent = self.service_pid("smtpd")
                if parent is None:
                    continue
                workers = [k for k in self.children(parent) if self.ours(k)]
                if kind == "smtpd-worker":
                    pids = [self.rng.choice(workers)] if workers else []
                elif kind == "smtpd-parent":  # its workers notice and stop on their own
                    pids = [parent]
                else:
                    pids = [parent, *workers]
            killed = [p for p in pids if self.kill(p)]
            if killed:
                self.result.kills += 1
                self.result.kill_kinds[kind] += 1

    # -- load ----------------------------------------------------------------------------

    def client(self, index: int) -> None:
        rng = random.Random(self.rng.random())
        ctx = ssl.create_default_context(cafile=str(self.base / "ca.pem"))
        while not self.stop_load.is_set():
            use_tls = rng.random() < 0.35
            try:
                self.session(rng, ctx if use_tls else None)
            except (OSError, smtplib.SMTPException):
                self.result.broken += 1
                time.sleep(0.05)

    def session(self, rng: random.Random, ctx: ssl.SSLContext | None) -> None:
        with smtplib.SMTP("127.0.0.1", self.port, local_hostname="load.test", timeout=15) as s:
            self.result.sessions += 1
            s.ehlo()
            if ctx is not None:
                s.starttls(context=ctx)
                s.ehlo()
                self.result.tls_sessions += 1
            for _ in range(rng.randint(1, 3)):
                if self.stop_load.is_set():
                    break
                self.one_message(s, rng)
            with contextlib.suppress(smtplib.SMTPException, OSError):
                s.quit()

    def one_message(self, s: smtplib.SMTP, rng: random.Random) -> None:
        mid = uuid.uuid4().hex
        rcpts = tuple(sorted(rng.sample(MAILBOXES, rng.randint(1, 2))))
        body = make_body(rng)
        size, digest = body_digest(body)
        head = (
            f"From: load@remote.test\r\nTo: {', '.join(r + '@example.test' for r in rcpts)}\r\n"
            f"Subject: soak {mid}\r\nMessage-ID: <{mid}@remote.test>\r\n"
            f"X-Soak-Id: {mid}\r\nX-Soak-Size: {size}\r\nX-Soak-Sha256: {digest}\r\n\r\n"
        ).encode()
        code, _ = s.mail("load@remote.test")
        if code != 250:
            self.result.refused += 1
            self.result.refused_codes[code] += 1
            s.rset()
            return
        for r in rcpts:
            code, _ = s.rcpt(f"{r}@example.test")
            if code != 250:
                raise smtplib.SMTPException(f"RCPT {r}: {code}")
        # smtplib's data() dot-stuffs and appends CRLF.CRLF; a 250 is the acknowledgement.
        code, _ = s.data(head + body)
        if code == 250:
            with self.ledger_lock:
                self.ledger[mid] = Sent(rcpts, size, digest)
        else:
            self.result.refused += 1
            self.result.refused_codes[code] += 1

    # -- the end -------------------------------------------------------------------------

    def drain(self, timeout: float) -> None:
        queue = Queue(self.root / "queue")
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            subprocess.run(["svc", "-u", str(self.services / "send")], check=False)
            if self.service_uptime("send") >= 2:  # an ALRM while Python starts up kills it
                subprocess.run(["svc", "-a", str(self.services / "send")], check=False)
            if not queue.ids("new") and not queue.ids("mess") and not queue.ids("state"):
                self.result.drained = True
                break
            time.sleep(0.5)
        self.result.drain_seconds = time.monotonic() - start

    def verify(self) -> None:
        res = self.result
        seen: Counter[tuple[str, str]] = Counter()
        for name in MAILBOXES:
            maildir = self.base / "homes" / name / "Maildir"
            res.maildir_tmp_left += len(os.listdir(maildir / "tmp"))
            for sub in ("new", "cur"):
                for path in (maildir / sub).iterdir():
                    mid = self.check_file(path)
                    if mid is not None:
                        seen[(mid, name)] += 1
        res.acknowledged = len(self.ledger)
        acked_ids = set(self.ledger)
        for mid, sent in self.ledger.items():
            counts = [seen[(mid, r)] for r in sent.recipients]
            if all(counts):
                res.delivered += 1
            else:
                res.lost += 1
                res.lost_ids.append(mid)
            res.duplicates += sum(c - 1 for c in counts if c > 1)
        res.unacked_delivered = len({mid for mid, _ in seen} - acked_ids)
        queue = Queue(self.root / "queue")
        res.bad_queue_files = len(queue.ids("bad"))
        res.queue_tmp_left = len(os.listdir(queue.path("tmp")))

    def check_file(self, path: Path) -> str | None:
        """The soak id of a complete delivered file; partial/foreign ones are recorded."""
        data = path.read_bytes()
        head, sep, body = data.partition(b"\n\n")
        fields = {}
        for line in head.split(b"\n"):
            key, _, value = line.partition(b": ")
            fields[key.lower()] = value.decode("ascii", "replace")
        mid = fields.get(b"x-soak-id")
        if not sep or mid is None:
            self.result.unknown.append(str(path))
            return None
        size, digest = len(body), hashlib.sha256(body).hexdigest()
        if str(size) != fields.get(b"x-soak-size") or digest != fields.get(b"x-soak-sha256"):
            self.result.partial.append(f"{path}: {size} bytes, header says {fields}")
            return None
        return mid

    def stop(self) -> None:
        for name in ("smtpd", "send"):
            subprocess.run(["svc", "-dx", str(self.services / name)], check=False)
        for proc in self.supervisors:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        deadline = time.monotonic() + 10
        while self.all_ours() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self.all_ours():
            self.kill(pid)

    def cleanup(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)

    def run(self) -> Result:
        try:
            self.setup()
            self.start()
            threads = [
                threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(CLIENTS)
            ]
            threads.append(threading.Thread(target=self.killer, daemon=True))
            for t in threads:
                t.start()
            self.stop_load.wait(self.seconds)
            self.stop_load.set()
            for t in threads:
                t.join(30)
            self.drain(timeout=max(60.0, self.seconds / 2))
            self.verify()
        finally:
            self.stop()
        return self.result


def run_soak(seconds: float, seed: int | None = None, keep: bool = False) -> tuple[Result, Soak]:
    soak = Soak(seconds, seed if seed is not None else random.randrange(1 << 30))
    try:
        return soak.run(), soak
    finally:
        if not keep:
            soak.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="load duration")
    parser.add_argument("--seed", type=int, help="random seed (printed)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(f"soak: {args.seconds:.0f}s of load with SIGKILLs, seed={seed}", flush=True)
    result, soak = run_soak(args.seconds, seed, args.keep)
    print(result.details())
    for item in (result.partial + result.unknown)[:10]:
        print(f"PROBLEM {item}")
    if result.lost_ids:
        print(f"LOST {' '.join(result.lost_ids[:20])}")
    if args.keep:
        print(f"kept {soak.base}")
    print(result.summary(), flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
