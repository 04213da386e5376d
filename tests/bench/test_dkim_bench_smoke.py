"""Smoke tests of ``make bench-e2e``'s outbound signed row: counts and signatures, not timings.

The sink must count every message relayed to it and call a message signed only when it
carries both signatures of the signing domain; the row, run with a handful of messages,
must show both servers' messages arriving signed (Postfix through its OpenDKIM milters,
pyqmail through pyqmail-send's signer), verified by dkimpy.
"""

from __future__ import annotations

import base64
import os
import re
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from bench.dkim_sink import dkim_signatures, verdict
from bench.e2e_outbound import Sink
from tests.bench.test_bench_smoke import NO_POSTFIX

REPO = Path(__file__).resolve().parents[2]
HAVE_POSTFIX = Path("/usr/lib/postfix/sbin/master").exists() and os.geteuid() == 0

RSA_SIG = (
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=bench.test;\r\n\ts=r; b=AAAA\r\n"
)
ED_SIG = (
    b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n d=bench.test; s=e; b=BB\r\n"
)
BODY = b"From: <a@bench.test>\r\nTo: <u@sink.test>\r\nSubject: s\r\n\r\n.leading dot\r\nbody\r\n"


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (RSA_SIG + ED_SIG + BODY, "ok"),
        (ED_SIG + RSA_SIG + BODY, "ok"),
        (BODY, "no DKIM-Signature"),
        (RSA_SIG + BODY, "signatures: rsa-sha256 d=bench.test"),
        (RSA_SIG + RSA_SIG + BODY, "signatures: rsa-sha256 d=bench.test, rsa-sha256 d=bench.test"),
        (
            RSA_SIG.replace(b"d=bench.test", b"d=other.test") + ED_SIG + BODY,
            "signatures: ed25519-sha256 d=bench.test, rsa-sha256 d=other.test",
        ),
        # A DKIM-Signature in the body is not a signature.
        (BODY + RSA_SIG + ED_SIG, "no DKIM-Signature"),
    ],
)
def test_verdict(message: bytes, expected: str) -> None:
    assert verdict(message, "bench.test", ("rsa-sha256", "ed25519-sha256")) == expected


def test_folded_signature_tags_are_joined() -> None:
    (sig,) = dkim_signatures(ED_SIG + BODY)
    assert sig["a"] == "ed25519-sha256"
    assert sig["d"] == "bench.test"


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    try:
        yield s
    finally:
        s.stop()


