"""pyqmail-send's delivery children, each under its own user (``pyqmail.send.spawn``).

pyqmail-send is started as root with three identities, as its run script starts it: the
queue manager (pyqmails), the remote delivery child (pyqmailr) and the local delivery child
(pyqmailv, owner of the mailboxes). Spare numeric ids stand for them (``tests.runas``).
Proven with the real processes:

- ``/proc/<pid>/status`` of each child shows its user (real, effective, saved and file
  system uid) and no other group;
- a process with the remote child's identity cannot write the queue (a picked-up message,
  a state file, a new file in new/), a Maildir or a control file, and cannot read the
  relays' passwords; one with the local child's identity writes Maildirs but not the queue;
- kill -9 of either child while it holds a job loses nothing: the job comes back as a
  temporary failure, a new child is started, and the message is delivered after ALRM.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pyqmail.queue.store import Queue
from tests.attacks import tally
from tests.conftest import IMPOSSIBLE_HERE
from tests.e2e.helpers import wait_for
from tests.e2e.test_send import Recorder
from tests.runas import IS_ROOT, Ident, chown_tree, probe, spare_ids

pytestmark = pytest.mark.skipif(
    not IS_ROOT, reason=f"{IMPOSSIBLE_HERE} starting pyqmail-send as root needs root"
)

BIN = Path(sys.executable).parent
MSG = b"From: <alice@mx.test>\r\nSubject: %s\r\n\r\nbody\r\n"


@dataclass
class SendSite:
    root: Path
    manager: Ident
    remote: Ident
    local: Ident
    recorder: Recorder
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)

    def start(self) -> None:
        self.log_path = self.root / "send.log"

        def spec(who: Ident) -> str:
            return f"{who.uid}:{who.gid}"

        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    BIN / "pyqmail-send",
                    *("--root", str(self.root)),
                    *("--user", spec(self.manager)),
                    *("--remote-user", spec(self.remote)),
                    *("--local-user", spec(self.local)),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_for(lambda: self.log().count("delivery child started") >= 2, 20, "two children")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def sendmail(self, rcpt: str, subject: bytes) -> None:
        done = subprocess.run(
            [BIN / "pyqmail-sendmail", "--root", str(self.root), "-f", "alice@mx.test", rcpt],
            input=MSG % subject,
            capture_output=True,
            check=False,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr

    def children(self) -> dict[int, list[int]]:
        """uid -> pids of the manager's children and grandchildren."""
        assert self.proc is not None
        found: dict[int, list[int]] = {}
        spawners = _kids(self.proc.pid)
        for pid in spawners + [k for s in spawners for k in _kids(s)]:
            found.setdefault(_ids(pid)["Uid"][0], []).append(pid)
        return found

    def find_worker(self, who: Ident) -> int | None:
        """The delivery child (not the spawner) running as ``who``; None while there is
        none (a replacement that is not forked yet, or has not dropped to ``who`` yet)."""
        assert self.proc is not None
        for spawner in _kids(self.proc.pid):
            kids = _kids(spawner)
            if kids and _ids(kids[0])["Uid"][0] == who.uid:
                return kids[0]
        return None

    def worker(self, who: Ident) -> int:
        """The delivery child running as ``who`` (there must be one)."""
        found = self.find_worker(who)
        if found is None:
            raise AssertionError(f"no child runs as uid {who.uid}")
        return found

    def maildir(self) -> list[Path]:
        return sorted((self.root / "homes" / "alice" / "Maildir" / "new").iterdir())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def _kids(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return sorted(out)


def _ids(pid: int) -> dict[str, list[int]]:
    """Uid, Gid and Groups lines of /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            out[key] = [int(v) for v in value.split()]
    return out


@pytest.fixture
def site() -> Iterator[SendSite]:
    send_uid, remote_uid, local_uid, queue_gid, remote_gid, local_gid = spare_ids(6)
    base = Path(tempfile.mkdtemp(prefix="pyqmail-privsep-"))
    base.chmod(0o755)
    recorder = Recorder()
    s = SendSite(
        base,
        manager=Ident(send_uid, queue_gid, (queue_gid,)),
        remote=Ident(remote_uid, remote_gid, (remote_gid,)),
        local=Ident(local_uid, local_gid, (local_gid,)),
        recorder=recorder,
    )
    control = base / "control"
    control.mkdir(mode=0o755)
    files = {
        "me": "mx.test\n",
        "locals": "mx.test\n",
        "smtproutes": f":127.0.0.1:{recorder.port}\n",
    }
    for name, text in files.items():
        (control / name).write_text(text)
        (control / name).chmod(0o644)
    relay_auth = control / "smtproutes-auth"  # the role: pyqmails:root 0400
    relay_auth.write_text("[192.0.2.1]:relayuser:relay-secret\n")
    relay_auth.chmod(0o400)
    os.chown(relay_auth, send_uid, 0)
    for sub in ("alias", "users", "homes"):
        (base / sub).mkdir(mode=0o755)
    home = base / "homes" / "alice"
    for sub in ("tmp", "new", "cur"):
        (home / "Maildir" / sub).mkdir(parents=True)
    chown_tree(home, local_uid, local_gid)  # the mailboxes role: pyqmailv, 0700
    for path in [home, *home.rglob("*")]:
        path.chmod(0o700)
    (base / "users" / "mailboxes").write_text(f"alice:{home}\n")
    Queue(base / "queue").create()
    chown_tree(base / "queue", send_uid, queue_gid)  # the control role: pyqmails:pyqmail
    try:
        yield s
    finally:
        s.stop()
        recorder.close()
        shutil.rmtree(base, ignore_errors=True)


def test_children_run_as_their_users_and_cannot_touch_the_queue(site: SendSite) -> None:
    site.start()
    assert site.proc is not None
    assert _ids(site.proc.pid)["Uid"] == [site.manager.uid] * 4
    users = site.children()
    assert sorted(users) == sorted([site.remote.uid, site.local.uid])
    for who in (site.remote, site.local):
        assert len(users[who.uid]) == 2  # the spawner and its child
        for pid in users[who.uid]:
            ids = _ids(pid)
            assert ids["Uid"] == [who.uid] * 4
            assert ids["Gid"] == [who.gid] * 4
            assert ids["Groups"] == [who.gid]
    site.sendmail("alice@mx.test", b"local")
    site.sendmail("far@remote.test", b"remote")
    wait_for(lambda: len(site.maildir()) == 1 and site.recorder.accepted, 30, "both deliveries")
    assert site.maildir()[0].stat().st_uid == site.local.uid
    # a message left in the queue (mess/ and state/) for the probes: a deferral
    site.recorder.temp_first = 100
    site.sendmail("later@remote.test", b"waiting")
    q = site.root / "queue"
    wait_for(lambda: Queue(q).ids("state") and Queue(q).ids("mess"), 30, "a deferral")
    mess = q / "mess" / Queue(q).ids("mess")[0]
    state = q / "state" / Queue(q).ids("state")[0]
    maildir = site.root / "homes" / "alice" / "Maildir"
    control = site.root / "control"
    attempts = [
        ("write", mess, ""),
        ("read", mess, ""),
        ("write", state, ""),
        ("create", q / "new", "injected"),
        ("create", q / "mess", "injected"),
        ("unlink", mess, ""),
        ("write", control / "me", ""),
        ("create", control, "rcpthosts"),
        ("read", control / "smtproutes-auth", ""),
    ]
    tally.tried("privileges (delivery children)", 2 * len(attempts) + 3)
    denied = ["EACCES"] * len(attempts)
    assert probe(site.remote, attempts) == denied
    assert probe(site.local, attempts) == denied
    assert probe(site.remote, [("create", maildir / "tmp", "x"), ("list", maildir, "")]) == [
        "EACCES",
        "EACCES",
    ]
    assert probe(site.local, [("create", maildir / "tmp", "x")]) == ["ok"]


def _kill_with_a_job_in_flight(site: SendSite, who: Ident, rcpt: str, subject: bytes) -> int:
    """Stop the child, give it a job, kill it: the job must come back, deferred."""
    worker = site.worker(who)
    os.kill(worker, signal.SIGSTOP)
    picked = site.log().count("new msg")
    site.sendmail(rcpt, subject)
    wait_for(lambda: site.log().count("new msg") > picked, 20, "the pickup")
    time.sleep(1.0)  # the job is in the stopped child's socket
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: f"child {worker} ended" in site.log(), 20, "the manager to notice")
    wait_for(lambda: site.find_worker(who) not in (None, worker), 20, "a new child")
    return worker


def _alrm_until(site: SendSite, rcpt: str, done: Callable[[], bool], what: str) -> None:
    """ALRM once the manager logged the deferral, again every 5 s until ``done``.

    The remote job's outcome is recorded by a pool thread after the link logs the lost
    child, and the deferral's log line comes just before its retry time is set: an ALRM in
    that window finds the recipient still busy, and its retry then waits for the backoff
    (as a flush during any attempt would). Repeating the ALRM still proves the point: the
    job came back and is delivered.
    """
    assert site.proc is not None
    wait_for(lambda: f"to=<{rcpt}> result=deferred" in site.log(), 20, f"{rcpt} deferred")
    deadline = time.monotonic() + 30
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        os.kill(site.proc.pid, signal.SIGALRM)
        wait_for_or_not(done, 5)


def wait_for_or_not(predicate: Callable[[], bool], timeout: float) -> None:
    """Poll ``predicate`` for up to ``timeout`` seconds, without failing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.05)


def test_kill_9_of_either_child_mid_delivery_loses_nothing(site: SendSite) -> None:
    site.start()
    assert site.proc is not None
    old = _kill_with_a_job_in_flight(site, site.local, "alice@mx.test", b"local")
    assert "1 job(s) in flight deferred" in site.log()
    _alrm_until(site, "alice@mx.test", lambda: len(site.maildir()) == 1, "the local message")
    assert site.worker(site.local) != old
    old = _kill_with_a_job_in_flight(site, site.remote, "far@remote.test", b"remote")
    assert site.log().count("1 job(s) in flight deferred") == 2
    _alrm_until(site, "far@remote.test", lambda: bool(site.recorder.accepted), "the remote one")
    wait_for(lambda: not Queue(site.root / "queue").ids("mess"), 30, "an empty queue")
    assert site.worker(site.remote) != old
    site.stop()
    assert site.proc.returncode == 0
    assert site.children() == {}
