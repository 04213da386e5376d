"""The daemon as a process: start-up errors, signals, workers, privileges, limits, faults."""

from __future__ import annotations

import os
import pwd
import signal
import smtplib
import socket
import ssl
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import IMPOSSIBLE_HERE, PKI
from tests.e2e.conftest import DROP_USER, IS_ROOT, QmailRoot, StartDaemon, smtpd_command
from tests.e2e.helpers import MESSAGE, RawSMTP, client_context, open_data


def run_smtpd(args: list[str]) -> subprocess.CompletedProcess[str]:
    if IS_ROOT and "--user" not in args:
        args = [*args, "--user", DROP_USER]
    return subprocess.run(
        [*smtpd_command(), *args], capture_output=True, text=True, timeout=30, check=False
    )


# --- start-up ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--listen", "0.0.0.0:0"], "refusing to listen on every address"),
        (["--listen", "[::]:0"], "refusing to listen on every address"),
        (["--listen", "localhost:25"], "is not an IP address"),
        (["--listen", "127.0.0.1"], "expected IP:PORT"),
        (["--listen", "127.0.0.1:99999"], "port must be a number"),
        (["--listen", "127.0.0.1:0", "--workers", "0"], "--workers '0'"),
        (["--listen", "127.0.0.1:0", "--workers", "many"], "--workers 'many'"),
    ],
)
def test_bad_command_lines(qmail_root: QmailRoot, argv: list[str], message: str) -> None:
    proc = run_smtpd(["--root", str(qmail_root.path), *argv])
    assert proc.returncode == 111
    assert message in proc.stderr


@pytest.mark.parametrize("fds", ["999", "x", ""])
def test_a_supervise_flag_without_its_sockets_is_a_clear_error(
    qmail_root: QmailRoot, fds: str
) -> None:
    """``--supervise=FD,...`` is what the daemon passes itself when it becomes its own
    supervisor (pyqmail.smtpd.entry); by hand, with descriptors that are not open, it
    names them and exits 111 rather than supervising nothing."""
    proc = run_smtpd(
        [f"--supervise={fds}", "--root", str(qmail_root.path), "--listen", "127.0.0.1:0"]
    )
    assert proc.returncode == 111
    assert f"pyqmail-smtpd: fatal: --supervise={fds}: " in proc.stderr


def test_unknown_mode_is_a_usage_error(qmail_root: QmailRoot) -> None:
    proc = run_smtpd(["--root", str(qmail_root.path), "--listen", "127.0.0.1:0", "--mode", "x"])
    assert proc.returncode == 2
    assert "invalid choice: 'x'" in proc.stderr


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("databytes", "10M\n", "control/databytes:1: not a non-negative integer: '10M'"),
        ("maxrcpt", "# limit\n-5\n", "control/maxrcpt:2: not a non-negative integer"),
        ("rcpthosts", "ok.test\nbad..domain\n", "control/rcpthosts:2: not a valid domain"),
        ("rcpthosts", "ok.test\r\n", "control/rcpthosts:1: carriage return"),
        ("me", "two words\n", "control/me:1: not a valid host name"),
        ("timeoutsmtpd", "0\n", "control/timeoutsmtpd:1: 0 is out of range"),
        ("validrcptto", "user-without-domain\n", "control/validrcptto:1: expected user@domain"),
        ("smtpusers", "broken line without hash\n", "smtpusers"),
        ("servercert.pem", "not a pem\n", "servercert.pem: no private key"),
    ],
)
def test_bad_control_files_name_file_and_line(
    qmail_root: QmailRoot, name: str, content: str, message: str
) -> None:
    qmail_root.control(name, content)
    proc = run_smtpd(["--root", str(qmail_root.path), "--listen", "127.0.0.1:0"])
    assert proc.returncode == 111, proc.stdout + proc.stderr
    assert message in proc.stderr


