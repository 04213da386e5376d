"""One remote SMTP session over several jobs, against a scripted server on 127.0.0.1.

What a server closing the channel (a 421, an idle connection dropped, a connection lost in
DATA) costs: the job in hand at most, never the next one, and never a 5xx already given at
RCPT (RFC 5321 sections 3.8 and 4.2.2; qmail-remote keeps those permanent).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from pyqmail.control.send import Control
from pyqmail.queue.format import Envelope
from pyqmail.send.remote import RemoteDelivery, RemoteSession

# (connection number from 0, command verb or "END" for the end of data) -> reply, or None
# for the default. A 421 reply closes the connection after recording for a moment what the
# client still sends; "" closes it without a reply.
Script = Callable[[int, str], str | None]
Serve = Callable[..., "tuple[ScriptedServer, RemoteSession]"]

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


class ScriptedServer:
    """A loopback SMTP server recording each connection's commands; replies from ``script``."""

    def __init__(self, script: Script, idle_close: bool = False) -> None:
        self.script = script
        self.idle_close = idle_close  # close each connection after its first message
        self.commands: list[list[str]] = []
        self.accepted: list[list[str]] = []
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.commands.append([])
                n = len(self.commands) - 1
            threading.Thread(target=self._session, args=(conn, n), daemon=True).start()

    def _session(self, conn: socket.socket, n: int) -> None:
        with conn, conn.makefile("rb") as rfile, contextlib.suppress(OSError):
            self._talk(conn, rfile, n)

    def _reply(self, conn: socket.socket, rfile: BinaryIO, n: int, verb: str, default: str) -> bool:
        """Send the reply to ``verb``; False when the connection is to end."""
        reply = self.script(n, verb)
        reply = default if reply is None else reply
        if not reply:
            return False
        conn.sendall(reply.encode() + b"\r\n")
        if reply.startswith("421"):
            conn.settimeout(1.0)
            try:
                while line := rfile.readline():
                    self.commands[n].append(line.decode().strip())
            except OSError:
                pass
            return False
        return True

    def _talk(self, conn: socket.socket, rfile: BinaryIO, n: int) -> None:
        if not self._reply(conn, rfile, n, "GREETING", "220 fake.test ESMTP"):
            return
        rcpts: list[str] = []
        while line := rfile.readline():
            cmd = line.decode().strip()
            self.commands[n].append(cmd)
            verb = cmd.split(" ", 1)[0].upper()
            if verb == "EHLO":
                ok = self._reply(conn, rfile, n, verb, "250-fake.test\r\n250 8BITMIME")
            elif verb == "RCPT":
                ok = self._reply(conn, rfile, n, cmd, "250 ok")
                if ok and not (self.script(n, cmd) or "250").startswith("5"):
                    rcpts.append(cmd.split(":", 1)[1].strip("<>"))
            elif verb == "DATA":
                if not self._reply(conn, rfile, n, verb, "354 go"):
                    return
                while rfile.readline() not in (b".\r\n", b""):
                    pass
                end = self.script(n, "END")
                if end is None or end.startswith("250"):
                    with self.lock:  # before the reply: the client may look at once
                        self.accepted.append(rcpts)
                if not self._reply(conn, rfile, n, "END", "250 2.0.0 accepted"):
                    return
                rcpts = []
                if self.idle_close:
                    return
                continue
            elif verb == "QUIT":
                self._reply(conn, rfile, n, verb, "221 bye")
                return
            else:
                ok = self._reply(conn, rfile, n, verb, "250 ok")
            if not ok:
                return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def control(tmp_path: Path) -> Callable[[int], Control]:
    def make(port: int) -> Control:
        root = tmp_path / "control"
        root.mkdir(exist_ok=True)
        (root / "me").write_text("mx.test\n")
        (root / "smtproutes").write_text(f"remote.test:127.0.0.1:{port}\n")
        (root / "timeoutremote").write_text("10\n")
        return Control.load(tmp_path)

    return make


@pytest.fixture
def serve(control: Callable[[int], Control]) -> Iterator[Serve]:
    servers: list[ScriptedServer] = []
    sessions: list[RemoteSession] = []

    def start(script: Script, idle_close: bool = False) -> tuple[ScriptedServer, RemoteSession]:
        server = ScriptedServer(script, idle_close)
        servers.append(server)
        session = RemoteDelivery(control(server.port)).session("remote.test")
        sessions.append(session)
        return server, session

    yield start
    for session in sessions:
        session.close()
    for server in servers:
        server.close()


def verbs(commands: list[str]) -> list[str]:
    return [c.split(" ", 1)[0].upper() for c in commands]


def envelope(*rcpts: str) -> Envelope:
    return Envelope("id", "me@mx.test", rcpts, len(MESSAGE), 0.0)


def test_a_421_at_mail_ends_the_session_and_the_next_job_reconnects(serve: Serve) -> None:
    server, session = serve(
        lambda n, verb: "421 4.7.0 fake.test closing" if (n, verb) == (0, "MAIL") else None
    )
    (first,) = session.deliver(envelope("a@remote.test"), MESSAGE, ["a@remote.test"])
    assert first.kind == "temp"
    assert "421" in first.detail
    (second,) = session.deliver(envelope("b@remote.test"), MESSAGE, ["b@remote.test"])
    assert second.kind == "ok", second.detail
    assert server.accepted == [["b@remote.test"]]
    # Nothing more was said on the closed channel: no RSET, no QUIT.
    assert verbs(server.commands[0]) == ["EHLO", "MAIL"]
    assert verbs(server.commands[1]) == ["EHLO", "MAIL", "RCPT", "DATA"]


