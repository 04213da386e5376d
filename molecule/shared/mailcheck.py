"""Helpers the scenario tests share: SMTP sessions driven from a client host, svstat parsing.

Tests never talk to the containers from this machine directly: they run clients (python3
smtplib, openssl s_client, swaks) inside the scenario's own client host over its podman network.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import textwrap
import time
from typing import Any

SERVICES = ("qmail-smtpd", "qmail-smtpd-ssl", "qmail-smtpd-tls", "qmail-send")
SERVICE_DIR = "/etc/service"
CA_PATH = "/etc/pyqmail/ca.pem"
_SVSTAT = re.compile(
    r"^(?P<path>\S+): (?P<state>up|down)(?: \(pid (?P<pid>\d+)\))? (?P<secs>\d+) seconds"
)


def svstat(host: Any, *paths: str) -> dict[str, dict[str, Any]]:
    """{path: {state, pid, seconds}} for each service path, straight from daemontools' svstat."""
    out = host.check_output("svstat " + " ".join(shlex.quote(p) for p in paths))
    result: dict[str, dict[str, Any]] = {}
    for line in out.splitlines():
        m = _SVSTAT.match(line)
        assert m, f"unexpected svstat line: {line!r}"
        pid = m["pid"]
        result[m["path"]] = {
            "state": m["state"],
            "pid": int(pid) if pid else None,
            "seconds": int(m["secs"]),
        }
    return result


def all_service_paths() -> list[str]:
    return [f"{SERVICE_DIR}/{s}{sub}" for s in SERVICES for sub in ("", "/log")]


def put_file(host: Any, path: str, data: bytes, mode: str = "0644") -> None:
    """Write a file on a host without a copy module: base64 through the command line."""
    b64 = base64.b64encode(data).decode()
    quoted = shlex.quote(path)
    host.check_output(f"echo {b64} | base64 -d > {quoted} && chmod {mode} {quoted}")


def run_python(target: Any, script: str, params: dict[str, Any] | None = None, **more: Any) -> Any:
    """Run a Python snippet on ``target`` with ``params`` as JSON in PARAMS; return its output.

    Parameters may also come as keywords (``host=...`` names the SMTP server, not ``target``).
    """
    params = {**(params or {}), **more}
    body = "import json, sys\nPARAMS = json.loads(sys.argv[1])\n" + textwrap.dedent(script)
    put_file(target, "/tmp/pyqmail_check.py", body.encode())
    cmd = f"python3 /tmp/pyqmail_check.py {shlex.quote(json.dumps(params))}"
    result = target.run(cmd)
    assert result.rc == 0, f"client script failed ({result.rc}):\n{result.stdout}{result.stderr}"
    return json.loads(result.stdout)


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.5) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with the last value."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value


SMTP_SESSION = r"""
import smtplib, ssl
from email.message import EmailMessage
from email.policy import SMTP

p = PARAMS
ctx = ssl.create_default_context(cafile=p.get("cafile"))
if p.get("certfile"):  # a client certificate (qmail's clientcert.pem: key, then certificate)
    ctx.load_cert_chain(p["certfile"])
out = {}
cls = smtplib.SMTP_SSL if p.get("implicit_tls") else smtplib.SMTP
kwargs = {"context": ctx} if p.get("implicit_tls") else {}
with cls(p["host"], p["port"], timeout=30, **kwargs) as s:
    s.ehlo("client.pyqmail.test")
    out["ehlo_before"] = sorted(s.esmtp_features)
    if p.get("starttls"):
        s.starttls(context=ctx)
        s.ehlo("client.pyqmail.test")
        out["ehlo_after"] = sorted(s.esmtp_features)
    if p.get("user"):
        try:
            s.login(p["user"], p["password"])
            out["auth"] = "ok"
        except smtplib.SMTPException as exc:
            out["auth"] = repr(exc)
    out["mail"] = list(s.mail(p["sender"]))
    out["rcpt"] = [list(s.rcpt(r)) for r in p["rcpts"]]
    if all(code == 250 for code, _ in out["rcpt"]) and p.get("send", True):
        msg = EmailMessage()
        msg["From"] = p["sender"]
        msg["To"] = ", ".join(p["rcpts"])
        msg["Subject"] = p.get("subject", "pyqmail molecule test")
        msg["Message-ID"] = p.get("message_id", "<molecule@client.pyqmail.test>")
        msg.set_content(p.get("body", "hello from molecule\n"))
        code, resp = s.data(msg.as_bytes(policy=SMTP))  # CRLF: the server refuses bare LF
        out["data"] = [code, resp.decode()]
for k in ("mail",):
    out[k] = [out[k][0], out[k][1].decode()]
out["rcpt"] = [[c, r.decode()] for c, r in out["rcpt"]]
print(json.dumps(out))
"""


def smtp_session(client: Any, **params: Any) -> dict[str, Any]:
    """One SMTP session from the client host; see SMTP_SESSION for the parameters."""
    result: dict[str, Any] = run_python(client, SMTP_SESSION, params)
    return result


LOG_DIR = "/var/log/pyqmail"


def service_log(host: Any, service: str) -> list[str]:
    """Every line multilog kept for ``service`` (rotated files, then current), timestamps cut."""
    out = host.run(f"cat {LOG_DIR}/{service}/@*.s {LOG_DIR}/{service}/current 2>/dev/null")
    return [
        line.split(" ", 1)[1] if line.startswith("@") else line for line in out.stdout.splitlines()
    ]
