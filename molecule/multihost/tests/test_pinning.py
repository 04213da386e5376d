"""A pinned destination (control/tlshosts/<fqdn>.pem) whose certificate does not verify
against the pin is deferred, nothing is sent in clear, and once the pin is fixed a flush
delivers the message (qmail-tls part 2: "it is not an error if the remote server doesn't support
STARTTLS, UNLESS you put its certificate in a file called fqdn.pem").

The pin is read per attempt: a changed pin (either way) applies at the next attempt without a
reload. The test first delivers with the good pin, so a stale copy of it would be caught."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import (
    MX1,
    MX2,
    PIN,
    QUEUE_TOOL,
    SINK,
    address_of,
    deliveries,
    in_sink,
    new_token,
    submit,
)
from mailcheck import CA_PATH, put_file, service_log, wait_for

# Captures every outgoing TCP segment to port 25 on mx1 (AF_PACKET, needs CAP_NET_RAW) until
# the stop file appears; writes {connection: payload hex} in capture order.
SNIFFER = r"""
import json, os, socket, struct, sys, time
stop, out, limit = sys.argv[1], sys.argv[2], time.time() + float(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
s.settimeout(0.2)
open(out + ".ready", "w").close()
streams = {}
while not os.path.exists(stop) and time.time() < limit:
    try:
        frame, addr = s.recvfrom(262144)
    except socket.timeout:
        continue
    if addr[2] != socket.PACKET_OUTGOING or frame[12:14] != b"\x08\x00":
        continue
    ip = frame[14:]
    if ip[9] != 6:
        continue
    ihl = (ip[0] & 15) * 4
    tcp = ip[ihl:struct.unpack("!H", ip[2:4])[0]]
    sport, dport = struct.unpack("!HH", tcp[:4])
    payload = tcp[(tcp[12] >> 4) * 4:]
    if dport == 25 and payload:
        key = f"{socket.inet_ntoa(ip[16:20])}:{sport}"
        streams[key] = streams.get(key, "") + payload.hex()
with open(out + ".tmp", "w") as f:
    json.dump(streams, f)
os.rename(out + ".tmp", out)
"""
CAPTURE = "/tmp/sniff.json"
STOP = "/tmp/sniff.stop"


@pytest.fixture
def sniffer(mx1: Any) -> Iterator[Any]:
    put_file(mx1, "/tmp/sniff.py", SNIFFER.encode())
    mx1.check_output(f"rm -f {CAPTURE} {CAPTURE}.ready {STOP}")
    mx1.check_output(
        f"setsid python3 /tmp/sniff.py {STOP} {CAPTURE} 240 </dev/null >/tmp/sniff.log 2>&1 &"
    )
    ready = wait_for(lambda: mx1.file(f"{CAPTURE}.ready").exists, timeout=15)
    assert ready, mx1.run("cat /tmp/sniff.log").stdout

    def stop() -> dict[str, bytes]:
        mx1.check_output(f"touch {STOP}")
        assert wait_for(lambda: mx1.file(CAPTURE).exists, timeout=15), "sniffer did not stop"
        raw = json.loads(mx1.check_output(f"cat {CAPTURE}"))
        return {k: bytes.fromhex(v) for k, v in raw.items()}

    yield stop
    mx1.run(f"touch {STOP}")


@pytest.fixture
def pin_restored(mx1: Any) -> Iterator[str]:
    """The pin as converged; put back (and the queue flushed) after the test."""
    original = mx1.file(PIN).content
    yield original.decode()
    put_file(mx1, PIN, original)
    mx1.run(f"{QUEUE_TOOL} flush")


def queue_listing(mx1: Any, recipient: str) -> str:
    """pyqmail-queue's line for ``recipient`` ("" when it is no longer queued)."""
    out = mx1.check_output(f"{QUEUE_TOOL} list")
    return next((ln for ln in out.splitlines() if f"<{recipient}>" in ln), "")


def defer_with_wrong_pin(mx1: Any, mx2: Any, client: Any, rcpt: str, token: str) -> None:
    """Pin mx1's own CA for mx2 (it did not sign mx2's certificate), send, see it deferred."""
    put_file(mx1, PIN, mx1.file(CA_PATH).content)
    mx2_before = len(service_log(mx2, "qmail-smtpd"))
    submit(client, f"pin-{token}@{MX1}", [rcpt], token)

    attempts = wait_for(lambda: deliveries(mx1, rcpt), timeout=60)
    assert attempts, f"no delivery attempt for {rcpt}"
    first = attempts[0]
    assert first["result"] == "deferred", first
    assert MX2 in first["host"], first
    assert "TLS required" in first["detail"] and "certificate" in first["detail"], first
    assert first["tls"] == "none" and first["verified"] != "yes", first

    # pyqmail-queue shows it deferred with the TLS reason.
    listed = queue_listing(mx1, rcpt)
    assert listed.split()[0] == "deferred", listed
    assert "TLS required" in listed, listed

    # The receiving side saw mx1 abort the handshake, and never a message from it.
    mx2_new = service_log(mx2, "qmail-smtpd")[mx2_before:]
    mx1_ip = address_of(mx1)
    assert any(" tls-fail " in ln and f" ip={mx1_ip} " in ln for ln in mx2_new), mx2_new
    assert not any(" msg " in ln and f" ip={mx1_ip} " in ln for ln in mx2_new), mx2_new
    mx2_logs = "\n".join(service_log(mx2, "qmail-smtpd") + service_log(mx2, "qmail-send"))
    assert token not in mx2_logs
    assert not mx2.run(f"grep -rl {token} /var/qmail/queue /var/vmail").stdout.strip()


def test_wrong_pin_defers_in_tls_then_fixed_pin_delivers(
    mx1: Any, mx2: Any, sink: Any, *, client: Any, sniffer: Any, pin_restored: str
) -> None:
    # With the converged pin: delivered (pyqmail-send now holds a context for this pin).
    good = new_token()
    submit(client, f"pin-{good}@{MX1}", [f"pin-{good}@{SINK}"], good)
    assert wait_for(lambda: in_sink(sink, good), timeout=60), deliveries(mx1, f"pin-{good}@{SINK}")

    token = new_token()
    rcpt = f"pin-{token}@{SINK}"
    defer_with_wrong_pin(mx1, mx2, client, rcpt, token)
    assert not in_sink(sink, token)

    # Fix the pin, flush (pyqmail-queue flush = svc -a): delivered, over verified TLS.
    put_file(mx1, PIN, pin_restored.encode())
    flushed = mx1.run(f"{QUEUE_TOOL} flush")
    assert flushed.rc == 0, flushed.stdout + flushed.stderr
    assert wait_for(lambda: in_sink(sink, token), timeout=60), (
        f"not delivered after the pin was fixed: {deliveries(mx1, rcpt)}"
    )
    last = deliveries(mx1, rcpt)[-1]
    assert last["result"] == "done" and last["verified"] == "yes", last
    assert last["tls"].startswith("TLSv1."), last
    assert wait_for(lambda: not queue_listing(mx1, rcpt), timeout=30)

    # On the wire from mx1 to any port 25: no envelope or message in clear, ever. Each
    # connection's cleartext part is EHLO and STARTTLS (and QUIT after a failed handshake).
    streams = sniffer()
    assert len(streams) >= 3, f"expected two good connections, one failed: {list(streams)}"
    for key, data in streams.items():
        assert token.encode() not in data and good.encode() not in data, f"clear text to {key}"
        assert not re.search(rb"(?i)mail from:|rcpt to:|\r\ndata\r\n", data), key
        text = data.split(b"\x16\x03", 1)[0]
        commands = [ln.split(b" ")[0].upper() for ln in text.split(b"\r\n") if ln]
        assert commands[:2] == [b"EHLO", b"STARTTLS"], (key, text)
