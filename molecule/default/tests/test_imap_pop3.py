"""IMAP and POP3 from the client host: Dovecot under daemontools, same users and Maildirs."""

from __future__ import annotations

import time
import uuid
from typing import Any

from conftest import MX_NAME
from mailcheck import run_python, smtp_session, svstat, wait_for

CA = "/tmp/pyqmail-ca.pem"
USER = "alice@mx1.pyqmail.test"
PASSWORD = "molecule-alice-secret"
DOVECOT = "/etc/service/dovecot"

# One IMAP or POP3 session from the client host; PARAMS say what to do, the output is JSON.
MAIL_CLIENT = r"""
import imaplib, poplib, ssl

p = PARAMS
ctx = ssl.create_default_context(cafile=p["cafile"])
out = {}
if p["proto"] == "imap143":
    m = imaplib.IMAP4(p["host"], 143, timeout=30)
    out["caps_before"] = list(m.capabilities)
    try:
        m.login(p["user"], p["password"])
        out["login_before"] = "ok"
    except imaplib.IMAP4.error as exc:
        out["login_before"] = str(exc)
    m.starttls(ssl_context=ctx)
    out["caps_after"] = list(m.capabilities)
    out["login_after"] = m.login(p["user"], p["password"])[0]
    m.logout()
elif p["proto"] == "imaps":
    m = imaplib.IMAP4_SSL(p["host"], 993, ssl_context=ctx, timeout=30)
    try:
        m.login(p["user"], p["password"])
    except imaplib.IMAP4.error as exc:
        out["login"] = str(exc)
    else:
        out["login"] = "ok"
        m.select("INBOX")
        if p.get("flag"):
            typ, ids = m.search(None, "SUBJECT", '"' + p["flag"] + '"')  # a quoted IMAP string
            for num in ids[0].split():
                m.store(num, "+FLAGS", "(\\Seen \\Flagged)")
        out["messages"] = {}
        typ, ids = m.search(None, "ALL")
        for num in ids[0].split():
            typ, data = m.fetch(num, "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            out["messages"][data[0][1].decode().strip()] = data[0][0].decode()
        out["folders"] = [x.decode() for x in m.list()[1]]
        m.logout()
elif p["proto"] == "pop3s":
    pop = poplib.POP3_SSL(p["host"], 995, context=ctx, timeout=30)
    pop.user(p["user"])
    try:
        pop.pass_(p["password"])
    except poplib.error_proto as exc:
        out["login"] = str(exc)
        pop.close()
    else:
        out["login"] = "ok"
        out["count"] = pop.stat()[0]
        out["subjects"] = [
            line.decode() for i in range(out["count"]) for line in pop.top(i + 1, 0)[1]
            if line.startswith(b"Subject:")
        ]
        pop.quit()
print(json.dumps(out))
"""


def mail_client(client: Any, proto: str, password: str = PASSWORD, **more: Any) -> dict[str, Any]:
    """Run MAIL_CLIENT on the client host against mx1."""
    params = {"proto": proto, "host": MX_NAME, "cafile": CA, "user": USER, "password": password}
    result: dict[str, Any] = run_python(client, MAIL_CLIENT, {**params, **more})
    return result


def submit(client: Any, subject: str) -> None:
    """alice submits a message to herself on 587 (STARTTLS, AUTH), as a mail client does."""
    out = smtp_session(
        client,
        host=MX_NAME,
        port=587,
        cafile=CA,
        starttls=True,
        user=USER,
        password=PASSWORD,
        sender=USER,
        rcpts=[USER],
        subject=subject,
        message_id=f"<{uuid.uuid4().hex}@client.pyqmail.test>",
    )
    assert out["data"][0] == 250, out


def wait_for_subject(client: Any, subject: str) -> dict[str, Any]:
    """Poll over IMAPS until the message with ``subject`` is in alice's INBOX."""
    seen: dict[str, Any] = {}

    def arrived() -> bool:
        seen.update(mail_client(client, "imaps"))
        return f"Subject: {subject}" in seen.get("messages", {})

    assert wait_for(arrived, timeout=30), f"{subject!r} not in alice's INBOX: {seen}"
    return seen


def test_dovecot_and_its_log_are_up_and_not_restarting(mx: Any) -> None:
    paths = [DOVECOT, f"{DOVECOT}/log"]
    first = svstat(mx, *paths)
    time.sleep(3)
    second = svstat(mx, *paths)
    for path in paths:
        assert second[path]["state"] == "up", f"{path}: {second[path]}"
        assert second[path]["pid"] == first[path]["pid"], f"{path} restarted between two svstat"
    assert mx.file("/var/log/pyqmail/dovecot/current").exists


def test_imap_and_pop3_listen_on_the_listen_ip_only(mx: Any, listen_ip: str) -> None:
    out = mx.check_output("ss -Hltn")
    for port in (993, 143, 995):
        local = [ln.split()[3] for ln in out.splitlines() if ln.split()[3].endswith(f":{port}")]
        assert local == [f"{listen_ip}:{port}"], (port, out)
    assert ":110 " not in out  # POP3 without TLS is off unless pyqmail_dovecot__listeners says pop3


