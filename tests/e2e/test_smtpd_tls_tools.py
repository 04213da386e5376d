"""TLS as other tools see it: openssl s_client and swaks against pyqmail-smtpd."""

from __future__ import annotations

import select
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import PKI
from tests.e2e.conftest import QmailRoot, StartDaemon
from tests.e2e.helpers import openssl

VERIFY = ["-verify_return_error", "-verify_hostname", "localhost", "-servername", "localhost"]


def trust(pki: PKI) -> list[str]:
    return ["-CAfile", str(pki.ca_file), *VERIFY]


def test_openssl_starttls_verifies_against_test_ca(smtpd: StartDaemon, pki: PKI) -> None:
    d = smtpd()
    code, out = openssl(
        [
            "s_client",
            "-starttls",
            "smtp",
            "-connect",
            f"{d.host}:{d.port}",
            "-CAfile",
            str(pki.ca_file),
            *VERIFY,
        ]
    )
    assert code == 0, out
    assert "Verify return code: 0 (ok)" in out
    assert "TLSv1.3" in out
    assert "221 " in out  # our QUIT went through TLS


def test_openssl_implicit_tls_on_smtps(smtpd: StartDaemon, pki: PKI) -> None:
    d = smtpd(mode="smtps")
    code, out = openssl(
        ["s_client", "-connect", f"{d.host}:{d.port}", "-CAfile", str(pki.ca_file), *VERIFY]
    )
    assert code == 0, out
    assert "Verify return code: 0 (ok)" in out
    assert "220 mx.test" in out


def test_openssl_verification_fails_against_other_ca(smtpd: StartDaemon, pki: PKI) -> None:
    """The check above can fail: the same command with an unrelated CA is rejected."""
    other = pki.dir / "other-ca.pem"
    other.write_bytes(pki.other_ca.cert_pem)
    d = smtpd(mode="smtps")
    code, out = openssl(
        ["s_client", "-connect", f"{d.host}:{d.port}", "-CAfile", str(other), *VERIFY]
    )
    assert code != 0
    assert "unable to get local issuer certificate" in out or "verify error" in out


@pytest.mark.parametrize(
    "args",
    [
        ["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"],
        ["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"],
        ["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384"],  # CBC
        ["-tls1_2", "-cipher", "AES128-GCM-SHA256"],  # no forward secrecy
    ],
    ids=["tls1.1", "tls1.0", "tls1.2-cbc", "tls1.2-rsa-kx"],
)
@pytest.mark.parametrize("mode", ["smtp", "smtps"])
def test_weak_protocols_and_ciphers_refused(smtpd: StartDaemon, args: list[str], mode: str) -> None:
    d = smtpd(mode=mode)
    starttls = ["-starttls", "smtp"] if mode == "smtp" else []
    code, out = openssl(["s_client", *starttls, "-connect", f"{d.host}:{d.port}", *args])
    assert code != 0, out
    assert "Cipher is (NONE)" in out or "handshake failure" in out or "alert" in out, out
    d.wait_for(r"tls-fail ip=127\.0\.0\.1")


def test_tls12_aead_is_accepted(smtpd: StartDaemon, pki: PKI) -> None:
    d = smtpd()
    code, out = openssl(
        [
            "s_client",
            "-starttls",
            "smtp",
            "-connect",
            f"{d.host}:{d.port}",
            "-tls1_2",
            "-CAfile",
            str(pki.ca_file),
            *VERIFY,
        ]
    )
    assert code == 0, out
    assert "Protocol  : TLSv1.2" in out or "TLSv1.2" in out
    assert "ECDHE-ECDSA-AES256-GCM-SHA384" in out or "GCM" in out or "CHACHA20" in out


def test_tls12_renegotiation_is_refused_at_once(smtpd: StartDaemon, pki: PKI) -> None:
    """s_client's R (a client-initiated renegotiation) gets OpenSSL's no_renegotiation alert
    at once: what the server writes while reading leaves without waiting for a reply
    (``TLSPump.flush_unless_held``); the client would otherwise wait for its idle timeout."""
    d = smtpd()
    cmd = ["openssl", "s_client", "-starttls", "smtp", "-connect", f"{d.host}:{d.port}"]
    cmd += ["-tls1_2", *trust(pki)]
    with subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        out = b""
        try:
            for expected, write in ((b"Verify return code: 0", b"R\n"), (b"no renegotiation", b"")):
                deadline = time.monotonic() + 10
                while expected not in out and time.monotonic() < deadline:
                    if select.select([proc.stdout], [], [], 0.2)[0]:
                        chunk = proc.stdout.read1(65536)
                        if not chunk:
                            break
                        out += chunk
                assert expected in out, out.decode(errors="replace")[-2000:]
                if write:
                    proc.stdin.write(write)
                    proc.stdin.flush()
        finally:
            proc.kill()


def test_swaks_auth_on_submission_after_starttls(
    qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI
) -> None:
    qmail_root.users({"alice@mx.test": "swaks-pass-1"})
    d = smtpd(mode="submission")
    base = ["swaks", "--server", f"localhost:{d.port}", "--from", "alice@mx.test"]
    base += ["--to", "friend@elsewhere.test", "--h-Subject", "via swaks", "--body", "hi"]
    base += ["--tls", "--tls-verify", "--tls-ca-path", str(pki.ca_file)]
    ok = subprocess.run(
        [
            *base,
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice@mx.test",
            "--auth-password",
            "swaks-pass-1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "250 2.0.0 Ok: queued as" in ok.stdout
    [(env, body)] = qmail_root.queued()
    assert env.meta["auth"] == "alice@mx.test"
    assert b"Subject: via swaks" in body
    # and without AUTH the same relay is refused
    bad = subprocess.run(base, capture_output=True, text=True, timeout=30, check=False)
    assert bad.returncode != 0
    assert "530 5.7.0" in bad.stdout


# certificate findings are about the throw-away test CA, not the daemon's TLS settings
_TESTSSL_IGNORED = ("cert_", "DNS_CAArecord", "OCSP_stapling", "service", "scanTime")
_TESTSSL_GOOD = ("OK", "INFO", "LOW", "WARN", "DEBUG")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["smtps", "submission"])
def test_testssl_reports_nothing_above_low(smtpd: StartDaemon, mode: str, tmp_path: Path) -> None:
    import json

    d = smtpd(mode=mode)
    report = tmp_path / "testssl.json"
    starttls = ["-t", "smtp"] if mode == "submission" else []
    proc = subprocess.run(
        [
            "testssl",
            "--quiet",
            "--warnings",
            "off",
            "--jsonfile",
            str(report),
            *starttls,
            "--ip",
            d.host,
            f"{d.host}:{d.port}",
        ],
        capture_output=True,
        timeout=600,
        check=False,
    )
    findings = json.loads(report.read_text())
    assert findings, proc.stdout.decode(errors="replace")
    bad = [
        f"{f['id']} {f['severity']} {f['finding']}"
        for f in findings
        if f["severity"] not in _TESTSSL_GOOD and not f["id"].startswith(_TESTSSL_IGNORED)
    ]
    assert bad == []
