"""AUTH guessing in parallel, and the fail2ban filter (issue 14, item 4).

Before: the delay was a sleep inside each session and the failure counts were per worker
and per listener, so 40 parallel connections from one address made 8.7 guesses/s. Now the
state is shared by every worker and both AUTH listeners (``pyqmail.smtpd.authguard``): one
attempt per client at a time and a penalty after each failure, a per-account lock, and an
``auth-fail`` line for every failure, which files/fail2ban's filter matches (all but those on a
locked name, which test no password: tests/unit/test_fail2ban_files.py).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.attacks.tally import tried
from tests.attacks.wire import Wire
from tests.conftest import PKI
from tests.e2e.conftest import Daemon, QmailRoot, StartDaemon
from tests.e2e.helpers import client_context

ALICE, PW = "alice@mx.test", "s3cret-alice-pw"
FILTER = Path(__file__).parents[2] / "files/fail2ban/filter.d/pyqmail-smtpd.conf"
PARALLEL = 40
STORM = float(os.environ.get("AUTH_STORM_SECONDS", "8"))  # seconds of guessing (measure: 30)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + b64(f"\0{user}\0{password}")


@pytest.fixture
def users(qmail_root: QmailRoot) -> QmailRoot:
    qmail_root.users({ALICE: PW, "bob@mx.test": "bob-pw-123456"})
    return qmail_root


def ready(d: Daemon, pki: PKI, source: str = "127.0.0.1", timeout: float = 10.0) -> Wire:
    """A connection that may AUTH now: implicit TLS (smtps) or after STARTTLS."""
    w = Wire(d.port, source, timeout)
    ctx = client_context(pki)
    if "--mode smtps" in " ".join(d.args):
        w.sock = ctx.wrap_socket(w.sock, server_hostname="localhost")
        assert w.reply()[0] == 220
    else:
        assert w.reply()[0] == 220
        assert w.cmd("EHLO guesser.test")[0] == 250
        assert w.cmd("STARTTLS")[0] == 220
        w.sock = ctx.wrap_socket(w.sock, server_hostname="localhost")
    assert w.cmd("EHLO guesser.test")[0] == 250
    return w


def storm(daemons: list[Daemon], pki: PKI, seconds: float) -> Counter[int]:
    """PARALLEL connections from 127.0.0.1 guess alice's password for ``seconds``,
    reconnecting when dropped; returns the reply codes they got (535: a guess answered)."""
    deadline = time.monotonic() + seconds

    def guesser(n: int) -> Counter[int]:
        codes: Counter[int] = Counter()
        i = 0
        while time.monotonic() < deadline - 0.2:
            try:
                w = ready(daemons[n % len(daemons)], pki)
            except (OSError, AssertionError):
                continue
            with w:
                while (left := deadline - time.monotonic()) > 0:
                    w.sock.settimeout(left)
                    try:
                        code, _ = w.cmd(plain(ALICE, f"guess-{n}-{i}"))
                    except (TimeoutError, OSError):
                        break
                    i += 1
                    codes[code] += 1
                    if code in (0, 421):
                        break
        return codes

    with ThreadPoolExecutor(PARALLEL) as pool:
        total: Counter[int] = sum(pool.map(guesser, range(PARALLEL)), Counter())
    tried("auth-parallel-guessing", sum(total.values()))
    return total


def report(what: str, codes: Counter[int], seconds: float) -> float:
    rate = codes[535] / seconds
    print(f"{what}: {codes[535]} guesses answered in {seconds:.0f}s = {rate:.2f}/s {dict(codes)}")
    return rate


def test_parallel_guessing_across_two_workers_is_bounded(
    users: QmailRoot, smtpd: StartDaemon, pki: PKI
) -> None:
    d = smtpd(mode="smtps", workers=2)
    rate = report("one listener, 2 workers", storm([d], pki, STORM), STORM)
    # one guess at a time per client, 1 + 2 + 4 s of penalty: about 4 in 8 s
    assert rate <= 0.8, f"{rate:.2f} guesses/s from one address"
    assert len(d.wait_for(r"auth-fail ip=127\.0\.0\.1 .*reason=password", count=2)) >= 2


def test_parallel_guessing_across_two_listeners_is_bounded(
    users: QmailRoot, smtpd: StartDaemon, pki: PKI
) -> None:
    """465 and 587 are separate daemons (separate run scripts): they share the state."""
    d465 = smtpd(mode="smtps", workers=2)
    d587 = smtpd(mode="submission", workers=2)
    rate = report("two listeners, 2 workers each", storm([d465, d587], pki, STORM), STORM)
    assert rate <= 0.8, f"{rate:.2f} guesses/s from one address"
    d465.wait_for(r"auth-fail ip=127\.0\.0\.1 ")
    d587.wait_for(r"auth-fail ip=127\.0\.0\.1 ")


def test_account_lock_same_answer_then_expires(
    users: QmailRoot, smtpd: StartDaemon, pki: PKI
) -> None:
    users.control("authlockfails", "3\n")
    users.control("authlocktime", "4\n")
    d = smtpd(mode="smtps", workers=2)
    answers = set()
    for n in range(3):  # three clients, one wrong guess each: alice is locked
        with ready(d, pki, f"127.0.2.{n + 1}") as w:
            code, text = w.cmd(plain(ALICE, f"wrong-{n}"))
            assert code == 535, text
            answers.add(text)
    locked_at = time.monotonic()
    with ready(d, pki, "127.0.2.9") as w:
        code, text = w.cmd(plain(ALICE, PW))
        assert code == 535, f"the right password during a lock: {text!r}"
        answers.add(text)
    assert len(answers) == 1, f"a lock must look like a wrong password: {answers}"
    d.wait_for(r"auth-fail ip=127\.0\.2\.9 port=\d+ mech=PLAIN user=alice@mx\.test reason=locked")
    with ready(d, pki, "127.0.2.10") as w:  # bob is not locked
        assert w.cmd(plain("bob@mx.test", "bob-pw-123456"))[0] == 235
    time.sleep(max(0.0, locked_at + 4.5 - time.monotonic()))
    with ready(d, pki, "127.0.2.11") as w:
        code, text = w.cmd(plain(ALICE, PW))
        assert code == 235, f"lock did not expire: {text!r}"
    tried("auth-account-lock", 6)


@pytest.mark.parametrize(
    ("source", "lines", "reason"),
    [
        ("127.0.3.1", [plain(ALICE, "wrong")], "password"),
        ("127.0.3.2", ["AUTH PLAIN !!!notbase64"], "bad-base64"),
        ("127.0.3.3", ["AUTH LOGIN", "not base64!"], "bad-base64"),
        ("127.0.3.4", [plain("bad:name", "x")], "bad-name"),
        ("127.0.3.5", ["AUTH PLAIN " + b64("no-nuls-at-all")], "malformed"),
        ("127.0.3.6", ["AUTH PLAIN " + b64(f"bob@mx.test\0{ALICE}\0{PW}")], "authzid"),
        ("127.0.3.7", ["AUTH PLAIN", "*"], "aborted"),
        ("127.0.3.8", ["AUTH CRAM-MD5"], None),  # offered only with secrets: 504, no AUTH
    ],
)
def test_every_failure_is_logged_with_the_client(  # noqa: PLR0917 - fixtures + one case
    users: QmailRoot,
    smtpd: StartDaemon,
    pki: PKI,
    source: str,
    lines: list[str],
    reason: str | None,
) -> None:
    d = smtpd(mode="smtps", workers=1)
    with ready(d, pki, source) as w:
        for line in lines:
            code, _ = w.cmd(line)
        assert code != 235
        w.cmd("QUIT")
    d.wait_for(rf"conn ip={re.escape(source)} ")
    fails = [line for line in d.lines if " auth-fail " in line]
    if reason is None:
        assert not fails
    else:
        assert len(fails) == 1, fails
        assert re.search(rf"auth-fail ip={re.escape(source)} port=\d+ .*reason={reason}", fails[0])
    tried("auth-fail-logged")


def tai64n(lines: list[str]) -> str:
    """The lines as multilog writes them (``multilog t``): daemontools' own tai64n."""
    out = subprocess.run(
        ["tai64n"], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True
    )
    return out.stdout


