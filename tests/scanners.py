"""Real content scanners for tests: Debian's ``rspamd`` and ``clamd`` on loopback.

``Rspamd(workdir)`` runs rspamd in the foreground (``-f``) with Debian's top-level
configuration (``/etc/rspamd/rspamd.conf``) and a local configuration directory of its own
(``--var LOCAL_CONFDIR``): ``local.d`` is what the ``pyqmail_scanners`` role installs
(``roles/pyqmail_scanners/files/rspamd/local.d``, and its templates that turn SPF, DKIM,
DMARC and ARC off while pyqmail-smtpd computes them and set the DNS servers), and
``rspamd.conf.local.override`` the role's offline switch (``pyqmail_scanners__rspamd_offline``,
as the molecule scenario sets it: the modules that reach other hosts off, DNS to a loopback
port where nothing answers), so that a test's rspamd talks to loopback only; ``override.d``
holds what only tests want (``TEST_OPTIONS``), binds its workers to free loopback ports and
logs to the console. Its database and run directories are its
own, never /var/lib/rspamd or /run/rspamd. Start-up is about a second: hyperscan is off
(its compile takes ~20 s) and the list of top-level domains is a small one (the full one
takes ~15 s to compile).

``Clamd(workdir)`` runs clamd in the foreground with a signature database the test writes:
one ``.hdb`` line with EICAR's MD5 (freshclam never runs: it cannot reach its mirrors here).

Both stop by their PID on exit (``stop``), and can be stopped in the middle of a test to
prove what a missing scanner gets.

``FakeScanner(reply)`` is no scanner: a loopback server that accepts and never answers
(``reply`` None), or reads the request and sends ``reply`` (garbage, a hostile answer, or
one byte at a time with ``trickle``); what a broken scanner does, for the failure tests.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

import jinja2
import yaml

REPO = Path(__file__).resolve().parents[1]
ROLE = REPO / "roles" / "pyqmail_scanners"
ROLE_LOCAL_D = ROLE / "files" / "rspamd" / "local.d"
AUTH_MODULE = ROLE / "templates" / "etc" / "rspamd" / "local.d" / "auth-module.conf.j2"
AUTH_MODULES = ("spf", "dkim", "dmarc", "arc")
OPTIONS = ROLE / "templates" / "etc" / "rspamd" / "local.d" / "options.inc.j2"
OFFLINE = ROLE / "templates" / "etc" / "rspamd" / "rspamd.conf.local.override.j2"
ROLE_VARS = ROLE / "vars" / "main.yml"
RSPAMD = shutil.which("rspamd") or "/usr/bin/rspamd"
CLAMD = shutil.which("clamd") or "/usr/sbin/clamd"
RSPAMD_USER = "_rspamd"

# The test strings, kept encoded so that no scanner flags this source file itself.
GTUBE = base64.b64decode(
    b"WEpTKkM0SkRCUUFETjEuTlNCTjMqMklETkVOKkdUVUJFLVNUQU5EQVJELUFOVEktVUJFLVRFU1QtRU1BSUwqQy4zNFg="
)
EICAR = base64.b64decode(
    b"WDVPIVAlQEFQWzRcUFpYNTQoUF4pN0NDKTd9JEVJQ0FSLVNUQU5EQVJELUFOVElWSVJVUy1URVNULUZJTEUhJEgrSCo="
)
# rspamd's test patterns (option enable_test_patterns): GTUBE with Y for "add header".
GTUBE_ADD_HEADER = b"Y" + GTUBE[1:]

TEST_OPTIONS = """\
# tests/scanners.py: only for tests (never in the role's configuration)
disable_hyperscan = true;
enable_test_patterns = true;
url_tld = "{tld}";
"""


def with_attachment(payload: bytes) -> bytes:
    """A MIME message carrying ``payload`` as a base64 attachment (as viruses travel)."""
    return (
        b"From: Alice <alice@client.test>\r\nTo: <u@mx.test>\r\nSubject: notes\r\n"
        b"Message-ID: <2@client.test>\r\nDate: Wed, 02 Dec 2026 10:00:00 +0000\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n"
        b"--b1\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--b1\r\n"
        b"Content-Type: application/octet-stream; name=notes.txt\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(payload) + b"\r\n--b1--\r\n"
    )


def render(template: Path, **variables: object) -> str:
    """One of the role's templates rendered as Ansible renders it (trim_blocks, its ``bool``
    filter)."""
    env = jinja2.Environment(trim_blocks=True, keep_trailing_newline=True, autoescape=False)  # noqa: S701 - not HTML
    env.filters["bool"] = lambda v: str(v).strip().lower() in ("1", "true", "yes", "on")
    return env.from_string(template.read_text()).render(
        ansible_managed="tests/scanners.py", **variables
    )


def auth_module_conf(*, pyqmail_checks: bool) -> str:
    """The role's local.d file of rspamd's SPF, DKIM, DMARC and ARC modules: off while
    pyqmail-smtpd's own checks are on."""
    return render(AUTH_MODULE, pyqmail_scanners__pyqmail_checks=pyqmail_checks)


