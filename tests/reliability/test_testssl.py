"""testssl.sh (Debian package) against the daemon's three listeners on 127.0.0.1 high ports.

``-t smtp`` against the port-25 style and submission listeners, implicit TLS against the
smtps one, with ``--jsonfile``; the test reads the JSON (testssl's exit code is not a grade)
and fails if any finding is MEDIUM, HIGH or CRITICAL, printing the counts by severity.
The test CA is passed with ``--add-ca`` so chain-of-trust findings mean what they say.

Quick (``make test``, about 30 s): protocols and forward secrecy (ciphers offered) on smtps.
Slow (``-m slow``/``make stress``): protocols, ciphers, forward secrecy, server defaults and
every vulnerability check (-U) on all three listeners; every listener must resume a TLS
session by ticket, shown by ``openssl s_client -sess_out``/``-sess_in`` in an SMTP dialogue
(``resumes_with_s_client``) and by testssl's own check where it can tell.

testssl checks resumption with an ``s_client`` whose standard input is /dev/null: it
closes the connection as soon as its handshake is done. A TLS 1.3 server sends its session
tickets only after the client's Finished (OpenSSL's), and pyqmail sends them with its
first reply (``tests/e2e/test_smtpd_tls_resume.py``): on smtps, the 220 that follows the
handshake at once. Whether that arrives before s_client has read its EOF is a race, which
this machine's slower kernel loses (seen in session 24: no session saved in 20 of 20
tries; testssl then says "check failed because of connect problem"). That finding is
accepted only beside a resumption that s_client, kept in the dialogue, shows.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from tests.conftest import PKI
from tests.e2e.conftest import QmailRoot, StartDaemon
from tests.pki import CA, Issued

pytestmark = pytest.mark.skipif(
    shutil.which("testssl") is None, reason="testssl.sh not installed (Debian package testssl.sh)"
)

SEVERITIES = ("OK", "INFO", "LOW", "MEDIUM", "HIGH", "CRITICAL", "WARN", "DEBUG")
BAD = {"MEDIUM", "HIGH", "CRITICAL"}
QUICK = ["-p", "-f"]
FULL = ["-p", "-s", "-f", "-S", "-U"]


def run_testssl(port: int, starttls: bool, checks: list[str], ca: Path, out: Path) -> list[dict]:
    cmd = [
        "testssl",
        *("--quiet", "--color", "0", "--warnings", "off", "--add-ca", str(ca)),
        *("--connect-timeout", "10", "--openssl-timeout", "10", "--nodns", "none"),
        *("--jsonfile", str(out)),
        *checks,
        *(["-t", "smtp"] if starttls else []),
        f"127.0.0.1:{port}",
    ]
    # shorter waits for replies that never come (HTTP service detection on an SMTP port)
    env = {**os.environ, "HEADER_MAXSLEEP": "1", "MAX_WAITSOCK": "3"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, env=env)
    if not out.exists():
        raise AssertionError(f"testssl wrote no JSON (exit {proc.returncode}):\n{proc.stdout}")
    findings = json.loads(out.read_text())
    assert isinstance(findings, list) and findings, f"empty testssl JSON: {out.read_text()[:500]}"
    scan_problems = [f for f in findings if f.get("id") in ("scanProblem", "scanTime")]
    assert not [f for f in scan_problems if f.get("severity") == "FATAL"], scan_problems
    return findings


def judge(name: str, findings: list[dict]) -> Counter[str]:
    counts = Counter(f.get("severity", "?") for f in findings)
    print(f"testssl {name}: " + " ".join(f"{s}={counts[s]}" for s in SEVERITIES if counts[s]))
    for f in findings:
        if f.get("severity") in ("LOW", "WARN"):
            print(f"  {f.get('severity')} {f.get('id')}: {f.get('finding')}")
    bad = [f for f in findings if f.get("severity") in BAD]
    assert not bad, f"{name}: findings above LOW:\n" + "\n".join(
        f"  {f.get('severity')} {f.get('id')}: {f.get('finding')}" for f in bad
    )
    ids = {f.get("id") for f in findings}
    assert {"SSLv3", "TLS1", "TLS1_1", "TLS1_2", "TLS1_3"} <= ids, f"protocols not tested: {ids}"
    offered = {
        f["id"]: f.get("finding", "") for f in findings if f["id"].startswith(("SSL", "TLS1"))
    }
    for old in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
        assert "not offered" in offered.get(old, "not offered"), f"{name}: {old} {offered[old]}"
    for new in ("TLS1_2", "TLS1_3"):
        assert offered.get(new, "").startswith("offered"), f"{name}: {new} {offered.get(new)}"
    return counts


def production_like_leaf(ca: CA) -> Issued:
    """What a real deployment serves (an ACME certificate): 90 days, revocation URIs.

    The shared test PKI issues 30-day leaves without CRL/OCSP URIs, which testssl rates HIGH
    (certificate findings, not TLS configuration). testssl does not fetch these URIs unless
    run with --phone-out; they point to 127.0.0.1 anyway."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    sans = [x509.DNSName("localhost"), x509.DNSName("mx.test")]
    sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    crl = x509.DistributionPoint(
        [x509.UniformResourceIdentifier("http://127.0.0.1/ca.crl")], None, None, None
    )
    ocsp = x509.AccessDescription(
        AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier("http://127.0.0.1/ocsp")
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.CRLDistributionPoints([crl]), critical=False)
        .add_extension(x509.AuthorityInformationAccess([ocsp]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(key, cert)


@pytest.fixture
def listeners(qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI) -> dict[str, int]:
    qmail_root.users({"alice@mx.test": "alice-password-1"})
    qmail_root.servercert(production_like_leaf(pki.ca))
    return {mode: smtpd(mode=mode, workers=2).port for mode in ("smtp", "submission", "smtps")}


def test_testssl_quick_smtps(listeners: dict[str, int], pki: PKI, tmp_path: Path) -> None:
    start = time.monotonic()
    findings = run_testssl(listeners["smtps"], False, QUICK, pki.ca_file, tmp_path / "smtps.json")
    counts = judge("quick smtps", findings)
    print(f"testssl quick: {time.monotonic() - start:.0f}s, {dict(counts)}")


@pytest.mark.slow
def test_testssl_full_on_all_listeners(listeners: dict[str, int], pki: PKI, tmp_path: Path) -> None:
    start = time.monotonic()
    total: Counter[str] = Counter()
    for mode, port in listeners.items():
        findings = run_testssl(port, mode != "smtps", FULL, pki.ca_file, tmp_path / f"{mode}.json")
        total += judge(f"full {mode}", findings)
        # Session tickets (pyqmail.tickets): testssl reports them as INFO, with their
        # lifetime ("valid for 3600 seconds only (<daily)"); no session-ID cache.
        assert resumes_with_s_client(port, mode != "smtps", pki.ca_file, tmp_path / mode), mode
        resumption = {f["id"]: f.get("finding", "") for f in findings}
        ticket = resumption.get("sessionresumption_ticket")
        assert ticket in ("supported", TESTSSL_RACE), (mode, resumption)
        if ticket != "supported":
            print(f"testssl {mode}: {ticket!r} (its s_client left before the ticket came)")
    print(f"testssl full: {time.monotonic() - start:.0f}s, totals {dict(total)}")


TESTSSL_RACE = "check failed because of connect problem"


def resumes_with_s_client(port: int, starttls: bool, ca: Path, work: Path) -> bool:
    """A first ``openssl s_client`` saves the session (its EHLO's reply brings the tickets),
    a second one offers it and must report "Reused"."""
    work.mkdir()
    sess = work / "session.pem"
    base = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-ign_eof"]
    base += ["-CAfile", str(ca), "-verify_return_error", "-servername", "localhost"]
    base += ["-starttls", "smtp"] if starttls else []
    dialogue = b"EHLO client.test\r\nQUIT\r\n"
    outputs = []
    for flag in ("-sess_out", "-sess_in"):
        proc = subprocess.run(
            [*base, flag, str(sess)], input=dialogue, capture_output=True, timeout=30, check=False
        )
        outputs.append((proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace")))
    (code1, out1), (code2, out2) = outputs
    assert code1 == 0 and sess.exists(), out1
    assert code2 == 0, out2
    return "Reused, TLSv1.3" in out2