@pytest.mark.parametrize("stage", ["RCPT TO:<b@remote.test>", "DATA", "END"])
def test_a_421_later_in_the_transaction_ends_the_session_too(serve: Serve, stage: str) -> None:
    def script(n: int, verb: str) -> str | None:
        if n == 0 and verb == "RCPT TO:<a@remote.test>":
            return "550 5.1.1 no such user"
        return "421 4.3.2 shutting down" if (n, verb) == (0, stage) else None

    rcpts = ["a@remote.test", "b@remote.test", "c@remote.test"]
    server, session = serve(script)
    results = session.deliver(envelope(*rcpts), MESSAGE, rcpts)
    assert [r.kind for r in results] == ["perm", "temp", "temp"]
    assert all("421" in r.detail for r in results[1:])
    # Nothing after the 421 (no RCPT for c, no RSET, no QUIT): the channel is closed.
    assert server.commands[0][-1] == (stage if stage.startswith("RCPT") else "DATA")
    (again,) = session.deliver(envelope("c@remote.test"), MESSAGE, ["c@remote.test"])
    assert again.kind == "ok", again.detail
    assert len(server.commands) == 2
    assert "RSET" not in verbs(server.commands[0] + server.commands[1])


@pytest.mark.parametrize(("stage", "said"), [("GREETING", []), ("EHLO", ["EHLO"])])
def test_a_421_before_mail_gets_no_helo_and_no_quit(
    serve: Serve, stage: str, said: list[str]
) -> None:
    server, session = serve(lambda n, verb: "421 4.7.0 too busy" if verb == stage else None)
    (result,) = session.deliver(envelope("a@remote.test"), MESSAGE, ["a@remote.test"])
    assert result.kind == "temp"
    assert "421" in result.detail
    assert verbs(server.commands[0]) == said


def test_an_idle_connection_the_server_closed_costs_a_reconnection_not_the_job(
    serve: Serve,
) -> None:
    server, session = serve(lambda n, verb: None, idle_close=True)
    for rcpt in ("a@remote.test", "b@remote.test", "c@remote.test"):
        (result,) = session.deliver(envelope(rcpt), MESSAGE, [rcpt])
        assert result.kind == "ok", result.detail
    assert server.accepted == [["a@remote.test"], ["b@remote.test"], ["c@remote.test"]]
    assert len(server.commands) == 3


def test_a_refused_rset_also_reconnects(serve: Serve) -> None:
    """RSET follows a transaction that did not end with a 250 (here: its recipient refused);
    a refused RSET costs a new connection, not the job."""

    def script(n: int, verb: str) -> str | None:
        if verb == "RSET":
            return "503 5.5.1 no"
        return "550 5.1.1 no such user" if verb == "RCPT TO:<nobody@remote.test>" else None

    server, session = serve(script)
    (refused,) = session.deliver(envelope("nobody@remote.test"), MESSAGE, ["nobody@remote.test"])
    assert refused.kind == "perm"
    (result,) = session.deliver(envelope("b@remote.test"), MESSAGE, ["b@remote.test"])
    assert result.kind == "ok", result.detail
    assert len(server.commands) == 2
    assert verbs(server.commands[0])[-2:] == ["RSET", "QUIT"]


def test_message_after_message_on_one_connection_pays_no_rset(serve: Serve) -> None:
    server, session = serve(lambda n, verb: None)
    for rcpt in ("a@remote.test", "b@remote.test", "c@remote.test"):
        (result,) = session.deliver(envelope(rcpt), MESSAGE, [rcpt])
        assert result.kind == "ok", result.detail
    assert len(server.commands) == 1
    assert "RSET" not in verbs(server.commands[0])
    assert verbs(server.commands[0]).count("MAIL") == 3


def test_a_421_at_mail_of_a_reused_connection_sends_the_job_on_a_new_one(serve: Serve) -> None:
    """Exim's smtp_accept_max_per_connection: the second MAIL of a connection gets 421;
    that message goes on a new connection at once (the channel is closing, RFC 5321 3.8)."""

    def script(n: int, verb: str) -> str | None:
        if n == 0 and verb == "MAIL":
            script.mails += 1  # type: ignore[attr-defined]
            if script.mails == 2:  # type: ignore[attr-defined]
                return "421 4.7.0 too many messages on one connection"
        return None

    script.mails = 0  # type: ignore[attr-defined]
    server, session = serve(script)
    for rcpt in ("a@remote.test", "b@remote.test"):
        (result,) = session.deliver(envelope(rcpt), MESSAGE, [rcpt])
        assert result.kind == "ok", result.detail
    assert server.accepted == [["a@remote.test"], ["b@remote.test"]]
    assert len(server.commands) == 2


def test_a_5xx_at_rcpt_stays_permanent_when_the_connection_drops_in_data(serve: Serve) -> None:
    def script(n: int, verb: str) -> str | None:
        if verb == "RCPT TO:<a@remote.test>":
            return "550 5.1.1 no such user"
        return "" if verb == "END" else None

    rcpts = ["a@remote.test", "b@remote.test"]
    _, session = serve(script)
    refused, lost = session.deliver(envelope(*rcpts), MESSAGE, rcpts)
    assert (refused.kind, refused.status) == ("perm", "5.1.1")
    assert "no such user" in refused.detail
    assert lost.kind == "temp"
    assert "lost" in lost.detail