def network_modules() -> list[str]:
    """The role's list of rspamd's modules that reach other hosts (vars/main.yml)."""
    return list(yaml.safe_load(ROLE_VARS.read_text())["pyqmail_scanners__rspamd_network_modules"])


def role_default(name: str) -> object:
    """One of the role's defaults (defaults/main.yml)."""
    return yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())[name]


def role_var(name: str) -> object:
    """One of the role's fixed variables (vars/main.yml; plain values only, not templates)."""
    return yaml.safe_load(ROLE_VARS.read_text())[name]


def dns_conf(
    servers: list[str], *, offline: bool, keep: tuple[str, ...] = (), max_size: int | None = None
) -> tuple[str, str]:
    """The role's ``local.d/options.inc`` and ``rspamd.conf.local.override`` for these DNS
    servers and offline switch (``keep``: network modules a test leaves on; ``max_size``:
    ``pyqmail_scanners__rspamd_max_size``, None: the role's default)."""
    if max_size is None:
        max_size = int(str(role_default("pyqmail_scanners__rspamd_max_size")))
    variables = {
        "pyqmail_scanners__rspamd_max_size": max_size,
        "pyqmail_scanners__headroom": role_var("pyqmail_scanners__headroom"),
        "pyqmail_scanners__rspamd_dns_servers": servers,
        "pyqmail_scanners__rspamd_offline": offline,
        "pyqmail_scanners__rspamd_network_modules": [m for m in network_modules() if m not in keep],
    }
    return render(OPTIONS, **variables), render(OFFLINE, **variables)


def clamd_limits(max_size: int, timeout: object = None, alert: object = None) -> str:
    """The limit lines of the role's clamd.conf (StreamMaxLength, MaxScanSize, MaxFileSize,
    AlertExceedsMax, MaxScanTime) for ``pyqmail_scanners__clamd_max_size`` ``max_size``,
    ``pyqmail_scanners__timeout`` ``timeout`` and ``pyqmail_scanners__clamd_alert_exceeds_max``
    ``alert`` (None: the role's defaults)."""
    if timeout is None:
        timeout = role_default("pyqmail_scanners__timeout")
    if alert is None:
        alert = role_default("pyqmail_scanners__clamd_alert_exceeds_max")
    conf = render(
        ROLE / "templates" / "etc" / "clamav" / "pyqmail-clamd.conf.j2",
        pyqmail_scanners__clamd_max_size=max_size,
        pyqmail_scanners__headroom=role_var("pyqmail_scanners__headroom"),
        pyqmail_scanners__timeout=timeout,
        pyqmail_scanners__clamd_alert_exceeds_max=alert,
        pyqmail_scanners__clamd_listen="/run/clamav/clamd.ctl",
        pyqmail_scanners__clamd_service="clamd",
        pyqmail_scanners__clamav_database_dir="/var/lib/clamav",
    )
    names = ("StreamMaxLength", "MaxScanSize", "MaxFileSize", "AlertExceedsMax", "MaxScanTime")
    return "".join(line + "\n" for line in conf.splitlines() if line.split(" ")[0] in names)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(
    predicate: object, proc: subprocess.Popen[bytes], log: Path, what: str, limit: float = 60
) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up within {limit:g} s:\n{log.read_text()[-3000:]}")


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2) as s:
        s.sendall(b"GET /ping HTTP/1.0\r\n\r\n")
        return b"pong" in s.recv(4096)
    return False


