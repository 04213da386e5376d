"""qmail-tls parts 2 and 3 across hosts: mx1 delivers to mx2 over STARTTLS with its client
certificate, and mx2 relays for it (to the sink's domain) because that certificate chains to
mx2's clientca.pem and names an identity listed in tlsclients. Without such a certificate the
same request is refused (553)."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import (
    CLIENT_CAS,
    MX1,
    MX2,
    PIN,
    SINK,
    address_of,
    deliveries,
    in_sink,
    inject_as_root,
    new_token,
    submit,
)
from mailcheck import run_python, service_log, smtp_session, wait_for

CLIENTCERT = "/var/qmail/control/clientcert.pem"


def test_mx1_relays_through_mx2_with_its_client_certificate(
    mx1: Any, mx2: Any, sink: Any, client: Any
) -> None:
    token = new_token()
    far, local = f"relay-{token}@{SINK}", f"admin@{MX2}"
    submit(client, f"sender-{token}@{MX1}", [far, local], token)

    # The sink (a domain mx2 is not responsible for) received it through mx2.
    path = wait_for(lambda: in_sink(sink, token), timeout=60)
    assert path, f"message {token} never reached the sink"
    received = sink.check_output(f"cat {path.splitlines()[0]}")
    assert f"by {MX2} (pyqmail) with ESMTPS" in received, received

    # mx2's local recipient got it too.
    def in_mx2_mailbox() -> str:
        return str(mx2.run(f"grep -rl {token} /var/vmail/admin/Maildir/new/").stdout.strip())

    assert wait_for(in_mx2_mailbox, 30), "copy for mx2's local mailbox not delivered"

    # mx1's delivery agent: one attempt per recipient, each to mx2 over verified TLS.
    qid = deliveries(mx1, far)[0]["qid"]
    for rcpt in (far, local):
        attempts = [d for d in deliveries(mx1, rcpt) if d["qid"] == qid]
        assert len(attempts) == 1, attempts
        line = attempts[0]
        assert line["result"] == "done", line
        assert MX2 in line["host"], line
        assert line["tls"].startswith("TLSv1.") and line["tls"] not in ("TLSv1.0", "TLSv1.1")
        assert line["verified"] == "yes", line  # against the pin of mx2's CA

    # mx2's SMTP listener took it from mx1 over TLS, unauthenticated (relay by certificate).
    mx1_ip = address_of(mx1)
    accepted = [ln for ln in service_log(mx2, "qmail-smtpd") if f"mid=<{token}@" in ln]
    relayed = [ln for ln in accepted if f"to=<{far}>" in ln]
    assert len(relayed) == 1, accepted  # (the local copy may come in its own session)
    for line in accepted:
        assert f" ip={mx1_ip} " in line and " tls=TLSv1." in line, line
        assert " auth=" not in line, line
    # mx2 passed it on to the sink.
    onward = deliveries(mx2, far)
    assert [d["result"] for d in onward] == ["done"], onward
    assert SINK in onward[0]["host"]


RELAY_PROBE = {
    "host": MX2,
    "port": 25,
    "sender": f"probe@{MX1}",
    "rcpts": [f"probe@{SINK}"],
    "send": False,
}


@pytest.mark.parametrize("starttls", [False, True], ids=["plain", "starttls"])
def test_client_host_without_certificate_is_refused_relay(client: Any, starttls: bool) -> None:
    out = smtp_session(client, cafile=CLIENT_CAS, starttls=starttls, **RELAY_PROBE)
    assert out["mail"][0] == 250, out
    assert out["rcpt"][0][0] == 553, out
    # Mail for mx2's own domain is still taken from anyone.
    local = smtp_session(
        client, cafile=CLIENT_CAS, starttls=starttls, **{**RELAY_PROBE, "rcpts": [f"admin@{MX2}"]}
    )
    assert local["rcpt"][0][0] == 250, local


def test_relay_depends_on_the_certificate_not_the_address(mx1: Any) -> None:
    """From mx1 itself: refused without its client certificate, accepted with it."""
    # mx1 verifies mx2's server certificate with the pinned CA, as pyqmail-send does.
    without = smtp_session(mx1, cafile=PIN, starttls=True, **RELAY_PROBE)
    assert without["rcpt"][0][0] == 553, without
    with_cert = smtp_session(mx1, cafile=PIN, starttls=True, certfile=CLIENTCERT, **RELAY_PROBE)
    assert with_cert["rcpt"][0][0] == 250, with_cert


def test_identity_must_be_listed_in_tlsclients(mx2: Any) -> None:
    """mx2's own client certificate chains to clientca.pem, but mx2.pyqmail.test is not listed."""
    out = smtp_session(
        mx2, cafile="/etc/pyqmail/ca.pem", starttls=True, certfile=CLIENTCERT, **RELAY_PROBE
    )
    assert out["rcpt"][0][0] == 553, out