def test_fail2ban_filter_matches_every_auth_fail_line(
    users: QmailRoot, smtpd: StartDaemon, pki: PKI, tmp_path: Path
) -> None:
    regex = shutil.which("fail2ban-regex")
    assert regex, "fail2ban-regex missing: run scripts/install-system-deps (package fail2ban)"
    d = smtpd(mode="smtps", workers=2)
    sources = ["127.0.4.1", "127.0.4.2", "127.0.4.3"]
    with ready(d, pki, sources[0]) as w:
        w.cmd(plain(ALICE, "wrong"))
    with ready(d, pki, sources[1]) as w:
        w.cmd("AUTH PLAIN ====")
    with ready(d, pki, sources[2]) as w:  # a name built to look like another client
        w.cmd(plain("x ip=10.9.9.9 port=1", "pw"))
        assert w.cmd(plain(ALICE, PW))[0] == 235
    d.wait_for(r"auth-fail ip=127\.0\.4\.3 ")
    log = tmp_path / "current"
    log.write_text(tai64n(d.lines))
    out = subprocess.run(
        [regex, str(log), str(FILTER)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    fails = [line for line in d.lines if " auth-fail " in line]
    assert len(fails) == 3, d.output
    m = re.search(r"Failregex: (\d+) total", out.stdout)
    assert m and int(m.group(1)) == len(fails), out.stdout
    ips = subprocess.run(
        [regex, "--out", "ip", str(log), str(FILTER)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert ips == sources, f"fail2ban would ban {ips}, the clients were {sources}"
    tried("auth-fail-logged", 3)
