"""pyqmail-send end to end: real processes, real Maildirs, real SMTP servers on 127.0.0.1.

The remote side is played by aiosmtpd (an independent implementation, with real TLS
certificates from the ``pki`` fixture) and by ``Recorder``, a small SMTP server written here
that records every byte it receives, so a test can prove what was (not) sent in clear.
No test touches DNS: every remote domain is routed by ``control/smtproutes``.
"""

from __future__ import annotations

import email
import email.policy
import gc
import getpass
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from pyqmail.control.send import Control
from pyqmail.queue.format import Envelope as QueuedEnvelope
from pyqmail.queue.store import Queue
from pyqmail.queue.writer import QueueWriter
from pyqmail.send.remote import RemoteDelivery
from tests.conftest import PKI
from tests.e2e.conftest import DROP_USER, IS_ROOT, QmailRoot, StartDaemon
from tests.e2e.helpers import free_port, wait_for
from tests.queue_util import commit, messages

BIN = Path(sys.executable).parent
USER = getpass.getuser()


# -- the mail host under test ----------------------------------------------------------


@dataclass
class Host:
    root: Path
    user: str = USER
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def queue(self) -> Queue:
        return Queue(self.root / "queue")

    def control(self, name: str, text: str) -> None:
        path = self.root / "control" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def mailbox(self, name: str, dotqmail: dict[str, str] | None = None) -> Path:
        home = self.root / "homes" / name
        home.mkdir(parents=True, exist_ok=True)
        with (self.root / "users" / "mailboxes").open("a") as f:
            f.write(f"{name}:{home}\n")
        for fname, text in (dotqmail or {}).items():
            (home / fname).write_text(text)
            (home / fname).chmod(0o644)
        return home

    def alias(self, name: str, text: str) -> None:
        path = self.root / "alias" / f".qmail-{name}"
        path.write_text(text)
        path.chmod(0o644)

    def start(self, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = self.root / f"send-{len(self.logs)}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SSL_CERT")}
        full_env.update(env or {})
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [BIN / "pyqmail-send", "--root", str(self.root), "--user", self.user],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full_env,
            )
        self.procs.append(proc)
        self.logs.append(log)
        wait_for(lambda: "started" in self.log(), 10, "pyqmail-send to start")
        return proc

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def sendmail(self, args: list[str], message: bytes) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [BIN / "pyqmail-sendmail", "--root", str(self.root), *args],
            input=message,
            capture_output=True,
            check=False,
            timeout=30,
        )

    def maildir(self, home: Path, sub: str = "Maildir") -> list[bytes]:
        new = home / sub / "new"
        if not new.is_dir():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir())]

    def queue_empty(self) -> bool:
        q = self.queue
        return not q.ids("new") and not q.ids("mess") and not q.ids("state")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    root = tmp_path / "qmail"
    for sub in ("control", "alias", "users"):
        (root / sub).mkdir(parents=True)
    Queue(root / "queue").create()
    h = Host(root)
    h.control("me", "mx.test\n")
    h.control("locals", "example.test\nmx.test\n")
    h.control("concurrencyremote", "4\n")
    (root / "users" / "mailboxes").write_text("# name:homedir\n")
    yield h
    h.stop()


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def dsn_fields(raw: bytes) -> tuple[EmailMessage, list[dict[str, str]]]:
    """The DSN and its delivery-status groups (per-message first), checked for RFC 3464 shape:
    the ASCII types, or RFC 6533's global ones when it reports UTF-8."""
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    report = msg.get_param("report-type")
    assert report in ("delivery-status", "global-delivery-status")
    utf8 = report == "global-delivery-status"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        f"message/{report}",
        "message/global-headers" if utf8 else "text/rfc822-headers",
    ]
    blocks = parts[1].get_payload()
    if utf8:  # Python reads message/global-* as one wrapped message: split the report's text
        boundary = b"\n--" + str(msg.get_boundary()).encode()
        report_part = raw.replace(b"\r\n", b"\n").split(boundary)[2]
        text = report_part.split(b"\n\n", 1)[1].decode("utf-8").strip()
        blocks = [
            email.message_from_string(b, policy=email.policy.default) for b in text.split("\n\n")
        ]
    groups = [{k.lower(): str(v) for k, v in block.items()} for block in blocks]
    return msg, groups


# -- remote servers --------------------------------------------------------------------