def test_key_and_certificate_mismatch(qmail_root: QmailRoot, pki: PKI) -> None:
    qmail_root.control(
        "servercert.pem", pki.client.key_pem + pki.server.cert_pem + pki.ca.cert_pem, 0o400
    )
    proc = run_smtpd(["--root", str(qmail_root.path), "--listen", "127.0.0.1:0"])
    assert proc.returncode == 111
    assert "servercert.pem: the private key does not match the certificate" in proc.stderr


def test_tls_modes_need_a_certificate(qmail_root: QmailRoot) -> None:
    qmail_root.remove_control("servercert.pem")
    for mode in ("smtps", "submission"):
        proc = run_smtpd(
            ["--root", str(qmail_root.path), "--listen", "127.0.0.1:0", "--mode", mode]
        )
        assert proc.returncode == 111
        assert f"--mode {mode} needs TLS" in proc.stderr


def test_missing_rules_cdb_is_fatal(qmail_root: QmailRoot) -> None:
    proc = run_smtpd(
        [
            "--root",
            str(qmail_root.path),
            "--listen",
            "127.0.0.1:0",
            "--rules",
            "/nonexistent/x.cdb",
        ]
    )
    assert proc.returncode == 111
    assert "/nonexistent/x.cdb: cannot read rules" in proc.stderr


