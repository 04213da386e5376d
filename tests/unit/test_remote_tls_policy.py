"""pyqmail-send picks up a changed pin or client certificate at the next attempt, no HUP."""

from __future__ import annotations

import os
from pathlib import Path

from pyqmail.send.tlspolicy import TlsPolicy
from tests.conftest import PKI


def _touch_later(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_pinned_context_follows_the_pin_file(tmp_path: Path, pki: PKI) -> None:
    (tmp_path / "tlshosts").mkdir()
    pin = tmp_path / "tlshosts" / "mx2.test.pem"
    pin.write_bytes(pki.other_ca.cert_pem)
    policy = TlsPolicy(tmp_path)
    first = policy.pinned(pin)
    assert policy.pinned(pin) is first  # unchanged file: cached
    wrong_ca = first.get_ca_certs()[0]["subject"]
    pin.write_bytes(pki.ca.cert_pem)
    _touch_later(pin)
    second = policy.pinned(pin)
    assert second is not first
    assert second.get_ca_certs()[0]["subject"] != wrong_ca


def test_client_certificate_appears_without_restart(tmp_path: Path, pki: PKI) -> None:
    policy = TlsPolicy(tmp_path)
    without = policy.verifying()
    pki.ca.write_servercert(tmp_path / "clientcert.pem", pki.client)
    with_cert = policy.verifying()
    assert with_cert is not without
    assert policy.verifying() is with_cert
