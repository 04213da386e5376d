"""Issue 18 on a provisioned host: rspamd runs under daemontools on loopback, a GTUBE message
from the client host is refused with 554 at the end of DATA, a clean one is delivered with
rspamd's header fields (roles/pyqmail_scanners)."""

from __future__ import annotations

import base64
import uuid
from typing import Any

from conftest import MX_NAME
from mailcheck import smtp_session, wait_for

# Kept encoded so that no scanner flags this file itself.
GTUBE = base64.b64decode(
    "WEpTKkM0SkRCUUFETjEuTlNCTjMqMklETkVOKkdUVUJFLVNUQU5EQVJELUFOVEktVUJFLVRFU1QtRU1BSUwqQy4zNFg="
).decode()


def test_rspamd_and_its_log_are_up(mx: Any) -> None:
    for service in ("rspamd", "rspamd/log"):
        out = mx.check_output(f"svstat /etc/service/{service}")
        assert ": up (pid " in out, out


def test_rspamd_listens_on_loopback_only(mx: Any) -> None:
    listening = mx.check_output("ss -Hltn").splitlines()
    ports = [line.split()[3] for line in listening if line.split()[3].endswith(":11333")]
    assert ports == ["127.0.0.1:11333"], listening
    assert mx.file("/var/qmail/control/rspamd").content_string.strip() == "127.0.0.1:11333"


def test_gtube_from_the_client_is_refused(mx: Any, client: Any) -> None:
    out = smtp_session(
        client,
        host=MX_NAME,
        port=25,
        starttls=False,
        sender="someone@elsewhere.example",
        rcpts=[f"postmaster@{MX_NAME}"],
        body=f"{GTUBE}\n",
    )
    assert out["data"][0] == 554, out
    assert out["data"][1].startswith("5.7.1 "), out
    log = mx.check_output("cat /var/log/pyqmail/qmail-smtpd/current")
    assert "scan=refuse spam=reject" in log


def test_a_clean_message_is_delivered_with_rspamds_fields(mx: Any, client: Any) -> None:
    token = uuid.uuid4().hex
    out = smtp_session(
        client,
        host=MX_NAME,
        port=25,
        starttls=False,
        sender="someone@elsewhere.example",
        rcpts=[f"postmaster@{MX_NAME}"],
        subject=f"scanned {token}",
        message_id=f"<{token}@client.pyqmail.test>",
        body="Hello, the minutes of today's meeting are attached to nothing.\n",
    )
    assert out["data"][0] == 250, out

    def delivered() -> str:
        return str(mx.run(f"grep -rl {token} /var/vmail/admin/Maildir/").stdout.strip())

    path = wait_for(delivered, timeout=60)
    assert path, "the clean message did not reach admin's Maildir"
    content = mx.check_output(f"cat {path.splitlines()[0]}")
    assert "X-Spamd-Result: default: False [" in content
