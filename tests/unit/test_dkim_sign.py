"""pyqmail.dkim.sign and .policy: signatures that dkimpy and OpenDKIM accept.

The public keys are served by a real knotd (``tests.dnsserver``); dkimpy and OpenDKIM
(``opendkim -t``) fetch them over loopback (``tests.dkim_util``). Both key types, messages
of awkward shapes (folded and repeated fields, blanks at line ends, an empty body, no final
CRLF, 8-bit bytes), and messages altered after signing, which must fail.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from dkim.canonicalization import Relaxed
from hypothesis import given, settings
from hypothesis import strategies as st

from pyqmail.dkim import keys as dkim_keys
from pyqmail.dkim.policy import decide
from pyqmail.dkim.sign import relaxed_body, relaxed_header, sign, split_message
from pyqmail.protocol.events import MessageStart, TLSInfo
from pyqmail.queue.format import Envelope
from pyqmail.queue.state import signatures as recorded_signatures
from pyqmail.send.remote import wire_data
from pyqmail.smtpd.intake import message_origin
from pyqmail.wirelines import MAX_LINE, wire_lines
from tests.dkim_util import (
    KeyPair,
    dkimpy_verify,
    make_keys,
    one_signature,
    opendkim_verify,
    signatures,
    zone,
)
from tests.dnsserver import DnsServer

DOMAIN = "example.org"
SRC = Path(__file__).resolve().parents[2] / "src"
WHEN = 1_790_000_000

MESSAGES = {
    "plain": (
        b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: hello\r\n"
        b"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n\r\n"
        b"Hello Bob.\r\n"
    ),
    "folded and blanks": (
        b"From:   alice@example.org  \r\nTo: bob@example.net,\r\n\t carol@example.net\r\n"
        b"Subject:  a   folded\r\n   subject\t\r\nCC: x@example.net\r\nTo: second@example.net\r\n"
        b"\r\nline with  blanks \t \r\n\r\n  indented\r\n\r\n\r\n\r\n"
    ),
    "empty body": b"From: alice@example.org\r\nSubject: nothing\r\n\r\n",
    "no final CRLF": b"From: alice@example.org\r\nSubject: x\r\n\r\nlast line",
    "8-bit": "From: Jürgen <alice@example.org>\r\nSubject: Grüße\r\n\r\nÄÖÜ\r\n".encode(),
}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> list[KeyPair]:
    return make_keys(tmp_path_factory.mktemp("dkim"), DOMAIN)


@pytest.fixture(scope="module")
def dns(keys: list[KeyPair]) -> Iterator[DnsServer]:
    with DnsServer({f"{DOMAIN}.": zone(keys)}) as server:
        yield server


def loaded(tmp_path: Path, keys: list[KeyPair]) -> list[dkim_keys.Key]:
    (tmp_path / "dkimkeys").write_text("".join(k.line + "\n" for k in keys))
    return dkim_keys.load(tmp_path)[DOMAIN]


@pytest.mark.parametrize("shape", sorted(MESSAGES))
def test_both_signatures_pass_dkimpy_and_opendkim(
    shape: str, keys: list[KeyPair], dns: DnsServer, tmp_path: Path
) -> None:
    message = MESSAGES[shape]
    signed = sign(message, loaded(tmp_path, keys), WHEN) + message
    assert len(signatures(signed)) == 2
    for index, key in enumerate(keys):
        assert dkimpy_verify(signed, index, dns.host, dns.port), (shape, key.algorithm)
        alone = one_signature(signed, index)
        report = opendkim_verify(alone, [DOMAIN], dns.host, dns.port, tmp_path / f"o{index}")
        assert f"s={key.selector}" in report and report.endswith("succeeded"), report


ALTERATIONS = {
    "body": lambda m: m.replace(b"Hello Bob.", b"Hello Bob!"),
    "subject": lambda m: m.replace(b"Subject: hello", b"Subject: hullo"),
    "a From added on top": lambda m: b"From: mallory@example.org\r\n" + m,
    "a line appended": lambda m: m + b"P.S. wire money\r\n",
}


@pytest.mark.parametrize("how", sorted(ALTERATIONS))
def test_a_message_altered_after_signing_fails(
    how: str, keys: list[KeyPair], dns: DnsServer, tmp_path: Path
) -> None:
    message = MESSAGES["plain"]
    head = sign(message, loaded(tmp_path, keys), WHEN)
    altered = head + ALTERATIONS[how](message)
    where = (dns.host, dns.port)
    for index, key in enumerate(keys):
        assert dkimpy_verify(head + message, index, dns.host, dns.port), key.algorithm
        assert not dkimpy_verify(altered, index, dns.host, dns.port), (how, key.algorithm)
        work = tmp_path / f"o{index}"
        intact = opendkim_verify(one_signature(head + message, index), [DOMAIN], *where, work)
        assert intact.endswith(") succeeded"), intact  # OpenDKIM finds the key, so ...
        report = opendkim_verify(one_signature(altered, index), [DOMAIN], *where, work)
        # ... the failure is the signature's, not a key lookup's ("key DNS query failed")
        assert f"(s={key.selector} " in report, report
        assert report.endswith(" failed: signature verification failed"), report


def test_a_line_that_is_no_field_is_part_of_no_signed_field(
    keys: list[KeyPair], dns: DnsServer, tmp_path: Path
) -> None:
    """An mbox ``From `` line amid the fields (no colon): dkimpy skips it and reads the
    fields after it (``pyqmail.headers.raw_fields``). Signed as part of the Subject above it,
    the signature failed; the To below it is signed and read."""
    message = (
        b"From: alice@example.org\r\nSubject: hi\r\nFrom alice@example.org\r\n"
        b"To: bob@example.net\r\n\r\nHello.\r\n"
    )
    fields, body = split_message(message)
    assert fields[1:] == [
        (b"Subject", b"Subject: hi\r\n"),
        (b"", b"From alice@example.org\r\n"),
        (b"To", b"To: bob@example.net\r\n"),
    ]
    assert body == b"Hello.\r\n"
    signed = sign(message, loaded(tmp_path, keys), WHEN) + message
    for index, key in enumerate(keys):
        assert dkimpy_verify(signed, index, dns.host, dns.port), key.algorithm
        altered = signed.replace(b"To: bob@", b"To: eve@")
        assert not dkimpy_verify(altered, index, dns.host, dns.port), key.algorithm


_TOP = b"From: cron@example.org\r\nSubject: report\r\n"
LONG_LINES = {  # a line of every kind remote delivery breaks at 998 octets
    "body line of 1,500 octets": _TOP + b"\r\n<html>" + b"<p>x</p>" * 186 + b"\r\n",
    "To: of 1,200 octets": (
        _TOP + b"To: " + b",".join(b"u%04d@example.net" % i for i in range(71)) + b"\r\n\r\nhi\r\n"
    ),
    "body line of 998 octets starting with a dot": _TOP + b"\r\n." + b"d" * 997 + b"\r\n",
    "bare LF, 3,000 octets": _TOP.replace(b"\r\n", b"\n") + b"\n" + b"y" * 3000 + b"\n",
    "h= of 1,300 octets": _TOP + b"Content-Description: x\r\n" * 64 + b"\r\nhi\r\n",
}


@pytest.mark.parametrize("shape", sorted(LONG_LINES))
def test_a_message_with_long_lines_verifies_as_remote_delivery_sends_it(
    shape: str, keys: list[KeyPair], dns: DnsServer, tmp_path: Path
) -> None:
    """Lines over 998 octets are broken on the wire (CRLF SPACE): the signature covers the
    broken form, so the copy a receiver gets verifies, with either key (pyqmail signs
    relaxed/relaxed only). What the scheduler hands remote delivery (``wire_lines`` of the
    queued bytes) and the queued bytes themselves leave as the same bytes."""
    message = LONG_LINES[shape]
    head = sign(message, loaded(tmp_path, keys), WHEN)
    assert wire_data(head + wire_lines(message)) == wire_data(head + message)
    wire = wire_data(head + message)
    assert max(len(line) for line in wire.split(b"\r\n")) <= MAX_LINE
    received = wire.removesuffix(b".\r\n").replace(b"\r\n..", b"\r\n.")  # unstuffed
    assert received == head + wire_lines(message)
    for index, key in enumerate(keys):
        assert dkimpy_verify(received, index, dns.host, dns.port), (shape, key.algorithm)
        alone = one_signature(received, index)
        report = opendkim_verify(alone, [DOMAIN], dns.host, dns.port, tmp_path / f"o{index}")
        assert f"s={key.selector}" in report and report.endswith("succeeded"), report


def test_wire_lines_is_idempotent_and_breaks_a_dotted_line_one_octet_earlier() -> None:
    """Applied again (a signed message's copy reaching remote delivery), nothing changes;
    a line starting with "." stays within 998 octets once dot-stuffed."""
    for message in LONG_LINES.values():
        once = wire_lines(message)
        assert wire_lines(once) == once
    dotted = wire_lines(b"." + b"d" * 997 + b"\r\n")
    assert dotted == b"." + b"d" * 996 + b"\r\n d\r\n"
    assert wire_lines(b"e" * 998 + b"\r\n") == b"e" * 998 + b"\r\n"


def test_signature_fields_are_as_documented(keys: list[KeyPair], tmp_path: Path) -> None:
    message = MESSAGES["folded and blanks"]
    head = sign(message, loaded(tmp_path, keys), WHEN)
    rsa_sig, ed_sig = (s.replace(b"\r\n\t", b" ").decode() for s in signatures(head + message))
    assert "a=rsa-sha256" in rsa_sig and "a=ed25519-sha256" in ed_sig
    for sig in (rsa_sig, ed_sig):
        assert "c=relaxed/relaxed" in sig and f"t={WHEN};" in sig and f"d={DOMAIN};" in sig
        h = sig.split(" h=", 1)[1].split(";", 1)[0].replace(" ", "")
        # the single-instance fields present over-signed, To twice and once more; those a
        # reader is shown once when absent (Reply-To, Cc), the others not (Date, Message-ID)
        assert h == "from:from:reply-to:subject:subject:to:to:to:cc:cc"
        assert " l=" not in sig and " x=" not in sig
    # the same key, message and time give the same bytes: a restart could not tell
    assert sign(message, loaded(tmp_path, keys), WHEN) == head


def test_relaxed_canonicalization_rfc6376_examples() -> None:
    """RFC 6376 3.4.5's example, field by field and for the body."""
    assert relaxed_header(b"A: X\r\n") == b"a:X\r\n"
    assert relaxed_header(b"B : Y\t\r\n\tZ  \r\n") == b"b:Y Z\r\n"
    assert relaxed_body(b" C \r\nD \t E\r\n\r\n\r\n") == b" C\r\nD E\r\n"
    assert relaxed_body(b"") == b"" and relaxed_body(b"\r\n\r\n") == b""


def _env(origin: str | None) -> Envelope:
    meta = {} if origin is None else {"origin": origin}
    return Envelope("q1", "alice@example.org", ("bob@example.net",), 1, WHEN + 0.5, meta)


@pytest.mark.parametrize(
    ("origin", "message", "signed", "note"),
    [
        (None, MESSAGES["plain"], False, ""),  # inbound, or relayed for others
        ("smtp", MESSAGES["plain"], False, ""),  # not a known origin
        ("auth", MESSAGES["plain"], True, "signed d=example.org s=sa-rsa,sa-ed origin=auth"),
        ("relay", MESSAGES["plain"], True, "origin=relay"),
        ("local", MESSAGES["plain"], True, "origin=local"),
        ("bounce", MESSAGES["plain"], True, "origin=bounce"),
        ("auth", b"From: A <alice@EXAMPLE.org>\r\n\r\nx\r\n", True, "d=example.org"),
        ("auth", b"Subject: x\r\n\r\nx\r\n", False, "not signed: no From header"),
        (
            "auth",
            b"From: a@example.org\r\nFrom: b@example.org\r\n\r\nx\r\n",
            False,
            "not signed: 2 From headers",
        ),
        (
            "auth",
            b"From: a@example.org, b@example.org\r\n\r\nx\r\n",
            False,
            "not signed: the From header names 2 mailboxes",
        ),
        (
            "auth",
            b"From: a@example.com\r\n\r\nx\r\n",
            False,
            "not signed: From domain example.com has no DKIM key",
        ),
        ("auth", b"From: sub@mail.example.org\r\n\r\nx\r\n", False, "mail.example.org has no"),
        (  # an address as display name: a reader may see the one that was not signed for
            "auth",
            b"From: ceo@example.org <x@example.com>\r\n\r\nx\r\n",
            False,
            "not signed: the From header cannot be read unambiguously",
        ),
    ],
)
def test_which_messages_are_signed(  # noqa: PLR0917 - one argument per table column
    origin: str | None,
    message: bytes,
    signed: bool,
    note: str,
    keys: list[KeyPair],
    tmp_path: Path,
) -> None:
    decision = decide(_env(origin), message, {DOMAIN: loaded(tmp_path, keys)})
    assert bool(decision.headers) == signed
    assert note in decision.note if note else decision.note == ""
    if signed:
        assert f"t={WHEN};".encode() in decision.headers  # the queue's time, whole seconds


IDN = "xn--bcher-kva.example"  # bücher.example


def test_an_internationalised_from_domain_is_signed_by_its_a_label_keys(
    tmp_path: Path,
) -> None:
    """RFC 8616 4: ``control/dkimkeys`` names the A-label (it takes nothing else); mail
    from the U-label is signed, d= the A-label, and verifies. A name Python's IDNA 2003
    codec would map to another (straße to strasse) is not signed."""
    idn_keys = make_keys(tmp_path / "keys", IDN)
    (tmp_path / "dkimkeys").write_text("".join(k.line + "\n" for k in idn_keys))
    keys = dkim_keys.load(tmp_path)
    message = "From: Jörg <joerg@Bücher.example>\r\nSubject: x\r\n\r\nx\r\n".encode()
    decision = decide(_env("auth"), message, keys)
    assert decision.note == f"signed d={IDN} s=sa-rsa,sa-ed origin=auth"
    assert f"d={IDN};".encode() in decision.headers
    with DnsServer({f"{IDN}.": zone(idn_keys)}) as server:
        for index in range(len(idn_keys)):
            assert dkimpy_verify(decision.headers + message, index, server.host, server.port)
    strasse = {"strasse.example": keys[IDN]}
    mapped = decide(_env("auth"), "From: a@straße.example\r\n\r\nx\r\n".encode(), strasse)
    assert not mapped.headers and "no unambiguous A-label" in mapped.note


BODY_PIECES = [b" ", b"\t", b"a", b"b c", b"\r\n", b"  ", b"\r\n\r\n", b"\t \t", b"\xc3\xa4"]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(BODY_PIECES), max_size=16), st.booleans())
def test_body_canonicalization_is_dkimpys(pieces: list[bytes], final_crlf: bool) -> None:
    """Our relaxed body equals dkimpy's for any mix of blanks, lines and empty lines; a body
    without a final CRLF is compared as the wire carries it (DATA adds the CRLF)."""
    body = b"".join(pieces)
    wire = body if body.endswith(b"\r\n") or not body else body + b"\r\n"
    if final_crlf and body and not body.endswith(b"\r\n"):
        body = wire
    assert relaxed_body(body) == Relaxed.canonicalize_body(wire)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([b"Subject", b"X-Thing", b"TO"]),
    st.lists(st.sampled_from([b" ", b"\t", b"v", b"w x", b"\r\n ", b"\r\n\t", b";"]), max_size=10),
)
def test_header_canonicalization_is_dkimpys(name: bytes, pieces: list[bytes]) -> None:
    value = b"".join(pieces)
    [(got_name, got_value)] = Relaxed.canonicalize_headers([[name, value + b"\r\n"]])
    assert relaxed_header(name + b":" + value + b"\r\n") == got_name + b":" + got_value