@dataclass
class Recorder:
    """A threaded SMTP server recording raw bytes (what a snooper on the wire would see)."""

    tls: ssl.SSLContext | None = None
    starttls: bool = True
    smtputf8: bool = False
    auth: bool = False
    delay: float = 0.0
    rcpt_reply: dict[str, str] = field(default_factory=dict)
    temp_first: int = 0  # answer 451 at end of DATA this many times first
    starttls_reply: str = ""  # e.g. "454 4.7.0 TLS not available": offered but refused
    implicit: bool = False  # TLS from the first byte (port 465's way), with ``tls``
    cleartext: bytearray = field(default_factory=bytearray)
    accepted: list[tuple[str, str, bytes]] = field(default_factory=list)  # (rcpt, sender, data)
    tls_waits: list[float] = field(default_factory=list)  # end of handshake -> next command in
    connections: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        wrapped: list[socket.socket] = []
        try:
            self._talk(conn, wrapped)
        except (OSError, ssl.SSLError):
            pass
        finally:
            for s in wrapped:
                s.close()
            conn.close()

    def _talk(self, raw_conn: socket.socket, wrapped: list[socket.socket]) -> None:
        conn: socket.socket = raw_conn
        secure = False
        buf = b""
        if self.implicit and self.tls is not None:
            conn = self.tls.wrap_socket(raw_conn, server_side=True)
            wrapped.append(conn)
            secure = True

        def send(text: str) -> None:
            conn.sendall(text.encode() + b"\r\n")

        def line() -> bytes | None:
            nonlocal buf
            while b"\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return None
                if not secure:
                    with self.lock:
                        self.cleartext += chunk
                buf += chunk
            out, buf = buf.split(b"\r\n", 1)
            return out

        send("220 recorder ESMTP")
        sender, rcpts = "", []
        handshake_end: float | None = None
        while (cmd := line()) is not None:
            if handshake_end is not None:
                with self.lock:
                    self.tls_waits.append(time.monotonic() - handshake_end)
                handshake_end = None
            verb = cmd[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                ext = ["250-recorder", "250-8BITMIME", "250-SIZE 10000000"]
                if self.starttls and not secure and (self.tls is not None or self.starttls_reply):
                    ext.append("250-STARTTLS")
                if self.smtputf8:
                    ext.append("250-SMTPUTF8")
                if self.auth:
                    ext.append("250-AUTH PLAIN LOGIN")
                ext.append("250 PIPELINING")
                for e in ext:
                    send(e)
            elif verb == b"STAR" and self.starttls_reply:
                send(self.starttls_reply)
            elif verb == b"STAR" and self.tls is not None and not secure:
                send("220 go ahead")
                buf = b""
                conn = self.tls.wrap_socket(raw_conn, server_side=True)
                handshake_end = time.monotonic()
                wrapped.append(conn)
                secure = True
            elif verb == b"AUTH":
                send("235 ok")
            elif verb == b"MAIL":
                sender, rcpts = cmd.decode().split(":", 1)[1].split()[0].strip("<>"), []
                send("250 ok")
            elif verb == b"RCPT":
                rcpt = cmd.decode().split(":", 1)[1].strip().strip("<>")
                reply = self.rcpt_reply.get(rcpt, "250 ok")
                if reply.startswith("250"):
                    rcpts.append(rcpt)
                send(reply)
            elif verb == b"DATA":
                send("354 go")
                data = b""
                while (dl := line()) is not None and dl != b".":
                    data += dl + b"\r\n"
                if self.delay:
                    time.sleep(self.delay)
                with self.lock:
                    if self.temp_first > 0:
                        self.temp_first -= 1
                        send("451 4.3.0 try later")
                        continue
                    self.accepted += [(r, sender, data) for r in rcpts]
                send("250 2.0.0 accepted")
            elif verb == b"RSET":
                sender, rcpts = "", []
                send("250 ok")
            elif verb == b"QUIT":
                send("221 bye")
                return
            else:
                send("502 unknown")


@pytest.fixture
def server_ctx(pki: PKI, tmp_path: Path) -> ssl.SSLContext:
    path = tmp_path / "servercert.pem"
    pki.ca.write_servercert(path, pki.server)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(path)
    return ctx


@pytest.fixture
def recorder(server_ctx: ssl.SSLContext) -> Iterator[Recorder]:
    rec = Recorder(tls=server_ctx)
    yield rec
    rec.close()


class Sink:
    """aiosmtpd handler keeping what it received and how."""

    def __init__(self) -> None:
        self.messages: list[tuple[Envelope, bool, str | None]] = []

    async def handle_DATA(  # noqa: N802 - aiosmtpd hook name
        self, server: object, session: Session, envelope: Envelope
    ) -> str:
        del server
        data = session.auth_data
        login = data.login.decode() if isinstance(data, LoginPassword) else None
        self.messages.append((envelope, session.ssl is not None, login))
        return "250 2.0.0 OK"


def authenticator(
    server: object, session: object, envelope: object, mechanism: str, data: object
) -> AuthResult:
    del server, session, envelope, mechanism
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"relay", b"s3:cret")
    return AuthResult(success=ok, handled=False, auth_data=data if ok else None)


@pytest.fixture
def aiosmtpd_server(server_ctx: ssl.SSLContext) -> Iterator[tuple[Sink, int]]:
    sink = Sink()
    port = free_port()
    ctl = Controller(
        sink,
        hostname="127.0.0.1",
        port=port,
        tls_context=server_ctx,
        authenticator=authenticator,
        auth_require_tls=True,
    )
    ctl.start()
    yield sink, port
    ctl.stop()
    # pyqmail-send keeps its connection open for the next message, and asyncio on Python 3.11
    # cannot close a stopped server's client transports (Server.close_clients is 3.13+): collect
    # them here, where their ResourceWarning is known and harmless, not in a later test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def message(subject: str, body: str = "hello\r\n") -> bytes:
    return f"Subject: {subject}\r\nFrom: someone@example.test\r\n\r\n{body}".encode()


# -- local delivery --------------------------------------------------------------------


