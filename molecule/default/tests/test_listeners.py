"""Listeners sit on the configured address and ports only, and speak TLS as each should."""

from __future__ import annotations

from typing import Any

from conftest import MX_NAME

CA = "/tmp/pyqmail-ca.pem"


def listening(mx: Any) -> set[str]:
    out = mx.check_output("ss -Hltn")
    return {line.split()[3] for line in out.splitlines()}


def test_listeners_on_configured_ip_only(mx: Any, listen_ip: str) -> None:
    sockets = listening(mx)
    for port in (25, 465, 587):
        assert f"{listen_ip}:{port}" in sockets, sockets
        assert f"0.0.0.0:{port}" not in sockets
        assert f"*:{port}" not in sockets
        assert f"[::]:{port}" not in sockets


def test_starttls_on_25_verifies_against_the_run_ca(client: Any) -> None:
    out = client.run(
        f"echo QUIT | openssl s_client -starttls smtp -connect {MX_NAME}:25 -CAfile {CA}"
        f" -verify_hostname {MX_NAME} -verify_return_error -brief 2>&1"
    )
    assert out.rc == 0, out.stdout
    assert "Verification: OK" in out.stdout
    assert "Protocol version: TLSv1.3" in out.stdout or "TLSv1.2" in out.stdout


def test_465_is_tls_from_the_first_byte(client: Any) -> None:
    out = client.run(
        f"(sleep 2; echo QUIT) | openssl s_client -connect {MX_NAME}:465 -CAfile {CA}"
        f" -verify_hostname {MX_NAME} -verify_return_error -quiet 2>&1"
    )
    assert out.rc == 0, out.stdout
    assert f"220 {MX_NAME} ESMTP" in out.stdout, out.stdout
    assert "ESMTP ESMTP" not in out.stdout, "the role's smtpgreeting repeats what the daemon adds"


def test_465_refuses_plaintext(client: Any) -> None:
    script = (
        f"import socket; s=socket.create_connection(('{MX_NAME}',465),10); s.settimeout(5);"
        "s.sendall(b'EHLO x\\r\\n');"
        "d=b''\n"
        "try:\n d=s.recv(100)\nexcept Exception: pass\n"
        "print('220' if d.startswith(b'220') else 'no-smtp')"
    )
    out = client.check_output(f'python3 -c "{script}"')
    assert out.strip() == "no-smtp"


def test_tls_1_0_and_1_1_refused(client: Any) -> None:
    base = (
        f"echo QUIT | openssl s_client -starttls smtp -connect {MX_NAME}:25"
        " -cipher DEFAULT@SECLEVEL=0"
    )
    ok = client.run(f"{base} -tls1_2 2>&1")
    assert ok.rc == 0, ok.stdout
    for flag in ("-tls1", "-tls1_1"):
        refused = client.run(f"{base} {flag} 2>&1")
        assert refused.rc != 0, f"{flag} was accepted:\n{refused.stdout}"