class _Process:
    """A daemon started by a test and stopped by its PID."""

    proc: subprocess.Popen[bytes] | None = None
    dir: Path

    def stop(self) -> None:
        """TERM, then KILL; idempotent."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Rspamd(_Process):
    """rspamd's normal worker on 127.0.0.1:``port`` (and its proxy on ``proxy_port``)."""

    def __init__(
        self,
        dns_port: int = 1,
        *,
        fast_start: bool = True,
        normal_workers: int | None = None,
        start_timeout: float = 60,
        keep: tuple[str, ...] = (),
        local: dict[str, str] | None = None,
        options: str = "",
        max_size: int | None = None,
    ) -> None:
        self.fast_start = fast_start  # False: hyperscan and the full TLD list (bench/scan_load.py)
        # None: rspamd's default (one normal worker per core beyond two, at least one).
        self.normal_workers = normal_workers
        self.start_timeout = start_timeout  # hyperscan's first compile on a busy host: minutes
        # Modules of the offline list left on (hfilter: it only asks the DNS rspamd cannot
        # reach here, and fails fast), and test-only local.d files ({name: text}).
        self.keep = keep
        self.local = dict(local or {})
        self.options = options  # more of override.d/options.inc (max_message = 65536;)
        self.max_size = max_size  # the role's pyqmail_scanners__rspamd_max_size (None: default)
        self.dir = Path(tempfile.mkdtemp(prefix="pyqmail-rspamd-"))
        self.dir.chmod(0o755)
        self.port, self.proxy_port, self.controller_port = free_port(), free_port(), free_port()
        self.dns_port = dns_port
        self.log = self.dir / "rspamd.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _configure(self) -> None:
        conf = self.dir / "conf"
        shutil.copytree(ROLE_LOCAL_D, conf / "local.d")
        for module in AUTH_MODULES:
            (conf / "local.d" / f"{module}.conf").write_text(auth_module_conf(pyqmail_checks=True))
        (self.dir / "tld.dat").write_text("com\norg\nnet\ntest\nexample\ninvalid\n")
        options, offline = dns_conf(
            [f"127.0.0.1:{self.dns_port}"], offline=True, keep=self.keep, max_size=self.max_size
        )
        (conf / "local.d" / "options.inc").write_text(options)
        for name, text in self.local.items():
            with (conf / "local.d" / name).open("a") as extra:
                extra.write(text)
        (conf / "rspamd.conf.local.override").write_text(offline)
        test_options = TEST_OPTIONS.format(tld=self.dir / "tld.dat")
        if not self.fast_start:
            test_options = "\n".join(
                ln
                for ln in test_options.splitlines()
                if not ln.startswith(("disable_hyperscan", "url_tld"))
            )
        over = conf / "override.d"
        over.mkdir()
        (over / "options.inc").write_text(test_options + "\n" + self.options)
        for worker, port in (("normal", self.port), ("controller", self.controller_port)):
            (over / f"worker-{worker}.inc").write_text(f'bind_socket = "127.0.0.1:{port}";\n')
        if self.normal_workers is not None:
            with (over / "worker-normal.inc").open("a") as normal:
                normal.write(f"count = {self.normal_workers};\n")
        # The proxy in milter mode (Postfix's way, bench/scan_load.py) passes each message to
        # the same normal worker pyqmail-smtpd asks.
        (over / "worker-proxy.inc").write_text(
            f'bind_socket = "127.0.0.1:{self.proxy_port}";\nmilter = yes;\ntimeout = 120s;\n'
            f'upstream "local" {{\n  default = yes;\n  hosts = "127.0.0.1:{self.port}";\n}}\n'
            'count = 1;\nspam_header = "X-Spam";\ndiscard_on_reject = false;\n'
            'quarantine_on_reject = false;\nreject_message = "Spam message rejected";\n'
        )
        (over / "logging.inc").write_text('type = "console";\nlevel = "error";\n')
        for sub in ("db", "run"):
            (self.dir / sub).mkdir()
            if os.geteuid() == 0:
                pw = pwd.getpwnam(RSPAMD_USER)
                os.chown(self.dir / sub, pw.pw_uid, pw.pw_gid)
        for path in [conf, *conf.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)

    def command(self) -> list[str]:
        user = ["-u", RSPAMD_USER, "-g", RSPAMD_USER] if os.geteuid() == 0 else []
        variables = {
            "CONFDIR": "/etc/rspamd",
            "LOCAL_CONFDIR": str(self.dir / "conf"),
            "DBDIR": str(self.dir / "db"),
            "RUNDIR": str(self.dir / "run"),
            "LOGDIR": str(self.dir),
        }
        vars_args = [a for k, v in variables.items() for a in ("--var", f"{k}={v}")]
        return [RSPAMD, "-f", *user, "-c", "/etc/rspamd/rspamd.conf", *vars_args]

    def start(self) -> Rspamd:
        if not (self.dir / "conf").exists():
            self._configure()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        _wait(lambda: _accepts(self.port), self.proc, self.log, "rspamd", self.start_timeout)
        return self

    def __enter__(self) -> Rspamd:
        return self.start()


