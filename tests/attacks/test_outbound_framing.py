"""Outbound framing: whatever sits in the queue leaves as CRLF lines, dot-stuffed, one message.

The promise checked: outbound, every line leaves as CRLF and dot-stuffed.
Messages are put in the queue directly (as ``pyqmail-sendmail`` may: bare LF line ends, lines
that are a lone dot, an embedded ``<CRLF>.<CRLF>`` followed by SMTP commands, no final line
end) and ``pyqmail-send`` delivers them over SMTP to a raw sink on 127.0.0.1 (smtproutes).
The sink records the exact bytes after ``354``. Invariants: no bare LF on the wire, every line
that starts with a dot carries one more, the stream ends with the one real end marker, the
text round-trips, and the sink sees exactly one transaction per message (nothing smuggled).

Also: no shell anywhere in the delivery path (CVE-2020-7247 class) - pyqmail never starts a
program with an address or header in reach; checked on the source of the installed package.
"""

from __future__ import annotations

import ast
import getpass
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import pyqmail
from pyqmail.queue.store import Queue
from pyqmail.send import dotqmail
from tests.attacks.tally import tried

BIN = Path(sys.executable).parent
BODIES = [
    b"Subject: a\n\n.\nsecond line\n..\n.x\nlast",
    b"Subject: b\r\n\r\nbefore\r\n.\r\nMAIL FROM:<evil@evil.test>\r\nRCPT TO:<v@evil.test>\r\n"
    b"DATA\r\nsmuggled\r\n.\r\nafter\r\n",
    b"Subject: c\n\nmixed\r\nends\n.\r\n\n.\n.\r\n",
    b"Subject: d\r\n\r\n\n.\r\nx\n.\ny\r\n.\nz\r\n",
    b"Subject: e\r\n\r\n" + b".\r\n" * 50 + b"..\n" * 50,
    b"Subject: f\r\n\r\nNUL \x00 inside\r\n.\x00\r\n",
]


class Sink:
    """Plain SMTP server that records each transaction's recipients and raw DATA bytes."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.transactions: list[tuple[list[bytes], bytes]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.session, args=(conn,), daemon=True).start()

    def session(self, conn: socket.socket) -> None:
        buf = b""
        rcpts: list[bytes] = []

        def line() -> bytes | None:
            nonlocal buf
            while b"\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return None
                buf += chunk
            out, buf = buf.split(b"\r\n", 1)
            return out

        with conn:
            conn.sendall(b"220 sink ESMTP\r\n")
            while (cmd := line()) is not None:
                verb = cmd[:4].upper()
                if verb == b"EHLO":
                    conn.sendall(b"250-sink\r\n250-8BITMIME\r\n250 PIPELINING\r\n")
                elif verb == b"RCPT":
                    rcpts.append(cmd)
                    conn.sendall(b"250 ok\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go\r\n")
                    while b"\r\n.\r\n" not in b"\r\n" + buf:
                        chunk = conn.recv(65536)
                        if not chunk:
                            return
                        buf += chunk
                    end = (b"\r\n" + buf).index(b"\r\n.\r\n")
                    raw, buf = buf[: end + 3], buf[end + 3 :]
                    with self.lock:
                        self.transactions.append((rcpts, raw))
                    rcpts = []
                    conn.sendall(b"250 queued\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 ok\r\n")

    def close(self) -> None:
        self.sock.close()


def expected_wire(content: bytes) -> bytes:
    text = re.sub(rb"(?<!\r)\n", b"\r\n", content)
    if not text.endswith(b"\r\n"):
        text += b"\r\n"
    lines = text.split(b"\r\n")[:-1]
    return b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines) + b".\r\n"


def test_queue_content_leaves_crlf_dot_stuffed_one_message(tmp_path: Path) -> None:
    root = tmp_path / "qmail"
    for sub in ("control", "alias", "users"):
        (root / sub).mkdir(parents=True)
    (root / "control" / "me").write_text("mx.test\n")
    (root / "control" / "locals").write_text("mx.test\n")
    (root / "users" / "mailboxes").write_text("")
    sink = Sink()
    (root / "control" / "smtproutes").write_text(f":127.0.0.1:{sink.port}\n")
    queue = Queue(root / "queue")
    queue.create()
    for n, body in enumerate(BODIES):
        queue.enqueue(f"s{n}@mx.test", [f"r{n}@far.test"], body)
    log = (tmp_path / "send.log").open("wb")
    proc = subprocess.Popen(
        [BIN / "pyqmail-send", "--root", str(root), "--user", getpass.getuser()],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while len(sink.transactions) < len(BODIES) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # anything smuggled would arrive right behind
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        log.close()
        sink.close()
    output = (tmp_path / "send.log").read_text(errors="replace")
    assert len(sink.transactions) == len(BODIES), f"transactions: {sink.transactions}\n{output}"
    for rcpts, raw in sink.transactions:
        assert len(rcpts) == 1, rcpts
        n = int(re.search(rb"<r(\d+)@far\.test>", rcpts[0]).group(1))  # type: ignore[union-attr]
        assert re.search(rb"(?<!\r)\n|\r(?!\n)", raw) is None, f"bare CR/LF on the wire: {raw!r}"
        want = expected_wire(BODIES[n])
        assert raw.endswith(want), f"body {n}: wire {raw[-200:]!r}\nwant end {want[-200:]!r}"
        assert b"\r\n.\r\n" not in b"\r\n" + raw[:-3], f"body {n}: early end marker on the wire"
    tried("outbound-framing", len(BODIES))


EXEC_CALLS = {
    "os": {"system", "popen", "execv", "execve", "execvp", "execvpe", "execl", "execlp"}
    | {"spawnv", "spawnve", "spawnl", "posix_spawn", "posix_spawnp", "forkpty"},
    "subprocess": {"run", "call", "check_call", "check_output", "Popen", "getoutput"},
    "asyncio": {"create_subprocess_shell", "create_subprocess_exec"},
}


# The programs that handle mail: the listener, the queue manager with its deliveries, and the
# injector. pyqmail-checkpassword is not one of them: Dovecot runs it, and DJB's checkpassword
# interface makes it exec the program Dovecot names on its command line after a good login.
MAIL_PATH_ENTRIES = (
    *("smtpd.entry", "smtpd.cli", "smtpd.start", "smtpd.prefork"),  # start: imported by name
    *("send.manager", "tools.sendmail", "tools.queue", "authdb"),
)
# The one exec allowed: pyqmail-smtpd becomes its own supervisor after the bind, before any
# client connects: its own program, with its own command line (pyqmail.smtpd.prefork).
SELF_EXEC = {("smtpd.cli", "exec_supervisor")}


def _modules(package: Path) -> dict[str, Path]:
    """Every module of the package by dotted name under pyqmail (``send.remote``; a
    subpackage's ``__init__`` is the subpackage's own name)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found[".".join(parts)] = path
    return found