def test_local_delivery_aliases_forward_default_and_unknown_user(host: Host) -> None:
    alice = host.mailbox("alice")
    bob = host.mailbox("bob", {".qmail": "# keep a copy, send one on\n./Maildir/\n&alice\n"})
    carol = host.mailbox("carol", {".qmail-default": "./Maildir/\n", ".qmail-lists": "./Lists/\n"})
    sender = host.mailbox("sender")
    host.alias("postmaster", "&alice@example.test\n")
    host.start()
    for rcpt, subject in [
        ("alice@example.test", "direct"),
        ("Bob@Example.Test", "forward"),
        ("carol-anything@example.test", "default"),
        ("carol-lists@example.test", "ext"),
        ("postmaster@mx.test", "alias"),
        ("nobody@example.test", "unknown"),
    ]:
        done = host.sendmail(["-f", "sender@example.test", rcpt], message(subject))
        assert done.returncode == 0, done.stderr
    wait_for(host.queue_empty, what="queue to drain")
    subjects = {
        h: sorted(parse(m)["subject"] for m in host.maildir(h)) for h in (alice, bob, carol)
    }
    assert subjects[alice] == ["alias", "direct", "forward"]
    assert subjects[bob] == ["forward"]
    assert subjects[carol] == ["default"]
    assert [parse(m)["subject"] for m in host.maildir(carol, "Lists")] == ["ext"]
    direct = next(m for m in host.maildir(alice) if b"direct" in m)
    assert direct.startswith(
        b"Return-Path: <sender@example.test>\nDelivered-To: alice@example.test\n"
    )
    assert b"\r\n" not in direct  # Maildir files use LF
    forwarded = parse(next(m for m in host.maildir(alice) if b"forward" in m))
    assert forwarded.get_all("Delivered-To") == ["alice@mx.test", "bob@example.test"]
    assert forwarded["Return-Path"] == "<sender@example.test>"  # envelope sender kept
    # the unknown user bounced to the sender with a DSN
    bounces = host.maildir(sender)
    assert len(bounces) == 1
    dsn, groups = dsn_fields(bounces[0])
    assert dsn["To"] == "sender@example.test"
    assert groups[1]["final-recipient"] == "rfc822; nobody@example.test"
    assert groups[1]["status"] == "5.1.1"
    assert groups[1]["action"] == "failed"
    assert parse(bounces[0])["Return-Path"] == "<>"
    assert "no mailbox here" in host.log()


def test_program_lines_are_refused_with_a_clear_bounce(host: Host) -> None:
    sender = host.mailbox("sender")
    host.mailbox("prog", {".qmail": "./Maildir/\n|/usr/bin/procmail\n"})
    host.start()
    assert (
        host.sendmail(["-f", "sender@example.test", "prog@example.test"], message("p")).returncode
        == 0
    )
    wait_for(lambda: host.maildir(sender), what="bounce")
    wait_for(host.queue_empty)
    assert not host.maildir(host.root / "homes" / "prog")  # nothing half-delivered
    _, groups = dsn_fields(host.maildir(sender)[0])
    assert "does not run programs" in groups[1]["diagnostic-code"]


def test_forwarding_loop_is_detected_and_bounced(host: Host) -> None:
    sender = host.mailbox("sender")
    host.alias("loopa", "&loopb@example.test\n")
    host.alias("loopb", "&loopa@example.test\n")
    host.start()
    assert (
        host.sendmail(["-f", "sender@example.test", "loopa@example.test"], message("l")).returncode
        == 0
    )
    wait_for(lambda: host.maildir(sender), what="loop bounce")
    _, groups = dsn_fields(host.maildir(sender)[0])
    assert groups[1]["status"] == "5.4.6"
    assert "looping" in groups[1]["diagnostic-code"]


def test_group_writable_dotqmail_defers(host: Host) -> None:
    home = host.mailbox("lax", {".qmail": "./Maildir/\n"})
    (home / ".qmail").chmod(0o664)
    host.start()
    host.sendmail(["-f", "", "lax@example.test"], message("lax"))
    wait_for(lambda: "result=deferred" in host.log())
    assert "writable by group or others" in host.log()
    assert host.queue.ids("mess")  # kept for a retry, not bounced


# -- remote delivery -------------------------------------------------------------------


def test_remote_starttls_to_aiosmtpd_verified(
    host: Host, pki: PKI, aiosmtpd_server: tuple[Sink, int]
) -> None:
    sink, port = aiosmtpd_server
    host.control("smtproutes", f"remote.test:127.0.0.1:{port}\n")
    host.start({"SSL_CERT_FILE": str(pki.ca_file)})
    body = "line one\r\n.leading dot\r\n..two dots\r\nbare\nlf\r\n"
    for n in range(3):
        host.sendmail(
            ["-f", "me@example.test", "a@remote.test", "b@remote.test"], message(f"m{n}", body)
        )
    host.sendmail(["-f", "me@example.test", "c@remote.test"], message("8bit", "grüße\r\n"))
    wait_for(host.queue_empty, what="remote delivery")
    (eight,) = [m[0] for m in sink.messages if m[0].rcpt_tos == ["c@remote.test"]]
    sink.messages = [m for m in sink.messages if m[0] is not eight]
    assert "BODY=8BITMIME" in eight.mail_options
    assert "grüße".encode() in (eight.original_content or b"")
    assert len(sink.messages) == 3
    for env, over_tls, _ in sink.messages:
        assert over_tls
        assert sorted(env.rcpt_tos) == ["a@remote.test", "b@remote.test"]  # one transaction
        assert env.mail_from == "me@example.test"
        content = env.original_content or b""
        assert b"\r\n.leading dot\r\n..two dots\r\nbare\r\nlf\r\n" in content
    lines = [ln for ln in host.log().splitlines() if ln.startswith("delivery")]
    assert len(lines) == 7
    assert all("result=done" in ln and "tls=TLSv1.3 verified=yes" in ln for ln in lines), lines


def test_remote_unverified_certificate_still_encrypts(
    host: Host, aiosmtpd_server: tuple[Sink, int]
) -> None:
    sink, port = aiosmtpd_server
    host.control("smtproutes", f":127.0.0.1:{port}\n")  # the default route
    host.start()  # the test CA is not trusted
    host.sendmail(["-f", "me@example.test", "x@anywhere.test"], message("unverified"))
    wait_for(host.queue_empty)
    assert len(sink.messages) == 1 and sink.messages[0][1]
    assert "verified=no" in host.log()


