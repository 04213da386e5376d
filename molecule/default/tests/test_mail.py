"""Relay control, SMTP AUTH on submission, and local delivery through the aliases."""

from __future__ import annotations

import uuid
from typing import Any

from conftest import MX_NAME
from mailcheck import smtp_session, wait_for

CA = "/tmp/pyqmail-ca.pem"
USER = "alice@mx1.pyqmail.test"
PASSWORD = "molecule-alice-secret"


def test_submission_offers_auth_only_after_starttls(client: Any) -> None:
    out = smtp_session(
        client,
        host=MX_NAME,
        port=587,
        cafile=CA,
        starttls=True,
        user=USER,
        password=PASSWORD,
        sender=USER,
        rcpts=["someone@elsewhere.example"],
        send=False,
    )
    assert "auth" not in out["ehlo_before"]
    assert "starttls" in out["ehlo_before"]
    assert "auth" in out["ehlo_after"]
    assert out["auth"] == "ok"
    # Authenticated: relaying to a foreign domain is accepted.
    assert out["rcpt"][0][0] == 250, out


def test_submission_refuses_wrong_password(client: Any) -> None:
    out = smtp_session(
        client,
        host=MX_NAME,
        port=587,
        cafile=CA,
        starttls=True,
        user=USER,
        password="wrong",
        sender=USER,
        rcpts=["someone@elsewhere.example"],
        send=False,
    )
    assert "535" in out["auth"]
    assert out["rcpt"][0][0] >= 500


def test_swaks_auth_on_smtps(client: Any) -> None:
    out = client.run(
        f"swaks --server {MX_NAME} --port 465 --tlsc --tls-verify --tls-ca-path {CA}"
        f" --auth PLAIN --auth-user {USER} --auth-password {PASSWORD}"
        f" --from {USER} --to postmaster@{MX_NAME} --quit-after RCPT 2>&1"
    )
    assert out.rc == 0, out.stdout
    assert "235 " in out.stdout


def test_unauthenticated_client_cannot_relay(client: Any) -> None:
    """Port 25 takes the MAIL and refuses the foreign recipient (protocol/envelope.py);
    submission wants a login before MAIL (protocol/connection.py)."""
    for port, starttls in ((25, False), (25, True), (587, True)):
        out = smtp_session(
            client,
            host=MX_NAME,
            port=port,
            cafile=CA,
            starttls=starttls,
            sender="spammer@elsewhere.example",
            rcpts=["victim@elsewhere.example"],
            send=False,
        )
        if port == 25:
            assert out["mail"][0] == 250, (port, starttls, out)
            code, text = out["rcpt"][0]
            assert (code, text.split(" ", 1)[0]) == (553, "5.7.1"), (port, starttls, out)
        else:
            assert out["mail"] == [530, "5.7.0 Authentication required"], (port, out)


def test_mail_to_postmaster_lands_in_alias_target_maildir(mx: Any, client: Any) -> None:
    token = uuid.uuid4().hex
    out = smtp_session(
        client,
        host=MX_NAME,
        port=25,
        cafile=CA,
        starttls=True,
        sender="someone@elsewhere.example",
        rcpts=[f"postmaster@{MX_NAME}"],
        subject=f"molecule {token}",
        message_id=f"<{token}@client.pyqmail.test>",
    )
    assert out["data"][0] == 250, out

    def delivered() -> str:
        r = mx.run(f"grep -rl {token} /var/vmail/admin/Maildir/new/")
        return str(r.stdout.strip())

    path = wait_for(delivered, timeout=30)
    assert path, "message to postmaster did not reach admin's Maildir/new"
    content = mx.check_output(f"cat {path.splitlines()[0]}")
    assert "Received: from" in content
    assert "Delivered-To:" in content
    owner = mx.file(path.splitlines()[0]).user
    assert owner == "pyqmailv"  # the mailbox owner: the local delivery child runs as it


def test_submission_holds_alice_to_her_addresses(client: Any) -> None:
    """Issue 16: alice may not send as admin nor as a foreign domain (553 5.7.1 at MAIL)."""
    for sender in (f"admin@{MX_NAME}", "ceo@bank.example"):
        out = smtp_session(
            client,
            host=MX_NAME,
            port=587,
            cafile=CA,
            starttls=True,
            user=USER,
            password=PASSWORD,
            sender=sender,
            rcpts=["someone@elsewhere.example"],
            send=False,
        )
        assert out["auth"] == "ok"
        assert out["mail"][0] == 553, out