FORGED = r"""
import smtplib, ssl, subprocess
subprocess.run(
    ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
     "-nodes", "-keyout", "/tmp/forged.pem", "-out", "/tmp/forged.crt", "-days", "2",
     "-subj", "/CN=" + PARAMS["identity"], "-addext", "subjectAltName=DNS:" + PARAMS["identity"],
     "-addext", "extendedKeyUsage=clientAuth"],
    check=True, capture_output=True,
)
ctx = ssl.create_default_context(cafile=PARAMS["cafile"])
ctx.load_cert_chain("/tmp/forged.crt", "/tmp/forged.pem")
out = {"stage": "connect"}
try:
    with smtplib.SMTP(PARAMS["host"], 25, timeout=30) as s:
        out["port"] = s.sock.getsockname()[1]  # mx2's tls-fail line names it
        out["stage"] = "ehlo"
        s.ehlo("client.pyqmail.test")
        out["stage"] = "starttls"
        s.starttls(context=ctx)
        # TLS 1.3: the server checks the client's certificate after the client has finished
        # its handshake; its alert comes with the client's first read after STARTTLS
        out["stage"] = "ehlo after starttls"
        s.ehlo("client.pyqmail.test")
        out["stage"] = "mail"
        out["mail"] = s.mail(PARAMS["sender"])[0]
        out["stage"] = "rcpt"
        out["rcpt"] = s.rcpt(PARAMS["rcpt"])[0]
        out["stage"] = "done"
except (OSError, smtplib.SMTPException) as exc:
    out["error"] = repr(exc)
print(json.dumps(out))
"""


def test_self_signed_certificate_with_listed_identity_is_refused(client: Any, mx2: Any) -> None:
    """A certificate naming mx1.pyqmail.test but from no trusted CA gives no relay: mx2 ends
    the TLS handshake with an unknown-CA alert, and logs why."""
    out = run_python(
        client,
        FORGED,
        identity=MX1,
        cafile=CLIENT_CAS,
        host=MX2,
        sender=f"forged@{MX1}",
        rcpt=f"forged@{SINK}",
    )
    assert out["stage"] in ("starttls", "ehlo after starttls"), out
    assert "TLSV1_ALERT_UNKNOWN_CA" in out["error"], out
    mine = f"tls-fail ip={address_of(client)} port={out['port']} "

    def logged() -> list[str]:
        return [ln for ln in service_log(mx2, "qmail-smtpd") if mine in ln]

    lines = wait_for(logged, timeout=10)
    assert len(lines) == 1 and "CERTIFICATE_VERIFY_FAILED" in lines[0], lines


def test_local_injection_as_root_is_delivered(mx1: Any) -> None:
    """cron and monitoring run sendmail as root; the message must reach the alias target."""
    token = new_token()
    inject_as_root(mx1, f"root@{MX1}", [f"postmaster@{MX1}"], token)

    def delivered() -> str:
        return str(mx1.run(f"grep -rl {token} /var/vmail/admin/Maildir/new/").stdout.strip())

    assert wait_for(delivered, timeout=20), mx1.run("ls -l /var/qmail/queue/bad").stdout