@pytest.mark.skipif(
    not IS_ROOT, reason=f"{IMPOSSIBLE_HERE} only root can be asked to drop privileges"
)
def test_root_without_user_is_refused(qmail_root: QmailRoot) -> None:
    proc = subprocess.run(
        [*smtpd_command(), "--root", str(qmail_root.path), "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 111
    assert "refusing to serve as root" in proc.stderr


# --- processes -----------------------------------------------------------------------------


def _status(pid: int, field: str) -> list[int]:
    """Numbers on the ``field:`` line of /proc/PID/status (Uid, Gid, Groups)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no {field} line for {pid}")


def test_two_workers_both_serve(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    d = smtpd(workers=2)
    workers = d.worker_pids()
    assert len(workers) == 2
    assert d.pid not in workers
    for _ in range(24):
        with smtplib.SMTP(d.host, d.port, timeout=10) as s:
            s.noop()
    serving = {int(m.group(1)) for m in d.wait_for(r"pid=(\d+) conn ip=", count=24)}
    assert serving == workers, f"connections were served by {serving}, workers are {workers}"


@pytest.mark.skipif(not IS_ROOT, reason=f"{IMPOSSIBLE_HERE} privilege drop needs root")
def test_privileges_dropped_before_serving(smtpd: StartDaemon) -> None:
    d = smtpd(workers=2)
    nobody = pwd.getpwnam(DROP_USER)
    d.wait_for(rf"start listen=\S+ mode=smtp workers=2 uid={nobody.pw_uid}")
    workers = d.worker_pids()
    assert len(workers) == 2 and d.pid not in workers
    for pid in workers:
        assert _status(pid, "Uid") == [nobody.pw_uid] * 4, f"pid {pid} kept another uid"
        assert _status(pid, "Gid") == [nobody.pw_gid] * 4, f"pid {pid} kept another gid"
        assert 0 not in _status(pid, "Groups"), f"pid {pid} kept group root"
    # The supervisor keeps root, as Postfix's master does: only it can fork the spawner of a
    # replacement, which imports the daemon before its drop (pyqmail.smtpd.prefork).
    assert _status(d.pid, "Uid") == [0] * 4


@pytest.mark.skipif(
    not IS_ROOT, reason=f"{IMPOSSIBLE_HERE} creating it in root's <root> needs root"
)
def test_root_makes_the_login_locks_directory_before_its_drop(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    """No role made <root>/auth (an installation by hand, or a daemon restarted before the
    role's run): root makes it before the drop, as pyqmail.authdir says; the user it drops
    to could not (<root> is root's)."""
    auth = qmail_root.path / "auth"
    assert not auth.exists()
    smtpd().wait_for(r"start listen=")
    assert auth.is_dir() and stat.S_IMODE(auth.stat().st_mode) == 0o2770


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_the_supervisor_is_small_and_its_workers_its_children(smtpd: StartDaemon) -> None:
    """The supervisor is the program exec'd afresh after the bind (pyqmail.smtpd.entry): it
    has loaded neither OpenSSL's Python module nor an event loop nor the configuration's
    modules, and it is the parent of the workers its spawners forked (a child subreaper);
    its command line still ends with the daemon's own arguments."""
    d = smtpd(workers=2)
    workers = d.worker_pids()
    maps = Path(f"/proc/{d.pid}/maps").read_text()
    for module in ("_ssl.", "_asyncio.", "libssl.so", "libcrypto.so", "_hashlib."):
        assert module not in maps, f"the supervisor loaded {module}"
    for pid in workers:
        assert "_ssl." in Path(f"/proc/{pid}/maps").read_text()
        deadline = time.monotonic() + 10  # its spawner exits just after the fork
        while _parent(pid) != d.pid and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _parent(pid) == d.pid, f"worker {pid}'s parent is {_parent(pid)}, not {d.pid}"
    cmdline = Path(f"/proc/{d.pid}/cmdline").read_bytes().split(b"\0")
    assert any(arg.startswith(b"--supervise=") for arg in cmdline), cmdline


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_workers_stop_when_the_supervisor_is_killed(smtpd: StartDaemon) -> None:
    d = smtpd(workers=2)
    workers = d.worker_pids()
    os.kill(d.pid, signal.SIGKILL)
    d.proc.wait(5)
    deadline = time.monotonic() + 5
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, workers)), "orphaned workers kept serving"


def test_ipv6_loopback(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    if not socket.has_ipv6:
        pytest.skip(f"{IMPOSSIBLE_HERE} no IPv6 in this Python")
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError as exc:
        pytest.skip(f"{IMPOSSIBLE_HERE} no ::1 here: {exc}")
    d = smtpd(listen="[::1]:0")
    assert d.host == "::1"
    with smtplib.SMTP(d.host, d.port, timeout=10) as s:
        assert s.sendmail("s@remote.test", ["user@example.test"], MESSAGE) == {}
    [(env, _)] = qmail_root.queued()
    assert env.meta["client"] == "::1"


def test_worker_crash_is_replaced(smtpd: StartDaemon) -> None:
    d = smtpd(workers=2)
    victim = sorted(d.worker_pids())[0]
    os.kill(victim, signal.SIGKILL)
    d.wait_for(rf"worker-exit worker={victim} slot=\d status=-9")
    d.wait_for(r"pid=\d+ ready", count=3)
    for _ in range(6):
        with smtplib.SMTP(d.host, d.port, timeout=10) as s:
            assert s.noop()[0] == 250
    assert d.stop() == 0


def test_a_replacement_waits_for_a_configuration_that_loads(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    """A dead worker's replacement reads the configuration on disk (pyqmail.smtpd.prefork):
    while that is broken its spawner fails, says why, and is tried again later each time;
    the slot's socket is closed meanwhile, so every connection reaches the other worker at
    once (none waits in a backlog nobody accepts from), and once the file is good the slot
    is filled again, on a new socket of the same port."""
    d = smtpd(workers=2)
    victim = sorted(d.worker_pids())[0]
    qmail_root.control("databytes", "lots\n")
    os.kill(victim, signal.SIGKILL)
    d.wait_for(r"spawn-fail slots=\d error=\S*control/databytes:1:", timeout=30)
    tries = d.wait_for(r"respawn-fail slot=\d retry=(\d+)s text=its\\x20socket\\x20closed", count=2)
    assert int(tries[1].group(1)) == 2 * int(tries[0].group(1))  # waiting longer each time
    for _ in range(8):
        with smtplib.SMTP(d.host, d.port, timeout=5) as s:
            assert s.noop()[0] == 250
    qmail_root.control("databytes", "100\n")
    d.send_signal(signal.SIGHUP)  # a good HUP: the waiting replacement is tried at once
    d.wait_for(r"pid=\d+ ready", count=3, timeout=30)
    for _ in range(24):
        with smtplib.SMTP(d.host, d.port, timeout=5) as s:
            assert s.noop()[0] == 250
    served = {int(m.group(1)) for m in d.wait_for(r"pid=(\d+) conn ip=", count=32)}
    assert served == d.worker_pids() - {victim}, "both slots serve again"
    assert d.stop() == 0


def test_a_worker_that_dies_at_once_leaves_no_socket_unserved(smtpd: StartDaemon) -> None:
    """A replacement that dies within a second waits 1, 2, 4, 8 ... seconds for its own
    replacement (pyqmail.smtpd.prefork); its slot's socket is closed meanwhile, so no
    connection waits out that time in a backlog nobody accepts from (SO_REUSEPORT would
    give that socket its share): every connection is greeted by the other worker at once."""
    d = smtpd(workers=2)
    victim = min(d.worker_pids())
    os.kill(victim, signal.SIGKILL)  # an old worker: replaced at once
    for killed in range(4):  # each replacement killed as soon as it is ready
        ready = d.wait_for(r"pid=(\d+) ready", count=3 + killed, timeout=30)
        os.kill(int(ready[-1].group(1)), signal.SIGKILL)
    d.wait_for(r"worker-exit worker=\d+ slot=\d status=-9", count=5)
    for _ in range(8):
        with smtplib.SMTP(d.host, d.port, timeout=5) as s:
            assert s.noop()[0] == 250
    assert d.stop() == 0


def test_term_lets_a_message_in_flight_finish(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    qmail_root.control("timeoutterm", "20\n")
    d = smtpd()
    c = d.connect()
    open_data(c)
    c.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
    t0 = time.monotonic()
    d.send_signal(signal.SIGTERM)
    d.wait_for(r"stopping sessions=1")
    with pytest.raises(OSError):  # no longer accepting
        smtplib.SMTP(d.host, d.port, timeout=2).close()
    code, lines = c.cmd("second half\r\n.")
    assert code == 250, lines
    code, _ = c.cmd("NOOP")
    assert code == 421, "after the message the session is told to go"
    assert c.is_closed(5)
    assert d.wait_exit(30) == 0
    assert time.monotonic() - t0 < 15, "exit must follow the last session, not the grace"
    [(_, body)] = qmail_root.queued()
    assert body.endswith(b"first half\r\nsecond half\r\n")


def test_term_grace_is_bounded(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    qmail_root.control("timeoutterm", "1\n")
    d = smtpd()
    c = d.connect()
    open_data(c)
    c.send(b"Subject: never finished\r\n\r\n")
    t0 = time.monotonic()
    d.send_signal(signal.SIGTERM)
    assert c.reply()[0] == 421
    assert d.wait_exit(30) == 0
    assert time.monotonic() - t0 < 10
    assert qmail_root.queued() == []
    assert qmail_root.tmp_files() == []


def _over_tls(c: RawSMTP, pki: PKI) -> None:
    """Greeting, EHLO, STARTTLS and the handshake: the session continues over TLS."""
    assert c.reply()[0] == 220
    c.cmd("EHLO client.test")
    assert c.cmd("STARTTLS")[0] == 220
    c.sock = client_context(pki).wrap_socket(c.sock, server_hostname="localhost")
    assert c.cmd("EHLO client.test")[0] == 250


def test_term_grace_421_reaches_a_tls_client(
    qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI
) -> None:
    """The 421 at the end of the TERM grace is written outside a batch of replies
    (``force_shutdown``): it must still leave, encrypted, before the close."""
    qmail_root.control("timeoutterm", "1\n")
    d = smtpd()
    c = d.connect()
    _over_tls(c, pki)
    c.cmd("MAIL FROM:<s@remote.test>")
    c.cmd("RCPT TO:<user@example.test>")
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: never finished\r\n\r\n")
    d.send_signal(signal.SIGTERM)
    code, lines = c.reply()
    assert code == 421 and lines[0].startswith("421 4.3.2"), lines
    assert d.wait_exit(30) == 0
    assert qmail_root.queued() == []


def test_idle_tls_client_gets_its_421(qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI) -> None:
    qmail_root.control("timeoutsmtpd", "1\n")
    d = smtpd()
    c = d.connect()
    _over_tls(c, pki)
    code, lines = c.reply()
    assert code == 421 and "4.4.2" in lines[0], lines
    d.wait_for(r"timeout ip=127\.0\.0\.1 port=\d+ phase=idle")


def test_hup_swaps_certificate_without_dropping_connections(
    qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI
) -> None:
    d = smtpd(workers=2)
    old_serial = pki.server.cert.serial_number
    # a session that started with the old configuration
    open_before = smtplib.SMTP(d.host, d.port, timeout=10)
    open_before.ehlo("early.test")
    new_leaf = pki.ca.issue(["localhost", "mx.test", "127.0.0.1"])
    qmail_root.servercert(new_leaf)
    d.send_signal(signal.SIGHUP)
    d.wait_for(r"pid=\d+ reload root=", timeout=30, count=2)

    def serial_seen() -> int:
        with smtplib.SMTP(d.host, d.port, timeout=10) as s:
            s.starttls(context=client_context(pki))
            assert isinstance(s.sock, ssl.SSLSocket)
            der = s.sock.getpeercert(binary_form=True)
            assert der is not None
        from cryptography import x509

        return int(x509.load_der_x509_certificate(der).serial_number)

    assert {serial_seen() for _ in range(6)} == {new_leaf.cert.serial_number}
    # the early session is alive and still completes a message
    assert open_before.noop()[0] == 250
    open_before.starttls(context=client_context(pki))
    assert isinstance(open_before.sock, ssl.SSLSocket)
    assert open_before.sock.getpeercert() is not None
    open_before.sendmail("s@remote.test", ["user@example.test"], MESSAGE)
    open_before.quit()
    assert len(qmail_root.queued()) == 1
    assert old_serial != new_leaf.cert.serial_number


def test_hup_with_bad_config_keeps_the_old_one(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    d = smtpd(workers=2)
    qmail_root.control("databytes", "lots\n")
    d.send_signal(signal.SIGHUP)
    d.wait_for(r"reload-fail error=\S*control/databytes:1:", timeout=30)
    with smtplib.SMTP(d.host, d.port, timeout=10) as s:
        assert s.sendmail("s@remote.test", ["user@example.test"], MESSAGE) == {}
    qmail_root.control("databytes", "100\n")
    d.send_signal(signal.SIGHUP)
    d.wait_for(r"pid=\d+ reload root=", timeout=30, count=2)
    with smtplib.SMTP(d.host, d.port, timeout=10) as s:
        s.ehlo("client.test")
        assert s.esmtp_features["size"] == "100"


# --- limits and timeouts -------------------------------------------------------------------


def test_too_many_connections_per_ip(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    qmail_root.control("maxconnip", "2\n")
    d = smtpd(workers=2)
    first, second = d.connect(), d.connect()
    assert first.reply()[0] == 220
    assert second.reply()[0] == 220
    third = d.connect()
    code, lines = third.reply()
    assert code == 421 and lines[0].startswith("421 4.7.0"), lines
    assert third.is_closed(5)
    d.wait_for(r"refuse ip=127\.0\.0\.1 port=\d+ reason=maxconnip=2")
    first.cmd("QUIT")
    assert first.is_closed(5)
    d.wait_for(r"conn ip=127\.0\.0\.1")
    fourth = d.connect()
    assert fourth.reply()[0] == 220, "a freed slot is reusable"


def test_total_connection_limit(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    qmail_root.control("maxconn", "1\n")
    d = smtpd()
    first = d.connect()
    assert first.reply()[0] == 220
    second = d.connect()
    assert second.reply()[0] == 421
    d.wait_for(r"refuse ip=127\.0\.0\.1 port=\d+ reason=maxconn=1")


def test_maxerrors_drops_a_noisy_client(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    qmail_root.control("maxerrors", "2\n")
    d = smtpd()
    c = d.connect()
    c.reply()
    c.cmd("EHLO client.test")
    assert c.cmd("BOGUS one")[0] == 502
    assert c.cmd("BOGUS two")[0] == 502
    code, lines = c.cmd("NOOP")
    assert code == 421 and lines[0].startswith("421 4.7.0"), lines
    assert c.is_closed(5)


def test_idle_client_is_dropped(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    qmail_root.control("timeoutsmtpd", "1\n")
    d = smtpd()
    c = d.connect()
    assert c.reply()[0] == 220
    code, lines = c.reply()
    assert code == 421 and "4.4.2" in lines[0], lines
    assert c.is_closed(5)
    d.wait_for(r"timeout ip=127\.0\.0\.1 port=\d+ phase=idle")


def test_slow_drip_does_not_reset_the_timer(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    """Slowloris: bytes that never complete a command are not progress."""
    qmail_root.control("timeoutsmtpd", "2\n")
    d = smtpd()
    c = d.connect()
    c.reply()
    t0 = time.monotonic()
    with pytest.raises((ConnectionError, OSError)):
        for ch in b"EHLO a-very-slow-client-that-never-finishes-its-line.example.test":
            c.send(bytes([ch]))
            time.sleep(0.25)
    assert time.monotonic() - t0 < 12
    d.wait_for(r"timeout ip=127\.0\.0\.1 port=\d+ phase=idle")


def test_data_phase_has_a_total_deadline(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    qmail_root.control("timeoutdata", "2\n")
    d = smtpd()
    c = d.connect()
    open_data(c)
    t0 = time.monotonic()
    with pytest.raises((ConnectionError, OSError)):
        for _ in range(80):
            c.send(b"a line that keeps the idle timer happy\r\n")
            time.sleep(0.2)
    assert time.monotonic() - t0 < 12
    d.wait_for(r"timeout ip=127\.0\.0\.1 port=\d+ phase=data")
    assert qmail_root.tmp_files() == []


def test_stalled_tls_handshake_is_dropped(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    qmail_root.control("timeouttls", "1\n")
    d = smtpd(mode="smtps")
    c = d.connect()
    c.send(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
    assert c.is_closed(5)
    d.wait_for(r"tls-fail ip=127\.0\.0\.1")


# --- queue faults --------------------------------------------------------------------------


def _send_big(d_host: str, d_port: int, size: int) -> tuple[int, bytes]:
    with smtplib.SMTP(d_host, d_port, timeout=20) as s:
        s.ehlo("client.test")
        s.mail("s@remote.test")
        s.rcpt("user@example.test")
        body = b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * (size // 72)
        return s.data(body)


def test_file_size_limit_gives_451_and_leaves_nothing(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    """EFBIG from RLIMIT_FSIZE is a real write error in the middle of a message."""
    d = smtpd(wrapper=["prlimit", "--fsize=65536:65536"])
    code, text = _send_big(d.host, d.port, 200_000)
    assert code == 451, text
    assert text.startswith(b"4.3.0")
    assert qmail_root.queued() == []
    assert qmail_root.tmp_files() == []
    d.wait_for(r"queue-fail ip=127\.0\.0\.1")
    code, _ = _send_big(d.host, d.port, 2_000)
    assert code == 250, "small messages still go through"


@pytest.mark.skipif(not IS_ROOT, reason=f"{IMPOSSIBLE_HERE} mounting a tmpfs needs root")
def test_disk_full_gives_451_and_leaves_nothing(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    queue = qmail_root.path / "queue"
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(queue)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"{IMPOSSIBLE_HERE} cannot mount tmpfs: {mounted.stderr.decode().strip()}")
    try:
        qmail_root.queue.create()
        nobody = pwd.getpwnam(DROP_USER)
        for path in [queue, *queue.rglob("*")]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        d = smtpd()
        code, text = _send_big(d.host, d.port, 1_000_000)
        assert code == 451, text
        assert qmail_root.queued() == []
        assert qmail_root.tmp_files() == []
        code, _ = _send_big(d.host, d.port, 2_000)
        assert code == 250
        d.stop()
    finally:
        subprocess.run(["umount", "-l", str(queue)], check=False)
