"""Each MX runs all its services under daemontools, and the cross-host trust is in place: each
has its own CA (the key stays on its host), mx2 trusts mx1's CA for client certificates and
lists mx1's identity, mx1 pins mx2's CA."""

from __future__ import annotations

import time
from typing import Any

import pytest
from conftest import MX1, MX2, PIN
from mailcheck import CA_PATH, all_service_paths, svstat

CA_DIR = "/etc/pyqmail/ca"
CONTROL = "/var/qmail/control"


@pytest.mark.parametrize("name", ["mx1", "mx2"])
def test_all_services_up_and_not_restarting(name: str, request: pytest.FixtureRequest) -> None:
    mx = request.getfixturevalue(name)
    paths = all_service_paths()
    first = svstat(mx, *paths)
    assert sorted(first) == sorted(paths)
    time.sleep(3)
    second = svstat(mx, *paths)
    for path in paths:
        assert second[path]["state"] == "up", f"{name} {path}: {second[path]}"
        assert second[path]["pid"] == first[path]["pid"], f"{name} {path} restarted"
        assert second[path]["seconds"] >= 3, f"{name} {path} up only {second[path]['seconds']} s"


def pem_certs(text: str) -> list[str]:
    """The PEM certificate blocks of ``text``, normalized."""
    blocks, current = [], None
    for line in text.splitlines():
        if line == "-----BEGIN CERTIFICATE-----":
            current = [line]
        elif current is not None:
            current.append(line)
            if line == "-----END CERTIFICATE-----":
                blocks.append("\n".join(current))
                current = None
    return blocks


def test_each_mx_has_its_own_ca_and_the_key_stays_home(mx1: Any, mx2: Any) -> None:
    ca1, ca2 = (pem_certs(h.file(CA_PATH).content_string) for h in (mx1, mx2))
    assert len(ca1) == len(ca2) == 1
    assert ca1 != ca2
    for host in (mx1, mx2):
        key = host.file(f"{CA_DIR}/ca.key")
        assert key.exists and key.user == "root" and key.mode == 0o600
    # A line from the middle of mx1's CA key occurs in no file on mx2 (and vice versa).
    for owner, other in ((mx1, mx2), (mx2, mx1)):
        body = owner.check_output(f"sed -n 3p {CA_DIR}/ca.key").strip()
        assert len(body) > 20
        found = other.run(f"grep -rlF -- {body} /etc /var/qmail /opt/pyqmail /root /tmp")
        assert found.stdout.strip() == "", f"CA key material found on the other host: {found}"


def test_mx2_trusts_mx1_client_certificates(mx1: Any, mx2: Any) -> None:
    clientca = pem_certs(mx2.file(f"{CONTROL}/clientca.pem").content_string)
    own = pem_certs(mx2.file(CA_PATH).content_string)
    other = pem_certs(mx1.file(CA_PATH).content_string)
    assert clientca == own + other
    listed = mx2.file(f"{CONTROL}/tlsclients").content_string.splitlines()
    assert [ln for ln in listed if ln and not ln.startswith("#")] == [MX1]
    assert not mx1.file(f"{CONTROL}/tlsclients").exists


def test_mx1_client_certificate_names_it_and_chains_to_its_ca(mx1: Any) -> None:
    path = f"{CONTROL}/clientcert.pem"
    cert = mx1.file(path)
    # The manager owns it; the remote delivery child (group pyqmailr) offers it.
    assert (cert.user, cert.group, cert.mode) == ("pyqmails", "pyqmailr", 0o440)
    markers = [ln for ln in cert.content_string.splitlines() if ln.startswith("-----BEGIN")]
    assert markers[0].endswith("PRIVATE KEY-----") and markers[1] == "-----BEGIN CERTIFICATE-----"
    verify = mx1.run(f"openssl verify -purpose sslclient -CAfile {CA_PATH} {path}")
    assert verify.rc == 0 and verify.stdout.strip().endswith("OK"), verify.stdout + verify.stderr
    text = mx1.check_output(f"openssl x509 -in {path} -noout -subject -ext subjectAltName")
    assert f"CN = {MX1}" in text and f"DNS:{MX1}" in text


def test_mx1_pins_mx2_ca(mx1: Any, mx2: Any) -> None:
    assert pem_certs(mx1.file(PIN).content_string) == pem_certs(mx2.file(CA_PATH).content_string)
    assert mx1.check_output(f"ls {CONTROL}/tlshosts").split() == [f"{MX2}.pem"]
