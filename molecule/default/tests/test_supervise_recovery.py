"""kill -9 of the SMTP daemon and of the delivery agent: supervise brings them back, nothing
acknowledged is lost."""

from __future__ import annotations

import json
import time
from typing import Any

from conftest import MX_NAME
from mailcheck import SERVICE_DIR, put_file, svstat, wait_for

# Each message is a well-formed one (From, To, Date, Message-ID): rspamd scans this host's inbound
# mail, and a bare "Subject: ..." message scores enough to be filed into alice's Junk folder.
SENDER = r"""
import json, smtplib, sys, time, uuid
from email.utils import formatdate
host, count, ledger = sys.argv[1], int(sys.argv[2]), sys.argv[3]
acked = []
deadline = time.time() + 120
while len(acked) < count and time.time() < deadline:
    token = uuid.uuid4().hex
    try:
        with smtplib.SMTP(host, 25, timeout=10) as s:
            s.sendmail("load@elsewhere.example", ["alice@" + host],
                       f"From: Load <load@elsewhere.example>\r\nTo: <alice@{host}>\r\n"
                       f"Date: {formatdate()}\r\nMessage-ID: <{token}@elsewhere.example>\r\n"
                       f"Subject: load {token}\r\n\r\ntoken {token}\r\n")
        acked.append(token)  # sendmail returned: the server answered 250 after DATA
    except (OSError, smtplib.SMTPException):
        time.sleep(0.2)      # killed mid-session: not acknowledged, so not in the ledger
    with open(ledger, "w") as f:
        json.dump(acked, f)
    time.sleep(0.05)
"""


# Where an acknowledged message may land: alice's inbox or any of her folders (rspamd's verdict
# decides between the inbox and .Junk; losing nothing is what this test proves).
DELIVERED = "/var/vmail/alice/Maildir/new/* /var/vmail/alice/Maildir/.[!.]*/new/*"


def pid_of(mx: Any, service: str) -> int:
    state = svstat(mx, f"{SERVICE_DIR}/{service}")[f"{SERVICE_DIR}/{service}"]
    assert state["state"] == "up", state
    return int(state["pid"])


def test_kill_9_recovers_and_loses_nothing_acknowledged(mx: Any, client: Any) -> None:
    put_file(client, "/tmp/load_sender.py", SENDER.encode())
    client.run("rm -f /tmp/ledger.json")
    client.check_output(
        f"setsid python3 /tmp/load_sender.py {MX_NAME} 60 /tmp/ledger.json"
        " </dev/null >/tmp/load_sender.log 2>&1 &"
    )
    kills = 0
    for service in ("qmail-smtpd", "qmail-send", "qmail-smtpd", "qmail-send"):
        time.sleep(1.5)
        old = pid_of(mx, service)
        mx.check_output(f"kill -9 {old}")
        kills += 1
        came_back = wait_for(
            lambda s=service, o=old: (
                (st := svstat(mx, f"{SERVICE_DIR}/{s}")[f"{SERVICE_DIR}/{s}"])["state"] == "up"
                and st["pid"] != o
            ),
            timeout=20,
        )
        assert came_back, f"{service} not brought back up by supervise after kill -9"

    def ledger() -> list[str]:
        out = client.run("cat /tmp/ledger.json")
        return json.loads(out.stdout) if out.rc == 0 and out.stdout.strip() else []

    done = wait_for(lambda: len(ledger()) >= 60, timeout=150)
    assert done, f"sender finished with only {len(ledger())} acknowledged messages"
    tokens = ledger()

    def missing() -> list[str]:
        delivered = mx.run(f"cat {DELIVERED} 2>/dev/null").stdout
        return [t for t in tokens if t not in delivered]

    assert wait_for(lambda: not missing(), timeout=90), (
        f"{len(missing())} of {len(tokens)} acknowledged messages lost after {kills} kills"
    )
    # Nothing partial was delivered: every delivered file ends with its token line.
    bad = mx.run(
        f'for f in {DELIVERED}; do [ -e "$f" ] || continue;'
        " tail -c 200 \"$f\" | grep -q '^token ' || echo $f; done"
    ).stdout.strip()
    assert not bad, f"partial deliveries: {bad}"
