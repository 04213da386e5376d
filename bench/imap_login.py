"""IMAP login latency and a 1,000-message FETCH: Dovecot on pyqmail's users vs its own passwd-file.

    .venv/bin/python bench/imap_login.py [--parallel 20] [--rounds 5] [--messages 1000]

Starts private Dovecot instances (root needed: Dovecot switches to the mail user) on
127.0.0.1 with the role's own configuration template, one per variant:

- ``pyqmail``: passdb/userdb checkpassword = pyqmail-checkpassword over control/smtpusers
  (scrypt ln=14 r=8 p=1, 16 MiB, the SMTP AUTH hashes), users/logins and users/mailboxes;
  a Python process per login.
- ``passwd-file SHA512-CRYPT``: Dovecot's passwd-file with its common default scheme
  (5,000 rounds of SHA-512, no memory hardness), checked inside Dovecot's auth process.
- ``passwd-file ARGON2ID``: the same with Dovecot's memory-hard scheme (doveadm pw defaults).

Per variant: ``--rounds`` times ``--parallel`` IMAPS logins released together (TLS
handshake, LOGIN, LOGOUT, each client its own account), then one client FETCHes
``--messages`` 4 KiB messages (BODY.PEEK[]) from a fresh mailbox that pyqmail's local
delivery filled (Dovecot builds its index at that SELECT). Everything is removed at the end.
"""

from __future__ import annotations

import argparse
import grp
import imaplib
import os
import pwd
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import jinja2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from bench.certs import make_certs  # noqa: E402
from pyqmail import authdb  # noqa: E402
from pyqmail.send.local import maildir_deliver  # noqa: E402

TEMPLATE = REPO / "roles" / "pyqmail_dovecot" / "templates" / "etc" / "dovecot" / "dovecot.conf.j2"
MAIL_USER = "nobody"
DOMAIN = "bench.test"
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_@+"


@dataclass
class Variant:
    """One Dovecot setup under test."""

    name: str
    scheme: str | None  # None = pyqmail-checkpassword


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_root(base: Path, users: int, messages: int) -> Path:
    """A qmail root: smtpusers (scrypt), mailboxes, logins; box0 gets the FETCH messages."""
    root = base / "qmail"
    pw = pwd.getpwnam(MAIL_USER)
    for sub in ("control", "users", "homes"):
        (root / sub).mkdir(parents=True)
    db = authdb.AuthDB()
    boxes, logins = [], []
    for i in range(users):
        login = f"box{i}@{DOMAIN}"
        db.set(authdb.User(login, authdb.hash_password(f"password {i}")))
        boxes.append(f"box{i}:{root / 'homes' / f'box{i}'}")
        logins.append(f"{login}:box{i}")
        for sub in ("", "/Maildir", "/Maildir/cur", "/Maildir/new", "/Maildir/tmp"):
            Path(f"{root / 'homes' / f'box{i}'}{sub}").mkdir(mode=0o700)
    body = b"Subject: bench\r\nFrom: a@bench.test\r\n\r\n" + b"x" * 76 + b"\r\n"
    body += (b"y" * 76 + b"\r\n") * 52  # about 4 KiB
    for n in range(messages):
        maildir_deliver(
            root / "homes" / "box0" / "Maildir", body.replace(b"bench", f"m{n}".encode())
        )
    (root / "control" / "smtpusers").write_text(db.dump())
    (root / "control" / "smtpusers").chmod(0o640)
    (root / "users" / "mailboxes").write_text("\n".join(boxes) + "\n")
    (root / "users" / "logins").write_text("\n".join(logins) + "\n")
    for path in [root, *root.rglob("*")]:
        os.chown(path, pw.pw_uid, pw.pw_gid)
    return root