def test_sink_counts_and_checks_what_it_receives(sink: Sink) -> None:
    with smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as smtp:
        assert "pipelining" in smtp.ehlo()[1].decode().lower()
        for message in (RSA_SIG + ED_SIG + BODY, BODY, RSA_SIG + BODY):
            smtp.sendmail("a@bench.test", ["u@sink.test"], message)
        assert sink.count() == 3
        smtp.rset()
        assert smtp.docmd("DATA")[0] == 503
    report = sink.report()
    assert report["messages"] == 3
    assert report["signed"] == 1
    assert report["verdicts"] == {
        "ok": 1,
        "no DKIM-Signature": 1,
        "signatures: rsa-sha256 d=bench.test": 1,
    }
    # The first message is kept as it was sent (dot-unstuffed), for the verification.
    assert report["first"].encode("latin-1") == RSA_SIG + ED_SIG + BODY


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rows", "outbound"], "--rows: expected some of inbound, dkim"),
        (["--rows", ","], "--rows: expected some of inbound, dkim"),
    ],
)
def test_rows_option_is_checked(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench import e2e_throughput

    assert e2e_throughput.parse_args(["--rows", "dkim"]).row_list == ["dkim"]
    assert e2e_throughput.parse_args([]).row_list == ["inbound", "dkim"]
    with pytest.raises(SystemExit) as exc:
        e2e_throughput.parse_args(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.needs_root
def test_outbound_row_signs_on_both_servers() -> None:
    """The row with 8 messages per server: every one reaches the sink with an rsa-sha256
    and an ed25519-sha256 signature, the first one verifies, and a ratio is printed."""
    if not HAVE_POSTFIX:
        pytest.skip(NO_POSTFIX)
    proc = subprocess.run(
        [
            *(sys.executable, str(REPO / "bench" / "e2e_throughput.py"), "--rows", "dkim"),
            *("--messages", "8", "--sessions", "4", "--rounds", "1", "--settle", "0"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    for name in ("pyqmail", "postfix"):
        assert re.search(
            rf"^round 1 {name} .* msg/s delivered .* signed: 2 signatures each$", out, re.M
        ), out
        assert re.search(rf"^  {name} .* first message: dkimpy pass$", out, re.M), out
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"dkim outbound ratio vs postfix\+opendkim: \d+\.\d\d", last), out


def test_first_message_verification_catches_an_altered_message(tmp_path: Path) -> None:
    """verify_first (dkimpy, against the keys' TXT records) passes a message signed with
    both keys and fails it once its body changed after signing."""
    import dkim

    from bench.dkim_peer import make_keys
    from bench.e2e_outbound import verify_first

    keys = make_keys(tmp_path, "bench.test")
    message = BODY
    for key in keys:
        pem = key.path.read_bytes()
        private = serialization.load_pem_private_key(pem, password=None)
        if isinstance(private, ed25519.Ed25519PrivateKey):  # dkimpy: the base64 raw seed
            raw = private.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
            pem = base64.b64encode(raw)
        sig = dkim.sign(
            message,
            key.selector.encode(),
            b"bench.test",
            pem,
            canonicalize=(b"relaxed", b"relaxed"),
            signature_algorithm=key.algorithm.encode(),
            include_headers=[b"from", b"to", b"subject"],
        )
        message = sig + message
    assert len(dkim_signatures(message)) == 2
    assert verify_first(message.decode("latin-1"), keys) == "pass"
    altered = message.replace(b"body\r\n", b"b0dy\r\n")
    assert verify_first(altered.decode("latin-1"), keys).startswith("fail")
    other = make_keys(tmp_path / "other", "bench.test")
    assert verify_first(message.decode("latin-1"), other).startswith("fail")


def test_a_server_that_does_not_sign_gets_no_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Messages at the sink without both signatures make the server "not signing yet":
    no rate and no ratio are printed for it, whatever its speed."""
    from bench import e2e_outbound, e2e_throughput
    from bench.dkim_peer import make_keys

    keys = make_keys(tmp_path, "bench.test")
    report = {"messages": 3, "signed": 1, "verdicts": {"ok": 1, "no DKIM-Signature": 2}}
    wrong, _ = e2e_outbound._check_signed({**report, "first": ""}, 3, keys)
    assert wrong == "1 of 3 messages carry both signatures (no DKIM-Signature: 2, ok: 1)"
    assert (
        "2 messages at the sink for 3 sent"
        in e2e_outbound._check_signed({**report, "messages": 2, "first": ""}, 3, keys)[0]
    )
    unsigned = BODY.decode("latin-1")
    wrong, verdict = e2e_outbound._check_signed(
        {"messages": 1, "signed": 1, "verdicts": {"ok": 1}, "first": unsigned}, 1, keys
    )
    assert (wrong, verdict) == ("the signatures do not verify (fail: no signature)", verdict)
    fast = e2e_throughput.Result(9999.0, 9999.0, 0.1, 0.1, 0.1)
    row = e2e_outbound.Row(
        runs={"pyqmail": [fast], "postfix": [e2e_throughput.Result(100.0, 100.0, 1, 1, 1)]},
        not_signing={"pyqmail": wrong},
        verified={"postfix": "pass"},
    )
    e2e_outbound.print_summary(row, e2e_throughput.parse_args(["--rows", "dkim"]))
    out = capsys.readouterr().out
    assert "9999" not in out
    assert f"pyqmail  not signing yet: {wrong}" in out
    assert out.strip().splitlines()[-1] == (
        "dkim outbound ratio vs postfix+opendkim: n/a (pyqmail not signing yet)"
    )


@pytest.mark.parametrize("size", [512, 4096, 4097])
def test_submitted_message_has_the_sender_and_exact_size(size: int) -> None:
    from bench.loadgen import make_message

    msg = make_message(size, "loadgen@bench.test", "user@sink.test")
    assert len(msg) == size
    head = msg.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert b"From: Load Generator <loadgen@bench.test>" in head
    assert b"To: <user@sink.test>" in head
    assert any(line.startswith(b"Date: ") for line in head)
    assert not any(line.startswith(b"Date: ") for line in make_message(size).split(b"\r\n"))