def eicar_database(directory: Path) -> Path:
    """A signature database of one line: EICAR's MD5, its size and a name (``.hdb``)."""
    directory.mkdir(parents=True, exist_ok=True)
    db = directory / "pyqmail-test.hdb"
    db.write_text(f"{hashlib.md5(EICAR).hexdigest()}:{len(EICAR)}:Eicar-Test-Signature\n")  # noqa: S324 - clamd's format
    return db


class Clamd(_Process):
    """clamd on a Unix socket (``socket``) and 127.0.0.1:``port``."""

    def __init__(self, stream_max: str | None = None, limits: str = "") -> None:
        self.stream_max = stream_max  # clamd's StreamMaxLength ("1M"); None: its default
        self.limits = limits  # more lines of clamd.conf (the role's: ``clamd_limits``)
        self.dir = Path(tempfile.mkdtemp(prefix="pyqmail-clamd-"))
        self.dir.chmod(0o755)
        self.socket = self.dir / "clamd.sock"
        self.port = free_port()
        self.log = self.dir / "clamd.log"

    def start(self) -> Clamd:
        eicar_database(self.dir / "db")
        conf = self.dir / "clamd.conf"
        conf.write_text(
            f"LocalSocket {self.socket}\nLocalSocketMode 666\nTCPSocket {self.port}\n"
            f"TCPAddr 127.0.0.1\nDatabaseDirectory {self.dir / 'db'}\nForeground yes\n"
            f"PidFile {self.dir / 'clamd.pid'}\n"
            + (f"StreamMaxLength {self.stream_max}\n" if self.stream_max else "")
            + self.limits
        )
        self.socket.unlink(missing_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [CLAMD, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        _wait(self.socket.exists, self.proc, self.log, "clamd")
        return self

    def __enter__(self) -> Clamd:
        return self.start()


class FakeScanner:
    """A loopback server that accepts and then hangs, or answers ``reply`` once it read
    the request (the tests' stand-in for a broken scanner, not for rspamd)."""

    def __init__(self, reply: bytes | None, trickle: float = 0.0) -> None:
        self.reply = reply
        self.trickle = trickle  # seconds between the reply's bytes (a slowloris scanner)
        self.requests: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
                if self.reply is not None:
                    threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        """Read the request (up to its body's length), then send the reply."""
        conn.settimeout(5)
        with contextlib.suppress(OSError):
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536) or b"\r\n\r\n"
            head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
            length = next(
                (int(v) for k, _, v in (ln.partition(": ") for ln in head.split("\r\n"))
                 if k.lower() == "content-length"), 0,
            )  # fmt: skip
            while len(data) < len(head) + 4 + length:
                data += conn.recv(65536) or b" " * length
            self.requests.append(data)
            assert self.reply is not None
            if self.trickle:
                for i in range(len(self.reply)):
                    conn.sendall(self.reply[i : i + 1])
                    time.sleep(self.trickle)
            else:
                conn.sendall(self.reply)
            conn.close()

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()