def test_tlshosts_wrong_certificate_defers_and_nothing_leaves_in_clear(
    host: Host, pki: PKI, recorder: Recorder
) -> None:
    host.control("smtproutes", f"pinned.test:127.0.0.1:{recorder.port}\n")
    host.control("tlshosts/127.0.0.1.pem", pki.other_ca.cert_pem.decode())
    host.start()
    secret = "SECRET-BODY-7f3a"
    host.sendmail(["-f", "me@example.test", "x@pinned.test"], message("pinned", secret))
    wait_for(lambda: "result=deferred" in host.log(), what="deferral")
    time.sleep(0.5)
    assert recorder.accepted == []
    clear = bytes(recorder.cleartext)
    assert b"STARTTLS" in clear
    for word in (b"MAIL", b"RCPT", b"DATA", secret.encode(), b"x@pinned.test"):
        assert word not in clear
    assert recorder.connections == 1  # no fallback connection in clear
    assert "TLS required" in host.log()
    # a pinned host that does not offer STARTTLS: also deferred, nothing sent
    recorder.starttls = False
    recorder.cleartext.clear()
    os.kill(host.procs[0].pid, signal.SIGALRM)
    wait_for(lambda: host.log().count("result=deferred") >= 2)
    assert b"MAIL" not in bytes(recorder.cleartext)
    assert "does not offer STARTTLS" in host.log()


def test_opportunistic_tls_refused_falls_back_to_clear_but_a_pin_never_does(
    host: Host, pki: PKI, recorder: Recorder
) -> None:
    recorder.starttls_reply = "454 4.7.0 TLS not available"
    host.control(
        "smtproutes",
        f"open.test:127.0.0.1:{recorder.port}\npinned.test:[127.0.0.1]:{recorder.port}\n",
    )
    host.control("tlshosts/127.0.0.1.pem", pki.ca.cert_pem.decode())
    host.start()
    host.sendmail(["-f", "me@example.test", "x@pinned.test"], message("pinned", "PINNED\r\n"))
    wait_for(lambda: "result=deferred" in host.log())
    assert "STARTTLS refused: 454 4.7.0 TLS not available" in host.log()
    assert b"PINNED" not in bytes(recorder.cleartext)
    host.control("tlshosts/127.0.0.1.pem", "")
    os.unlink(host.root / "control" / "tlshosts" / "127.0.0.1.pem")
    host.sendmail(["-f", "me@example.test", "y@open.test"], message("open", "OPEN\r\n"))
    wait_for(lambda: any(r == "y@open.test" for r, _, _ in recorder.accepted))
    assert b"OPEN" in bytes(recorder.cleartext)  # opportunistic: delivered in clear

    def logged() -> list[str]:  # the log line follows the server's 250, it may lag
        return [ln for ln in host.log().splitlines() if "to=<y@open.test>" in ln]

    wait_for(logged, what="the delivery's log line")
    line = logged()[0]
    assert "result=done" in line and "tls=none" in line


def test_tlshosts_correct_pin_delivers(host: Host, pki: PKI, recorder: Recorder) -> None:
    host.control("smtproutes", f"pinned.test:127.0.0.1:{recorder.port}\n")
    host.control("tlshosts/127.0.0.1.pem", pki.ca.cert_pem.decode())
    host.start()
    host.sendmail(["-f", "me@example.test", "x@pinned.test"], message("pinned", "SECRET\r\n"))
    wait_for(host.queue_empty)
    assert [r for r, _, _ in recorder.accepted] == ["x@pinned.test"]
    assert b"SECRET" not in bytes(recorder.cleartext)
    assert "verified=yes" in host.log()


def test_ehlo_after_starttls_does_not_wait_for_the_servers_delayed_ack(
    tmp_path: Path, pki: PKI, server_ctx: ssl.SSLContext, recorder: Recorder
) -> None:
    """A TLS 1.3 server that sends no session tickets (OpenSSL's num_tickets = 0; or one
    that holds them until its first reply, as pyqmail-smtpd does) writes nothing after
    reading our Finished, so nothing carries its ACK, and with Nagle's algorithm on our
    EHLO waited for the server's delayed ACK: 40 ms or more on Linux, every connection
    (the Recorder neither sets TCP_NODELAY nor writes before it has read). The delivery
    socket has TCP_NODELAY, so the EHLO follows the handshake at loopback speed.
    In process (``RemoteDelivery``, as pyqmail-send's workers use it): five connections,
    each measured by the server from the end of its handshake to the EHLO's arrival."""
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    server_ctx.num_tickets = 0
    control = tmp_path / "sender" / "control"
    (control / "tlshosts").mkdir(parents=True)
    (control / "me").write_text("mx.test\n")
    (control / "smtproutes").write_text(f"remote.test:127.0.0.1:{recorder.port}\n")
    (control / "tlshosts" / "127.0.0.1.pem").write_bytes(pki.ca.cert_pem)
    delivery = RemoteDelivery(Control.load(control.parent))
    body = message("nagle")
    env = QueuedEnvelope("id", "me@mx.test", ("a@remote.test",), len(body), 0.0)
    for _ in range(5):
        session = delivery.session("remote.test")
        try:
            (result,) = session.deliver(env, body, ["a@remote.test"])
            assert (result.kind, result.tls, result.verified) == ("ok", "TLSv1.3", "yes"), result
            assert session.smtp is not None and session.smtp.sock is not None
            assert session.smtp.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        finally:
            session.close()
    assert len(recorder.tls_waits) == 5
    # Without TCP_NODELAY every wait is 40 ms or more (Linux's shortest delayed ACK), with
    # it a loopback round trip; the fastest of five tells them apart on a loaded machine.
    assert min(recorder.tls_waits) < 0.030, recorder.tls_waits