def _pyqmail_imports(tree: ast.AST, known: set[str]) -> set[str]:
    """The pyqmail modules a module imports (``from pyqmail.a import b`` is ``a.b`` when that
    is a module, else ``a``; each enclosing package's ``__init__`` is imported too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pyqmail"):
            base = node.module.removeprefix("pyqmail").lstrip(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                found.add(sub if sub in known else base)
        elif isinstance(node, ast.Import):
            found |= {
                a.name.removeprefix("pyqmail.") for a in node.names if a.name.startswith("pyqmail.")
            }
    parents = {
        ".".join(name.split(".")[:i]) for name in found for i in range(1, name.count(".") + 1)
    }
    return (found | parents) & known


def _exec_calls(
    path: Path, tree: ast.AST, allowed: frozenset[str] | set[str] = frozenset()
) -> list[str]:
    """Imports of subprocess/pty and calls that start programs, outside the functions
    named in ``allowed``."""
    skip = {
        id(node)
        for func in ast.walk(tree)
        if isinstance(func, ast.FunctionDef) and func.name in allowed
        for node in ast.walk(func)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names]
            module = getattr(node, "module", None) or ""
            if "subprocess" in names or module == "subprocess" or "pty" in names:
                found.append(f"{path.name}:{node.lineno} imports subprocess/pty")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.attr in EXEC_CALLS.get(node.func.value.id, ())
        ):
            found.append(f"{path.name}:{node.lineno} {node.func.value.id}.{node.func.attr}")
    return found


def test_no_shell_or_program_execution_in_the_mail_path() -> None:
    """CVE-2020-7247 class: no module of the daemons, the deliveries or the injector (nor any
    pyqmail module they import) starts programs."""
    paths = _modules(Path(pyqmail.__file__).parent)
    trees = {name: ast.parse(path.read_text(), str(path)) for name, path in paths.items()}
    closure, todo = set(), list(MAIL_PATH_ENTRIES)
    while todo:
        name = todo.pop()
        if name in closure or name not in trees:
            continue
        closure.add(name)
        todo.extend(_pyqmail_imports(trees[name], set(trees)))
    assert {"smtpd.cli", "send.manager", "send.local", "send.remote", "queue.store"} <= closure
    assert "tools.checkpassword" not in closure
    found = [
        hit
        for name in sorted(closure)
        for hit in _exec_calls(
            paths[name], trees[name], {func for mod, func in SELF_EXEC if mod == name}
        )
    ]
    assert not found, "program execution in pyqmail:\n" + "\n".join(found)
    # Outside the mail path: checkpassword's interface (exec of its own argv's program), and
    # two tools root runs by hand or from apt's hook, each a fixed program with argv items of
    # its own: pyqmail-users' doveadm kick (tools/dovecotkick.py) and pyqmail-restart-stale's
    # svstat and svc, and the ./conftest root's roles wrote beside each run script
    # (tools/restartstale.py). Nothing a message or a client sends reaches them.
    others = [
        hit
        for name in sorted(set(trees) - closure)
        for hit in _exec_calls(paths[name], trees[name])
    ]
    assert sorted(hit.split(":")[0] + " " + hit.split(" ")[1] for hit in others) == [
        "checkpassword.py os.execv",
        "dovecotkick.py imports",
        "dovecotkick.py subprocess.run",
        "restartstale.py imports",
        "restartstale.py subprocess.Popen",
        "restartstale.py subprocess.run",
        "restartstale.py subprocess.run",
    ], others
    tried("no-shell")


@pytest.mark.parametrize("local", ["`touch${IFS}PWNED`", "$(touch PWNED)", "a|touch|PWNED", "a;id"])
def test_shell_metacharacters_in_addresses_are_inert(local: str) -> None:
    """Addresses only ever become data: dotqmail refuses |program lines outright."""
    for line in (f"|/bin/sh -c 'echo {local}'", f"  |{local}"):
        got = dotqmail.parse_line(line, Path("/nonexistent"), "test .qmail", "example.test")
        assert got is not None and got.kind == "refused", f"{line!r} -> {got!r}"
        assert "program delivery" in got.target
    tried("no-shell")