def passwd_file(root: Path, base: Path, scheme: str, users: int) -> Path:
    """Dovecot's own passwd-file with ``scheme`` hashes of the same passwords."""
    pw = pwd.getpwnam(MAIL_USER)
    lines = []
    for i in range(users):
        hashed = subprocess.run(
            ["doveadm", "pw", "-s", scheme, "-p", f"password {i}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        home = root / "homes" / f"box{i}"
        lines.append(f"box{i}@{DOMAIN}:{hashed}:{pw.pw_uid}:{pw.pw_gid}::{home}::")
    path = base / f"passwd-{scheme}"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o640)
    os.chown(path, 0, grp.getgrnam("dovecot").gr_gid)
    return path


def config(root: Path, base: Path, variant: Variant, port: int, users: int) -> Path:
    pw = pwd.getpwnam(MAIL_USER)
    group = grp.getgrgid(pw.pw_gid).gr_name
    env = jinja2.Environment(  # noqa: S701 - a configuration file, not HTML
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    text = env.from_string(TEMPLATE.read_text()).render(
        ansible_managed="bench/imap_login.py",
        dovecot_protocols=["imap"],
        dovecot_listen="127.0.0.1",
        dovecot_base_dir=str(base / f"run-{port}"),
        dovecot_state_dir=str(base / f"state-{port}"),
        dovecot_instance=f"bench-{port}",
        dovecot_greeting="bench",
        dovecot_servercert=str(base / "certs" / "combined.pem"),
        dovecot_username_chars=CHARS,
        dovecot_failure_delay=2,
        dovecot_checkpassword=(
            f"/usr/bin/env PYTHONPATH={REPO / 'src'} /usr/bin/python3"
            " -m pyqmail.tools.checkpassword"
            f" --root {root} --mail-user {MAIL_USER} --mail-group {group}"
        ),
        dovecot_users_group=group,
        dovecot_mail_user=MAIL_USER,
        dovecot_mail_group=group,
        dovecot_mail_uid=pw.pw_uid,
        dovecot_mail_gid=pw.pw_gid,
        dovecot_ports={"imaps": port},
    )
    if variant.scheme is not None:
        pfile = passwd_file(root, base, variant.scheme, users)
        start = text.index("passdb {")
        end = text.index("service auth {")
        own = (
            f"passdb {{\n  driver = passwd-file\n  args = {pfile}\n}}\n"
            f"userdb {{\n  driver = passwd-file\n  args = {pfile}\n}}\n"
        )
        text = text[:start] + own + text[end:]
    path = base / f"dovecot-{port}.conf"
    path.write_text(text)
    return path


def start(conf: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(["dovecot", "-F", "-c", str(conf)], stdout=out, stderr=out)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
        except OSError:
            time.sleep(0.05)
        else:
            return proc
    proc.kill()
    raise SystemExit(f"dovecot did not start: {log.read_text()}")


def one_login(
    port: int, ctx: ssl.SSLContext, i: int, gate: threading.Barrier, out: list[float]
) -> None:
    gate.wait()
    t0 = time.perf_counter()
    with imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=ctx, timeout=60) as m:
        m.login(f"box{i}@{DOMAIN}", f"password {i}")
        out.append(time.perf_counter() - t0)
        m.logout()


def logins(port: int, ctx: ssl.SSLContext, parallel: int, rounds: int) -> tuple[list[float], float]:
    """Per-login latencies (connect+TLS+LOGIN) of all rounds, and the mean round wall time."""
    times: list[float] = []
    walls = []
    for _ in range(rounds):
        gate = threading.Barrier(parallel + 1)
        got: list[float] = []
        threads = [
            threading.Thread(target=one_login, args=(port, ctx, i, gate, got))
            for i in range(parallel)
        ]
        for t in threads:
            t.start()
        gate.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        walls.append(time.perf_counter() - t0)
        if len(got) != parallel:
            raise SystemExit(f"only {len(got)} of {parallel} logins succeeded")
        times += got
    return times, statistics.mean(walls)


def fetch_all(port: int, ctx: ssl.SSLContext, messages: int) -> tuple[float, float]:
    """(SELECT seconds, FETCH 1:* BODY.PEEK[] seconds) on the fresh box0."""
    with imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=ctx, timeout=300) as m:
        m.login(f"box0@{DOMAIN}", "password 0")
        t0 = time.perf_counter()
        typ, data = m.select("INBOX")
        t1 = time.perf_counter()
        assert typ == "OK" and int(data[0] or b"0") == messages, data
        typ, got = m.fetch(f"1:{messages}", "(BODY.PEEK[])")
        t2 = time.perf_counter()
        assert typ == "OK" and sum(isinstance(x, tuple) for x in got) == messages
        m.logout()
    return t1 - t0, t2 - t1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parallel", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--variants", default="pyqmail,SHA512-CRYPT,ARGON2ID")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: Dovecot switches to the mail user")
    variants = [Variant("pyqmail-checkpassword (scrypt)", None)] + [
        Variant(f"passwd-file {s}", s) for s in args.variants.split(",") if s != "pyqmail"
    ]
    if "pyqmail" not in args.variants.split(","):
        variants = variants[1:]
    base = Path(tempfile.mkdtemp(prefix="pyqmail-imap-bench-"))
    base.chmod(0o755)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        certs = make_certs(base / "certs")
        ctx = ssl.create_default_context(cafile=str(certs.ca))
        print(
            f"{'variant':34} {'p50 ms':>7} {'p95 ms':>7} {'max ms':>7} {'round s':>8}"
            f" {'SELECT s':>9} {'FETCH s':>8}"
        )
        for variant in variants:
            vbase = base / f"v{len(procs)}"
            vbase.mkdir()
            vbase.chmod(0o755)
            (vbase / "certs").mkdir()
            shutil.copy(certs.combined, vbase / "certs" / "combined.pem")
            root = build_root(vbase, args.parallel, args.messages)
            port = free_port()
            conf = config(root, vbase, variant, port, args.parallel)
            procs.append(start(conf, port, vbase / "dovecot.log"))
            times, wall = logins(port, ctx, args.parallel, args.rounds)
            select_s, fetch_s = fetch_all(port, ctx, args.messages)
            ordered = sorted(times)
            p95 = ordered[round(0.95 * (len(ordered) - 1))]
            print(
                f"{variant.name:34} {statistics.median(times) * 1000:7.0f} {p95 * 1000:7.0f}"
                f" {max(times) * 1000:7.0f} {wall:8.2f} {select_s:9.2f} {fetch_s:8.2f}",
                flush=True,
            )
            procs[-1].send_signal(signal.SIGTERM)
            procs[-1].wait(20)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
