"""mx1 signs what its users send, and what arrives at the sink verifies.

A user of mx1 submits (587, AUTH) a message for the sink's domain; it leaves mx1 signed with
both of mx1's keys, passes mx2 and lands in the sink's Maildir. The test takes that stored
message and verifies both signatures with two verifiers no one here wrote (dkimpy and
OpenDKIM's ``opendkim -t``), fetching the public keys over DNS from a real knotd
(``tests/dnsserver.py``) that serves the DKIM records of the zone file the run wrote for mx1
(``artifacts/mh-mx1/dns.zone``, role pyqmail_dns). So the keys the module made, the records
the zone publishes and the signatures pyqmail-send made are checked against one another. A
copy altered after signing fails.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path
from typing import Any

import dns.rdatatype
import dns.zone
from conftest import MX1, SINK, in_sink, new_token, submit
from mailcheck import wait_for

PROJECT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(PROJECT))

from tests.dkim_util import dkimpy_verify, one_signature, opendkim_verify, signatures  # noqa: E402
from tests.dnsserver import DnsServer  # noqa: E402

ZONE = PROJECT / "artifacts" / "mh-mx1" / "dns.zone"


def dkim_records(zone_text: str, domain: str) -> str:
    """The ``<selector>._domainkey.<domain>`` TXT records of the run's zone file."""
    zone = dns.zone.from_text(zone_text, origin=".", relativize=False, check_origin=False)
    lines = [
        f"{owner} {ttl} IN TXT {rdata.to_text()}\n"
        for owner, ttl, rdata in zone.iterate_rdatas(dns.rdatatype.TXT)
        if str(owner).endswith(f"._domainkey.{domain}.")
    ]
    assert len(lines) >= 2, f"{ZONE} publishes no RSA and Ed25519 DKIM keys for {domain}"
    return "".join(lines)


def received_at_sink(sink: Any, client: Any, token: str) -> bytes:
    submit(client, f"admin@{MX1}", [f"dkim-{token}@{SINK}"], token)
    path = wait_for(lambda: in_sink(sink, token), timeout=60)
    assert path, f"message {token} never reached the sink"
    data = base64.b64decode(sink.check_output(f"base64 -w0 {path.splitlines()[0]}"))
    # the sink's Maildir stores LF line ends; SMTP carried (and DKIM signed) CRLF
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def test_mail_from_mx1_arrives_signed_and_verifies(
    mx1: Any, sink: Any, client: Any, tmp_path: Path
) -> None:
    del mx1
    token = new_token()
    message = received_at_sink(sink, client, token)
    sigs = signatures(message)
    algorithms = sorted(b"a=ed25519-sha256" in s for s in sigs)
    assert algorithms == [False, True], f"want one RSA and one Ed25519 signature: {sigs}"
    for sig in sigs:
        assert f"d={MX1}".encode() in sig.replace(b"\r\n", b"").replace(b" ", b""), sig

    with DnsServer({f"{MX1}.": dkim_records(ZONE.read_text(), MX1)}) as server:
        for index in range(len(sigs)):
            assert dkimpy_verify(message, index, server.host, server.port), sigs[index]
            report = opendkim_verify(
                one_signature(message, index),
                [MX1],
                server.host,
                server.port,
                tmp_path / str(index),
            )
            assert "verification" in report and "succeeded" in report, report
        altered = message.replace(f"token {token}".encode(), f"token {token}!".encode())
        assert altered != message
        for index in range(len(sigs)):
            assert not dkimpy_verify(altered, index, server.host, server.port)