def test_packaged_dovecot_stays_down(mx: Any) -> None:
    # Only the supervised master runs (its parent is supervise), none started by the package.
    parents = mx.check_output("ps -o ppid= -C dovecot").split()
    assert len(parents) == 1, parents
    parent = mx.check_output(f"ps -o comm= -p {parents[0]}").strip()
    assert parent == "supervise", parent


def test_imap_143_refuses_login_before_starttls(client: Any) -> None:
    out = mail_client(client, "imap143")
    assert "LOGINDISABLED" in out["caps_before"] and "STARTTLS" in out["caps_before"]
    assert out["login_before"] != "ok"
    assert "LOGINDISABLED" not in out["caps_after"]
    assert out["login_after"] == "OK"


def test_wrong_password_is_refused_over_imaps_and_pop3s(client: Any) -> None:
    started = time.monotonic()
    assert "AUTHENTICATIONFAILED" in mail_client(client, "imaps", password="wrong")["login"]
    # auth_failure_delay is 2 s; Dovecot measures it on a clock of whole seconds (ioloop_time),
    # so the answer comes after more than 1 s (as in tests/dovecot/test_dovecot_e2e.py).
    assert time.monotonic() - started >= 1.0, "a failed login answered without the delay"
    assert mail_client(client, "pop3s", password="wrong")["login"] != "ok"


def test_submitted_mail_is_read_over_imaps_and_pop3s(client: Any) -> None:
    subject = f"molecule imap {uuid.uuid4().hex}"
    submit(client, subject)
    seen = wait_for_subject(client, subject)
    assert any("\\Sent" in f for f in seen["folders"]), seen["folders"]
    assert any("\\Junk" in f for f in seen["folders"]), seen["folders"]
    assert any("\\Trash" in f for f in seen["folders"]), seen["folders"]
    pop = mail_client(client, "pop3s")
    assert pop["login"] == "ok"
    assert f"Subject: {subject}" in pop["subjects"]


def test_flags_set_over_imap_survive_a_new_delivery(mx: Any, client: Any) -> None:
    first = f"molecule flags {uuid.uuid4().hex}"
    submit(client, first)
    wait_for_subject(client, first)
    mail_client(client, "imaps", flag=first)
    second = f"molecule after {uuid.uuid4().hex}"
    submit(client, second)
    seen = wait_for_subject(client, second)
    assert "\\Seen" in seen["messages"][f"Subject: {first}"]
    assert "\\Flagged" in seen["messages"][f"Subject: {first}"]
    assert "\\Seen" not in seen["messages"][f"Subject: {second}"]
    # What Dovecot wrote belongs to the mailbox owner, as what pyqmail-send's local child wrote.
    owners = mx.check_output("stat -c '%U:%G' /var/vmail/alice/Maildir/cur/* | sort -u")
    assert owners.split() == ["pyqmailv:pyqmailv"], owners


def served_certificate(client: Any, port: int, starttls: str = "") -> str:
    """The SHA-256 fingerprint of the certificate ``port`` serves (after STARTTLS if given)."""
    return str(
        client.check_output(
            f"echo | openssl s_client -connect {MX_NAME}:{port} -servername {MX_NAME}"
            f" {starttls} 2>/dev/null | openssl x509 -noout -fingerprint -sha256"
        )
    )


def test_993_and_995_same_certificate_and_tls_profile_as_smtp(client: Any) -> None:
    smtp = served_certificate(client, 25, "-starttls smtp")
    assert smtp.startswith("sha256 Fingerprint="), smtp
    for port in (993, 995):
        assert served_certificate(client, port) == smtp, f"{port} serves another than 25"
        base = f"openssl s_client -connect {MX_NAME}:{port} -CAfile {CA}"
        ok = client.run(
            f"echo | {base} -verify_hostname {MX_NAME} -verify_return_error -brief 2>&1"
        )
        assert ok.rc == 0 and "Verification: OK" in ok.stdout, ok.stdout
        for flag in ("-tls1", "-tls1_1"):
            refused = client.run(f"echo | {base} -cipher DEFAULT@SECLEVEL=0 {flag} 2>&1")
            assert refused.rc != 0, f"{port} {flag} was accepted:\n{refused.stdout}"
        # TLS 1.2 without an AEAD cipher (CBC with SHA-1 or SHA-256 MACs) is refused.
        cbc = client.run(
            f"echo | {base} -tls1_2 -cipher 'ECDHE+AES+SHA:ECDHE+AES+SHA256:AES128-SHA' 2>&1"
        )
        assert cbc.rc != 0, f"{port} accepted a CBC cipher:\n{cbc.stdout}"
        aead = client.run(f"echo | {base} -tls1_2 -brief 2>&1")
        assert aead.rc == 0 and ("GCM" in aead.stdout or "CHACHA20" in aead.stdout), aead.stdout
