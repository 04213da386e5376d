"""The checks' control files (pyqmail.checks.settings): defaults, and every bad value a
clear ControlError naming the file, so pyqmail-smtpd refuses it before anything changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyqmail.checks.settings import load
from pyqmail.control.reader import ControlError


def test_defaults(tmp_path: Path) -> None:
    s = load(tmp_path, "mx.test")
    assert (s.enabled, s.authserv_id, s.on_reject, s.on_quarantine, s.timeout) == (
        False,
        "mx.test",
        "reject",
        "quarantine",
        10,
    )
    assert s.resolver is None


def test_values(tmp_path: Path) -> None:
    for name, text in {
        "authchecks": "1",
        "authservid": "auth.mx.test",
        "dmarcreject": "none",
        "dmarcquarantine": "reject",
        "authtimeout": "3",
        "dnsresolver": "127.0.0.1@5353\n::1\n",
    }.items():
        (tmp_path / name).write_text(text + "\n")
    s = load(tmp_path, "mx.test")
    assert (s.enabled, s.authserv_id, s.on_reject, s.on_quarantine, s.timeout) == (
        True,
        "auth.mx.test",
        "none",
        "reject",
        3,
    )
    assert s.servers == (("127.0.0.1", 5353), ("::1", 53))
    assert s.resolver is not None and s.resolver.nameservers == ["127.0.0.1", "::1"]


@pytest.mark.parametrize(
    ("name", "text", "error"),
    [
        ("dmarcreject", "bounce", "dmarcreject:1: 'bounce' is not a DMARC action"),
        ("dmarcquarantine", "Reject", "dmarcquarantine:1: 'Reject' is not a DMARC action"),
        ("authchecks", "yes", "authchecks:1: not a non-negative integer"),
        ("authtimeout", "0", "authtimeout:1: 0 is out of range (min 1, max 60)"),
        ("authservid", "mx one", "authservid:1: 'mx one' is not a host name"),
        ("dnsresolver", "ns1.example.org", "dnsresolver:1: 'ns1.example.org' is not an IP address"),
        (
            "dnsresolver",
            "127.0.0.1@0",
            "dnsresolver:1: port '0' of 127.0.0.1 is not a port (1-65535)",
        ),
    ],
)
def test_bad_values_name_the_file(tmp_path: Path, name: str, text: str, error: str) -> None:
    (tmp_path / name).write_text(text + "\n")
    with pytest.raises(ControlError) as exc:
        load(tmp_path, "mx.test")
    assert error in str(exc.value)