def test_auth_to_smarthost_only_over_tls(
    host: Host, pki: PKI, aiosmtpd_server: tuple[Sink, int], recorder: Recorder
) -> None:
    sink, port = aiosmtpd_server
    recorder.starttls, recorder.auth = False, True
    host.control(
        "smtproutes", f"tls.test:127.0.0.1:{port}\nclear.test:[127.0.0.1]:{recorder.port}\n"
    )
    host.control("smtproutes-auth", "127.0.0.1:relay:s3:cret\n")
    host.start({"SSL_CERT_FILE": str(pki.ca_file)})
    host.sendmail(["-f", "me@example.test", "x@tls.test"], message("auth"))
    host.sendmail(["-f", "me@example.test", "y@clear.test"], message("noauth"))
    wait_for(lambda: len(sink.messages) == 1 and "result=deferred" in host.log())
    assert sink.messages[0][1:] == (True, "relay")
    assert b"AUTH" not in bytes(recorder.cleartext)
    assert recorder.accepted == []
    assert "credentials are only sent over TLS" in host.log()


def test_permanent_failure_bounces_with_rfc3464(host: Host, recorder: Recorder) -> None:
    sender = host.mailbox("sender")
    recorder.rcpt_reply["gone@remote.test"] = "550 5.1.1 <gone@remote.test>: no such user"
    host.control("smtproutes", f":127.0.0.1:{recorder.port}\n")
    host.start()
    host.sendmail(
        ["-f", "sender@example.test", "gone@remote.test", "here@remote.test"],
        message("bounce me", "original body\r\n"),
    )
    wait_for(host.queue_empty)
    assert [r for r, _, _ in recorder.accepted] == ["here@remote.test"]
    bounces = host.maildir(sender)
    assert len(bounces) == 1
    dsn, groups = dsn_fields(bounces[0])
    assert groups[0]["reporting-mta"] == "dns; mx.test"
    assert len(groups) == 2  # only the failed recipient is reported
    rcpt = groups[1]
    assert rcpt["final-recipient"] == "rfc822; gone@remote.test"
    assert (rcpt["action"], rcpt["status"]) == ("failed", "5.1.1")
    assert rcpt["diagnostic-code"] == "smtp; 550 5.1.1 <gone@remote.test>: no such user"
    assert rcpt["remote-mta"].startswith("dns; 127.0.0.1")
    headers = list(dsn.iter_parts())[2].get_content()
    assert "Subject: bounce me" in headers and "original body" not in headers
    assert dsn["Auto-Submitted"] == "auto-replied"


def test_a_dotqmail_with_many_maildirs_is_delivered(host: Host) -> None:
    """A ``.qmail`` with 40 Maildir lines: the local delivery child's result names every one
    (over 4000 characters); the manager cuts the fields of a child's answer
    (``pyqmail.send.child.MAX_DETAIL``) instead of refusing it, which would defer the
    message for ever."""
    boxes = [f"./Maildir-{n:02d}-{'long-folder-name-' * 3}/" for n in range(40)]
    home = host.mailbox("many", {".qmail": "".join(f"{b}\n" for b in boxes)})
    host.start()
    host.sendmail(["-f", "someone@example.test", "many@example.test"], message("many"))
    wait_for(host.queue_empty, 60)
    for box in boxes:
        assert len(host.maildir(home, box.strip("./"))) == 1
    assert "result=done" in host.log()


def test_null_sender_failure_gets_no_bounce_only_a_double_bounce(
    host: Host, recorder: Recorder
) -> None:
    pm = host.mailbox("pm")
    host.alias("postmaster", "&pm@example.test\n")
    recorder.rcpt_reply["gone@remote.test"] = "550 5.1.1 no such user"
    host.control("smtproutes", f":127.0.0.1:{recorder.port}\n")
    host.start()
    host.sendmail(["-f", "", "gone@remote.test"], message("a bounce that fails"))
    wait_for(host.queue_empty)
    assert all(s != "" for _, s, _ in recorder.accepted)  # nothing bounced to <>
    double = host.maildir(pm)
    assert len(double) == 1
    assert parse(double[0])["Return-Path"] == "<#@[]>"
    # and with doublebounceto empty: dropped and logged, nothing anywhere
    host.control("doublebounceto", "\n")
    os.kill(host.procs[0].pid, signal.SIGHUP)
    wait_for(lambda: "reloaded" in host.log())
    host.sendmail(["-f", "", "gone@remote.test"], message("another"))
    wait_for(lambda: "dropped" in host.log())
    wait_for(host.queue_empty)
    assert len(host.maildir(pm)) == 1


def test_smtputf8_message_to_server_without_it_bounces(host: Host, recorder: Recorder) -> None:
    sender = host.mailbox("sender")
    host.control("smtproutes", f":127.0.0.1:{recorder.port}\n")
    host.start()
    host.queue.enqueue("sender@example.test", ["jürgen@remote.test"], message("utf8"))
    wait_for(host.queue_empty)
    assert recorder.accepted == []
    dsn, groups = dsn_fields(host.maildir(sender)[0])
    assert groups[1]["status"] == "5.6.7"
    # raw UTF-8 in the report: RFC 6533's global type, never message/delivery-status
    assert dsn.get_param("report-type") == "global-delivery-status"
    assert groups[1]["final-recipient"] == "utf-8; jürgen@remote.test"
    recorder.smtputf8 = True
    host.queue.enqueue("sender@example.test", ["jürgen@remote.test"], message("utf8 ok"))
    wait_for(lambda: recorder.accepted)
    assert recorder.accepted[0][0] == "jürgen@remote.test"