def test_debians_python_and_cryptography_38_sign_the_same(
    keys: list[KeyPair], dns: DnsServer, tmp_path: Path
) -> None:
    """Hosts run pyqmail-send with Debian's /usr/bin/python3 and python3-cryptography 38:
    the signer works there too, and the result verifies."""
    (tmp_path / "dkimkeys").write_text("".join(k.line + "\n" for k in keys))
    message = MESSAGES["folded and blanks"]
    script = (
        "import sys; from pathlib import Path; from pyqmail.dkim import keys, sign\n"
        f"ks = keys.load(Path({str(tmp_path)!r}))[{DOMAIN!r}]\n"
        f"sys.stdout.buffer.write(sign.sign(sys.stdin.buffer.read(), ks, {WHEN}))\n"
    )
    result = subprocess.run(
        ["/usr/bin/python3", "-c", script],
        input=message,
        capture_output=True,
        env={"PYTHONPATH": str(SRC)},
        timeout=60,
        check=True,
    )
    version = subprocess.run(
        ["/usr/bin/python3", "-c", "import cryptography; print(cryptography.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert version.startswith("38."), version
    assert result.stdout == sign(message, loaded(tmp_path, keys), WHEN)  # same bytes here
    for index in range(2):
        assert dkimpy_verify(result.stdout + message, index, dns.host, dns.port)


@pytest.mark.parametrize(
    ("auth_user", "relay_client", "cert_relay", "origin"),
    [
        ("alice@example.org", False, False, "auth"),
        ("alice@example.org", True, True, "auth"),  # the login says more than the address
        (None, True, False, "relay"),  # tcprules RELAYCLIENT
        (None, False, True, "relay"),  # a certificate listed in tlsclients
        (None, False, False, None),  # inbound, or a backup MX relaying for others
    ],
)
def test_origin_written_by_pyqmail_smtpd(
    auth_user: str | None, relay_client: bool, cert_relay: bool, origin: str | None
) -> None:
    tls = TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256, client_cert_relay=cert_relay)
    event = MessageStart("a@example.org", ("b@example.net",), {}, "h", auth_user, tls, "ESMTPS")
    assert message_origin(event, relay_client) == origin


def test_a_pickup_whose_signatures_cannot_be_synced_leaves_the_file_in_new(
    keys: list[KeyPair], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """state/'s fsync fails after the signatures were written: the signed file must not
    move on to mess/ (its signatures are not durable; a restart would deliver it unsigned
    or signed anew), nor stop pyqmail-send (the OSError escaped the main loop); an
    unsigned file of the same batch goes on."""
    from pyqmail.dkim import pickup
    from pyqmail.queue.format import Stored

    state = tmp_path / "state"
    state.mkdir()
    _fsync_of_state_fails(monkeypatch, state)
    signable = Stored(_env("auth"), MESSAGES["plain"])
    inbound = Stored(_env(None), MESSAGES["plain"])
    logged: list[str] = []
    signed, _ = pickup.sign_batch(
        [("f1", [signable]), ("f2", [inbound])],
        {DOMAIN: loaded(tmp_path, keys)},
        state,
        logged.append,
    )
    assert signed == {"f2": {}}
    assert any("cannot sync" in line and "stay in new/" in line for line in logged)
    # Unlinked, so the next pickup creates it anew and its fsync of state/ has the name
    # to write (a rewrite in place would leave that fsync nothing to do, and Linux answers
    # it with success once the failure was reported).
    assert not (state / "f1").exists()
    monkeypatch.undo()
    signed, _ = pickup.sign_batch(
        [("f1", [signable])], {DOMAIN: loaded(tmp_path, keys)}, state, logged.append
    )
    assert list(signed["f1"]) == [signable.env.queue_id]
    assert recorded_signatures(state / "f1") == signed["f1"]


def _fsync_of_state_fails(monkeypatch: pytest.MonkeyPatch, state: Path, times: int = 99) -> None:
    """Every fsync of the directory ``state`` fails with EIO (the first ``times``)."""
    real, left = os.fsync, [times]

    def fsync(fd: int) -> None:
        if left[0] and os.readlink(f"/proc/self/fd/{fd}") == str(state):
            left[0] -= 1
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_failed_fsync_of_state_in_a_delivery_thread_fails_the_pickup_too(
    keys: list[KeyPair], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery's first state record (another thread of pyqmail-send) runs the fsync of
    state/ after the pickup wrote its signatures, and that fsync fails; Linux reports the
    failure once, so the pickup's own fsync then succeeds. The pickup must not believe it:
    its state file's name may be lost, and after a crash the message would go out unsigned.
    Both share state/'s DirSync, and the pickup's ticket sees the failure."""
    from pyqmail.dkim import pickup
    from pyqmail.queue.format import Stored
    from pyqmail.queue.state import Attempt, append_state

    state = tmp_path / "state"
    state.mkdir()
    real_write_signed = pickup.write_signed
    delivery: list[str] = []

    def write_signed(path: Path, records: list[object]) -> None:
        real_write_signed(path, records)  # type: ignore[arg-type]
        _fsync_of_state_fails(monkeypatch, state, times=1)
        try:  # meanwhile, in a delivery thread: the one failure Linux reports
            append_state(state / "d1", Attempt("deferred", 0, WHEN, "x"))
        except OSError as exc:
            delivery.append(str(exc))

    monkeypatch.setattr(pickup, "write_signed", write_signed)
    logged: list[str] = []
    signed, _ = pickup.sign_batch(
        [("f1", [Stored(_env("auth"), MESSAGES["plain"])])],
        {DOMAIN: loaded(tmp_path, keys)},
        state,
        logged.append,
    )
    assert delivery and "Input/output error" in delivery[0]
    assert signed == {}  # f1 waits in new/
    assert sorted(p.name for p in state.iterdir()) == []  # both files unlinked again
    assert any("cannot sync" in line for line in logged)


def test_state_that_cannot_be_opened_for_its_sync_leaves_the_file_in_new(
    keys: list[KeyPair], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The descriptor state/'s fsync goes through cannot be opened (EMFILE): the pickup logs
    it and the signed file waits in new/; pyqmail-send goes on (the error used to stop it)."""
    from pyqmail.dkim import pickup
    from pyqmail.queue.format import Stored

    state = tmp_path / "state"
    state.mkdir()
    real_open = os.open

    def no_descriptor_for_state(path: object, flags: int, *args: int) -> int:
        if str(path) == str(state) and flags & os.O_DIRECTORY:
            raise OSError(24, "Too many open files")
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", no_descriptor_for_state)
    logged: list[str] = []
    signed, _ = pickup.sign_batch(
        [("f1", [Stored(_env("auth"), MESSAGES["plain"])]), ("f2", [Stored(_env(None), b"x")])],
        {DOMAIN: loaded(tmp_path, keys)},
        state,
        logged.append,
    )
    assert signed == {"f2": {}}
    assert not (state / "f1").exists()
    assert any("cannot record the DKIM signatures of f1" in line for line in logged)


def test_a_leftover_state_file_is_created_anew_not_rewritten(
    keys: list[KeyPair], tmp_path: Path
) -> None:
    """A state file left by an earlier pickup (its file still in new/) is replaced by a new
    file, whose name state/'s fsync then writes."""
    from pyqmail.dkim import pickup
    from pyqmail.queue.format import Stored

    state = tmp_path / "state"
    state.mkdir()
    (state / "f1").write_bytes(b"leftover\n")
    before = (state / "f1").stat().st_ino
    keep = state / "keep"  # holds the old inode, so the new file cannot reuse its number
    os.link(state / "f1", keep)
    signed, _ = pickup.sign_batch(
        [("f1", [Stored(_env("auth"), MESSAGES["plain"])])],
        {DOMAIN: loaded(tmp_path, keys)},
        state,
        lambda line: None,
    )
    assert (state / "f1").stat().st_ino != before
    assert recorded_signatures(state / "f1") == signed["f1"]
    assert keep.read_bytes() == b"leftover\n"


def test_signatures_that_cannot_be_written_whole_leave_no_state_file(
    keys: list[KeyPair], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fdatasync of a state file fails: the file is removed (none is left holding
    records that never reached the disk), the queue file stays in new/, and the other
    files of the batch go on."""
    from pyqmail.dkim import pickup
    from pyqmail.queue.format import Stored

    real = os.fdatasync
    state = tmp_path / "state"
    state.mkdir()

    def fdatasync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/state/f1"):
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    logged: list[str] = []
    one, two = Stored(_env("auth"), MESSAGES["plain"]), Stored(_env("auth"), MESSAGES["plain"])
    signed, _ = pickup.sign_batch(
        [("f1", [one]), ("f2", [two])], {DOMAIN: loaded(tmp_path, keys)}, state, logged.append
    )
    assert list(signed) == ["f2"]
    assert sorted(p.name for p in state.iterdir()) == ["f2"]
    assert any("cannot record the DKIM signatures of f1" in line for line in logged)


def test_a_date_and_message_id_a_relay_adds_keep_the_signature(
    keys: list[KeyPair], dns: DnsServer, tmp_path: Path
) -> None:
    """A submission without Date or Message-ID (a script, a scanner's report): a smarthost or
    list that adds them must not break the signature (a review found it did when absent
    fields were over-signed); a second Subject still breaks it."""
    message = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: s\r\n\r\nbody\r\n"
    head = sign(message, loaded(tmp_path, keys), WHEN)
    added = b"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <x@relay.example>\r\n"
    for index in range(len(keys)):
        assert dkimpy_verify(head + added + message, index, dns.host, dns.port)
        assert not dkimpy_verify(head + b"Subject: other\r\n" + message, index, dns.host, dns.port)