def test_a_message_received_with_smtputf8_needs_it_only_for_a_utf8_header(
    host: Host, recorder: Recorder
) -> None:
    """Received with MAIL's SMTPUTF8 (meta smtputf8=client, as pyqmail-smtpd queues it): an
    ASCII header still goes to a server without SMTPUTF8, a UTF-8 one bounces 5.6.7."""
    sender = host.mailbox("sender")
    host.control("smtproutes", f":127.0.0.1:{recorder.port}\n")
    host.start()
    marked = {"smtputf8": "client"}
    host.queue.enqueue("sender@example.test", ["plain@remote.test"], message("ascii"), marked)
    wait_for(lambda: recorder.accepted)
    assert recorder.accepted[0][0] == "plain@remote.test"
    utf8 = "Subject: Grüße\r\n\r\nbody\r\n".encode()
    host.queue.enqueue("sender@example.test", ["utf8@remote.test"], utf8, marked)
    wait_for(host.queue_empty)
    assert len(recorder.accepted) == 1
    _dsn, groups = dsn_fields(host.maildir(sender)[0])
    assert groups[1]["status"] == "5.6.7"


def test_deferred_shows_in_queue_tool_and_flush_retries(host: Host, recorder: Recorder) -> None:
    recorder.temp_first = 1
    host.control("smtproutes", f":127.0.0.1:{recorder.port}\n")
    host.start()
    host.sendmail(["-f", "me@example.test", "later@remote.test"], message("later"))
    wait_for(lambda: "result=deferred" in host.log())
    tool = [BIN / "pyqmail-queue", "--root", str(host.root)]
    listing = subprocess.run([*tool, "list"], capture_output=True, text=True, check=True).stdout
    assert "deferred <later@remote.test>" in listing and "451 4.3.0 try later" in listing
    queue_id = host.queue.ids("mess")[0]
    shown = subprocess.run([*tool, "show", queue_id], capture_output=True, text=True, check=True)
    assert "from <me@example.test>" in shown.stdout and "Subject: later" in shown.stdout
    flushed = subprocess.run([*tool, "flush"], capture_output=True, text=True, check=False)
    assert flushed.returncode == 0, flushed.stdout
    wait_for(host.queue_empty, 10)
    assert [r for r, _, _ in recorder.accepted] == ["later@remote.test"]
    host.stop()
    flushed = subprocess.run([*tool, "flush"], capture_output=True, text=True, check=False)
    assert flushed.returncode == 1 and "not running" in flushed.stdout


def test_queuelifetime_turns_deferral_into_a_bounce(host: Host, recorder: Recorder) -> None:
    sender = host.mailbox("sender")
    recorder.temp_first = 1000
    host.control("smtproutes", f":127.0.0.1:{recorder.port}\n")
    host.control("queuelifetime", "0\n")
    host.start()
    host.sendmail(["-f", "sender@example.test", "slow@remote.test"], message("expire"))
    wait_for(host.queue_empty)
    assert "result=expired" in host.log()
    _, groups = dsn_fields(host.maildir(sender)[0])
    assert (groups[1]["action"], groups[1]["status"]) == ("failed", "4.4.7")
    assert "451 4.3.0 try later" in groups[1]["diagnostic-code"]


def test_term_finishes_deliveries_in_flight(host: Host, recorder: Recorder) -> None:
    recorder.delay, recorder.starttls = 1.5, False
    host.control("smtproutes", f":127.0.0.1:{recorder.port}\n")
    proc = host.start()
    host.sendmail(["-f", "me@example.test", "slow@remote.test"], message("slow"))
    wait_for(lambda: b"DATA" in bytes(recorder.cleartext))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert [r for r, _, _ in recorder.accepted] == ["slow@remote.test"]
    assert "result=done" in host.log()
    assert host.queue_empty()


def _done_before_kill(host: Host, expected: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """(queue id, recipient) that must never be delivered again: recorded done by a ``done``
    line in the message's state file, or ended (every recipient) by the ``end`` line of a
    message in a segment, or belonging to a message that finished and left the queue."""
    envs = {s.env.queue_id: s.env for _, s in messages(host.queue, "mess")}
    queued = set(envs) | {s.env.queue_id for _, s in messages(host.queue, "new")}
    done = {(queue_id, rcpt) for queue_id, rcpt in expected if queue_id not in queued}
    for name in host.queue.ids("state"):
        for line in host.queue.path("state", name).read_bytes().split(b"\n")[:-1]:
            record = json.loads(line)
            if record.get("ev") == "done":
                env = envs[name]
                done.add((env.queue_id, env.recipients[record["rcpt"]]))
            elif record.get("ev") == "end":
                env = envs[record["id"]]
                done |= {(env.queue_id, r) for r in env.recipients}
    return done


@pytest.mark.parametrize("segments", [False, True], ids=["files", "segments"])
def test_kill_9_mid_batch_loses_nothing_and_resends_nothing_done(
    host: Host, recorder: Recorder, segments: bool
) -> None:
    recorder.delay = 0.15
    host.control("smtproutes", f":127.0.0.1:{recorder.port}\n")
    host.control("concurrencyremote", "2\n")
    expected = set()
    writers = []
    queue = host.queue  # one Queue, as in pyqmail-smtpd: the group commit groups by queue
    for n in range(10):
        rcpts = [f"r{n}-{d}@d{d}.test" for d in range(5)]  # 5 domains, one smtproute
        if segments:  # two segments of five messages, as pyqmail-smtpd's group commit makes
            w = QueueWriter(queue, "me@example.test", rcpts, defer=True)
            w.write(message(f"batch {n}"))
            writers.append(w)
            expected |= {(w.queue_id, r) for r in rcpts}
            continue
        env = host.queue.enqueue("me@example.test", rcpts, message(f"batch {n}"))
        expected |= {(env.queue_id, r) for r in rcpts}
    if segments:
        commit(writers[:5])
        commit(writers[5:])
        assert len(host.queue.ids("new")) == 2
    proc = host.start()
    wait_for(lambda: len(recorder.accepted) >= 12, what="some deliveries")
    proc.kill()
    proc.wait()
    done_before = _done_before_kill(host, expected)
    assert done_before and len(done_before) < 50
    delivered_before = len(recorder.accepted)
    host.start()
    wait_for(host.queue_empty, 40, "queue to drain after restart")
    by_rcpt: dict[str, int] = {}
    for rcpt, _, _ in recorder.accepted:
        by_rcpt[rcpt] = by_rcpt.get(rcpt, 0) + 1
    assert set(by_rcpt) == {r for _, r in expected}  # nothing lost
    for _, rcpt in done_before:
        assert by_rcpt[rcpt] == 1, f"{rcpt} was recorded done and delivered again"
    assert recorder.connections <= 12  # connections are reused across messages
    duplicates = sum(by_rcpt.values()) - 50
    assert duplicates <= delivered_before - len(done_before) + 2  # only unrecorded in-flight ones


# -- pyqmail-smtpd as the remote side ----------------------------------------------------


def test_full_chain_through_pyqmail_smtpd_into_a_maildir(
    host: Host, pki: PKI, qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    """sendmail -> pyqmail-send (A) -> STARTTLS, pinned -> pyqmail-smtpd (B) -> pyqmail-send (B)
    -> Maildir."""
    d = smtpd(mode="smtp")
    host.control("smtproutes", f"mx.test:127.0.0.1:{d.port}\n")
    host.control("me", "a.test\n")  # B is mx.test: two hosts never share a name (loop check)
    host.control("locals", "example.test\n")  # mx.test is the other host here
    host.control("tlshosts/127.0.0.1.pem", pki.ca.cert_pem.decode())
    host.start()
    body = "first\r\n.dot line\r\n.\r\nlast\r\n"
    done = host.sendmail(["-i", "-f", "me@example.test", "user@mx.test"], message("chain", body))
    assert done.returncode == 0, done.stderr
    wait_for(host.queue_empty, what="delivery to pyqmail-smtpd")
    assert "verified=yes" in host.log() and "tls=TLSv1.3" in host.log()
    # B delivers what its smtpd accepted
    qmail_root.control("locals", "mx.test\n")
    home = qmail_root.path / "homes" / "user"
    home.mkdir(parents=True)
    qmail_root._own(home.parent)
    qmail_root._own(home)
    qmail_root.write("users/mailboxes", f"user:{home}\n")
    qmail_root.write("alias/.keep", "")
    b = Host(qmail_root.path, user=DROP_USER if IS_ROOT else USER)
    try:
        b.start()
        wait_for(lambda: b.maildir(home), what="Maildir delivery on B")
    finally:
        b.stop()
    delivered = b.maildir(home)[0]
    assert b"\n.dot line\n.\nlast\n" in delivered  # dot-stuffed on the wire, intact here
    parsed = parse(delivered)
    assert parsed["Subject"] == "chain" and parsed["Return-Path"] == "<me@example.test>"
    assert "TLS" in " ".join(parsed.get_all("Received") or [])


@pytest.mark.parametrize("present", [True, False])
def test_client_certificate_makes_pyqmail_smtpd_relay(
    host: Host, pki: PKI, qmail_root: QmailRoot, smtpd: StartDaemon, present: bool
) -> None:
    """B relays for far.test only for a client certificate chaining to clientca.pem and
    listed in tlsclients; A presents control/clientcert.pem when asked."""
    qmail_root.control("clientca.pem", pki.ca.cert_pem.decode())
    qmail_root.control("tlsclients", "relay.test\n")
    d = smtpd(mode="smtp")
    host.control("smtproutes", f"far.test:127.0.0.1:{d.port}\n")
    host.control("me", "a.test\n")  # B is mx.test: two hosts never share a name (loop check)
    host.control("tlshosts/127.0.0.1.pem", pki.ca.cert_pem.decode())
    if present:
        host.control("clientcert.pem", (pki.client.key_pem + pki.client.cert_pem).decode())
    sender = host.mailbox("sender")
    host.start()
    host.sendmail(["-f", "sender@example.test", "someone@far.test"], message("relay"))
    wait_for(host.queue_empty)
    queued = [env.recipients for env, _ in qmail_root.queued()]
    if present:
        assert queued == [("someone@far.test",)]
        assert not host.maildir(sender)
    else:
        assert queued == []
        _, groups = dsn_fields(host.maildir(sender)[0])
        assert groups[1]["diagnostic-code"].startswith("smtp; 5")


# -- process hygiene ----------------------------------------------------------------------


def test_one_instance_per_queue_and_clear_start_errors(host: Host) -> None:
    host.start()
    cmd = [BIN / "pyqmail-send", "--root", str(host.root), "--user", USER]
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    assert second.returncode != 0
    assert f"another pyqmail-send is running on {host.root / 'queue'}" in second.stderr
    assert str(host.procs[0].pid) in second.stderr
    host.stop()
    host.control("concurrencylocal", "many\n")
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    assert bad.returncode == 111
    # the one reader's wording for both daemons (pyqmail.control.reader/parsers)
    assert "concurrencylocal:1: not a non-negative integer: 'many'" in bad.stderr
    if IS_ROOT:
        as_root = subprocess.run(cmd[:3], capture_output=True, text=True, timeout=20, check=False)
        assert as_root.returncode != 0 and "refusing to run as root" in as_root.stderr


# -- segments (several messages in one queue file) --------------------------------------


def _segment(host: Host, rcpts: list[str]) -> tuple[str, list[str]]:
    writers = []
    queue = host.queue  # one Queue, as in pyqmail-smtpd: the group commit groups by queue
    for n, rcpt in enumerate(rcpts):
        w = QueueWriter(queue, "sender@example.test", [rcpt], defer=True)
        w.write(message(f"seg {n}"))
        writers.append(w)
    commit(writers)
    (name,) = host.queue.ids("new")
    return name, [w.queue_id for w in writers]


def test_segment_is_delivered_and_removed_with_its_state(host: Host, recorder: Recorder) -> None:
    """Every message of a segment is delivered once, a deferred one stays listed while the
    others have ended, and the file and all state go when the last one ends."""
    alice = host.mailbox("alice")
    recorder.temp_first = 1
    host.control("smtproutes", f":127.0.0.1:{recorder.port}\n")
    name, ids = _segment(host, ["alice@example.test", "far@remote.test", "alice@example.test"])
    host.start()
    wait_for(lambda: "result=deferred" in host.log() and len(host.maildir(alice)) == 2)
    wait_for(lambda: host.queue.path("state", name).exists(), what="end lines")
    assert host.queue.ids("mess") == [name]
    tool = [BIN / "pyqmail-queue", "--root", str(host.root)]
    listing = subprocess.run([*tool, "list"], capture_output=True, text=True, check=True).stdout
    assert ids[1] in listing and ids[0] not in listing and ids[2] not in listing
    assert "1 message(s) in the queue" in listing
    shown = subprocess.run([*tool, "show", ids[1]], capture_output=True, text=True, check=True)
    assert f"(mess, segment {name})" in shown.stdout and "Subject: seg 1" in shown.stdout
    assert "deferred" in shown.stdout
    subprocess.run([*tool, "flush"], capture_output=True, check=True)
    wait_for(host.queue_empty, what="segment removed")
    assert sorted(parse(m)["subject"] for m in host.maildir(alice)) == ["seg 0", "seg 2"]
    assert [r for r, _, _ in recorder.accepted] == ["far@remote.test"]
    assert f"end segment {name}" in host.log()


def test_restart_skips_messages_of_a_segment_that_ended(host: Host) -> None:
    """After a crash, messages recorded ended in state/<segment> are not delivered again;
    the others are; orphan state of nothing in the queue is removed."""
    alice = host.mailbox("alice")
    name, ids = _segment(host, ["alice@example.test"] * 3)
    os.rename(host.queue.path("new", name), host.queue.path("mess", name))
    host.queue.path("state", name).write_text(json.dumps({"ev": "end", "id": ids[1]}) + "\n")
    host.queue.path("state", ids[1]).write_text("")  # an ended message may leave its state
    host.queue.path("state", "1234.5.6").write_text("")  # belongs to nothing
    host.start()
    wait_for(host.queue_empty, what="queue to drain")
    assert sorted(parse(m)["subject"] for m in host.maildir(alice)) == ["seg 0", "seg 2"]
    assert "removed orphan state 1234.5.6" in host.log()
    assert f"removed orphan state {ids[1]}" not in host.log()


def test_torn_segment_is_quarantined_whole(host: Host) -> None:
    alice = host.mailbox("alice")
    name, _ = _segment(host, ["alice@example.test"] * 2)
    path = host.queue.path("new", name)
    path.write_bytes(path.read_bytes()[:-5])
    host.start()
    wait_for(lambda: "quarantined" in host.log())
    assert host.queue.ids("bad") == [name]
    assert host.maildir(alice) == []


def _has_children(pid: int) -> bool:
    """Whether the main thread of ``pid`` forked a process (quick: no scan of /proc)."""
    try:
        return bool(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
    except OSError:
        return False


def _signal_while_starting(host: Host, attempt: int) -> tuple[subprocess.Popen[bytes], int]:
    """Start pyqmail-send and send it ALRM and HUP, alternately, from the moment its
    spawners exist until it says "started"; the process and how many signals it got."""
    log = host.root / f"send-early-{attempt}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [BIN / "pyqmail-send", "--root", str(host.root), "--user", host.user],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    host.procs.append(proc)
    host.logs.append(log)
    deadline = time.monotonic() + 20
    while not _has_children(proc.pid):
        assert time.monotonic() < deadline, "no spawners"
        time.sleep(0.0002)
    sent = 0
    while b"started" not in log.read_bytes() and proc.poll() is None:
        os.kill(proc.pid, signal.SIGHUP if sent % 2 else signal.SIGALRM)
        sent += 1
        time.sleep(0.001)
    return proc, sent


def test_alrm_and_hup_while_starting_are_kept_not_fatal(host: Host) -> None:
    """``svc -a``/``svc -h`` may come while pyqmail-send starts (the soak's drain sends ALRM
    twice a second to a pyqmail-send supervise just restarted): from the moment its
    spawners exist (main() is running) until it says "started", a stream of ALRM and HUP
    is kept for the loop; before, either signal's default action killed it. A start that
    finished before both signals could be sent (ALRM goes first, HUP second) proves
    nothing about the one not sent: it is stopped and tried again (a CI run under load saw
    it once with no signal, a quiet machine once with ALRM only, and a later CI run five
    times in a row with no signal: under load the test's own process may not run at all
    between the spawners' fork and the "started" line, so it gets up to 20 tries)."""
    for attempt in range(20):
        proc, sent = _signal_while_starting(host, attempt)
        assert proc.poll() is None, f"pyqmail-send died while starting: {proc.returncode}"
        if sent >= 2:
            break
        proc.terminate()
        proc.wait(30)
    assert sent >= 2, "pyqmail-send said started before both ALRM and HUP were sent, 20 times"
    wait_for(lambda: "status ALRM" in host.log() and "status HUP" in host.log())
