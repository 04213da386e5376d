"""The scanning stage's parts on their own: the control files (every bad value a clear error
naming the file), who is scanned, rspamd's reply and header edits, clamd's reply, and the
stage's decision with both scanners real (rspamd and clamd from ``tests/scanners.py``)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from pyqmail.control.reader import ControlError
from pyqmail.scan import clamd, rspamd, stage
from pyqmail.scan.settings import Address, ScanSettings, applies, load, parse_address
from pyqmail.scan.wire import ScanError
from tests.scanners import EICAR, GTUBE, Clamd, Rspamd, with_attachment

ENV = rspamd.Envelope("127.0.0.1", "client.test", "a@client.test", ("u@mx.test",), None, "Q1")
MESSAGE = b"From: <a@client.test>\r\nSubject: hi\r\n\r\nhello\r\n"


def control(tmp_path: Path, **files: str) -> Path:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_no_files_no_scanning(tmp_path: Path) -> None:
    settings = load(tmp_path)
    assert not settings.enabled
    assert settings.timeout == 20
    assert settings.tempfail
    assert settings.clients == {"inbound"}
    assert settings.actions["reject"] == "refuse"
    assert settings.actions["add header"] == "junk"


def test_every_file_read(tmp_path: Path) -> None:
    settings = load(
        control(
            tmp_path,
            rspamd="[::1]:11333\n",
            clamd="/run/clamav/clamd.ctl\n",
            scantimeout="5\n",
            scantempfail="0\n",
            scanclients="inbound\nauth\n",
            rspamdactions="add_header=accept\nsoft reject = refuse\n",
        )
    )
    assert settings.rspamd == Address(host="::1", port=11333)
    assert str(settings.rspamd) == "[::1]:11333"
    assert settings.clamd == Address(path="/run/clamav/clamd.ctl")
    assert (settings.timeout, settings.tempfail) == (5, False)
    assert settings.clients == {"inbound", "auth"}
    assert settings.actions["add header"] == "accept"
    assert settings.actions["soft reject"] == "refuse"
    assert settings.actions["reject"] == "refuse"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("rspamd", "localhost:11333", "'localhost:11333' is not an address"),
        ("rspamd", "127.0.0.1", "'127.0.0.1' is not an address"),
        ("rspamd", "127.0.0.1:0", "port '0' of '127.0.0.1:0' is not a port"),
        ("clamd", "127.0.0.1:99999", "port '99999'"),
        ("clamd", "relative/clamd.ctl", "is not an address"),
        ("scantimeout", "soon", "scantimeout"),
        ("scantimeout", "0", "scantimeout"),
        ("scantempfail", "2", "scantempfail"),
        ("scanclients", "everyone", "'everyone' is not a client class"),
        ("rspamdactions", "discard=refuse", "'discard=refuse': not <rspamd action>=<reply>"),
        ("rspamdactions", "reject", "not <rspamd action>=<reply>"),
        ("rspamdactions", "reject=drop", "'drop' is not a reply"),
    ],
)
def test_bad_files_are_named(tmp_path: Path, name: str, text: str, message: str) -> None:
    with pytest.raises(ControlError) as err:
        load(control(tmp_path, **{name: text + "\n"}))
    assert str(tmp_path / name) in str(err.value)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("origin", "env", "clients", "scanned"),
    [
        (None, {}, {"inbound"}, True),
        ("auth", {}, {"inbound"}, False),
        ("relay", {}, {"inbound", "relay"}, True),
        (None, {"SCAN": ""}, {"inbound"}, False),
        (None, {"SCAN": "0"}, {"inbound"}, False),
        ("auth", {"SCAN": "1"}, {"inbound"}, True),
        (None, {"SCAN": "maybe"}, {"inbound"}, True),  # logged, ignored
    ],
)
def test_who_is_scanned(
    origin: str | None, env: dict[str, str], clients: set[str], scanned: bool
) -> None:
    settings = ScanSettings(rspamd=parse_address("127.0.0.1:1", "x"), clients=frozenset(clients))
    assert applies(settings, origin, env) is scanned
    assert not applies(ScanSettings(), origin, {"SCAN": "1"})  # no scanner: nothing to do


def test_request_cannot_be_injected_through_the_envelope() -> None:
    env = rspamd.Envelope("127.0.0.1", "evil\r\nUser: admin", "a@b", ("c@d", "e@f"), "u\n", "Q")
    head = rspamd.request(env, 10).decode()
    lines = head.split("\r\n")
    assert "Helo: evil??User: admin" in lines
    assert [ln for ln in lines if ln.startswith("User:")] == ["User: u?"]
    assert [ln for ln in lines if ln.startswith("Rcpt:")] == ["Rcpt: c@d", "Rcpt: e@f"]
    assert head.endswith("\r\n\r\n") and head.count("\r\n\r\n") == 1


def test_hostname_only_when_the_client_has_a_confirmed_name() -> None:
    """A confirmed name goes as ``Hostname``; none goes as no field at all, never as
    ``unknown``, which rspamd 3.4 takes for a host name (and drops hfilter's
    HFILTER_HOSTNAME_UNKNOWN for a client that deserves it)."""
    named = rspamd.Envelope("192.0.2.1", "h", "a@b", ("c@d",), hostname="mx.client.test")
    assert "\r\nHostname: mx.client.test\r\n" in rspamd.request(named, 1).decode()
    nameless = rspamd.Envelope("192.0.2.1", "h", "a@b", ("c@d",))
    assert "Hostname" not in rspamd.request(nameless, 1).decode()


def reply(**fields: object) -> bytes:
    base: dict[str, object] = {"action": "no action", "score": 1.5, "required_score": 15}
    base.update(fields)
    return json.dumps(base).encode()


def test_reply_with_header_edits() -> None:
    milter = {
        "add_headers": {
            "X-Spamd-Result": {"value": "default: False [1.50 / 15.00];\n\tA(1.0)[]", "order": 0},
            "X-Spam-Status": "No, score=1.50",
        },
        "remove_headers": {"X-Spam": 0},
    }
    got = rspamd.parse(reply(milter=milter))
    assert (got.action, got.score, got.required) == ("no action", 1.5, 15.0)
    assert got.add == (
        ("X-Spam-Status", "No, score=1.50"),
        ("X-Spamd-Result", "default: False [1.50 / 15.00];\r\n\tA(1.0)[]"),
    )
    assert got.remove == (("X-Spam", 0),)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"<html>", "not-json"),
        (b"[1]", "not-an-object"),
        (b'{"error": "bad request"}', "rspamd-error"),
        (reply(action="delete"), "no-action"),
        (reply(score="high"), "no-score"),
        (reply(score=True), "no-score"),
        (reply(milter={"add_headers": {"Bad Name": "x"}}), "bad-header-name"),
        (reply(milter={"add_headers": {"X-A": 5}}), "bad-header-value"),
        (reply(milter={"add_headers": {f"X-{i}": "v" for i in range(40)}}), "too-many-headers"),
        (reply(milter={"remove_headers": {"X-Spam": "all"}}), "bad-header-index"),
    ],
)
def test_garbage_replies(body: bytes, why: str) -> None:
    with pytest.raises(ScanError, match=f"^{why}$"):
        rspamd.parse(body)


def test_a_folded_value_can_never_end_the_header_section() -> None:
    assert rspamd.fold("a\r\n\r\nX-Injected: 1\n\nbody") == "a\r\n\tX-Injected: 1\r\n\tbody"
    assert rspamd.fold("a\x00b\x1bc") == "abc"


def test_edit_removes_as_milter_says_and_adds_on_top() -> None:
    msg = (
        b"Received: x\r\nX-Spam: one\r\nX-Spam: two\r\n folded\r\nX-Spam: three\r\n"
        b"\r\nX-Spam: body\r\n"
    )
    out = stage.edit(msg, (("X-Spam", "Yes"),), (("x-spam", 2),))
    assert (
        out == b"X-Spam: Yes\r\nReceived: x\r\nX-Spam: one\r\nX-Spam: three\r\n\r\nX-Spam: body\r\n"
    )
    assert stage.edit(msg, (), (("X-Spam", -1),)).count(b"three") == 0
    assert stage.edit(msg, (), (("X-Spam", 0),)) == b"Received: x\r\n\r\nX-Spam: body\r\n"
    assert stage.edit(msg, (), (("X-Spam", 9),)) == msg


def test_edit_counts_the_fields_past_a_line_that_is_no_field() -> None:
    """A stray line (no colon) is no field and ends nothing (``pyqmail.headers.raw_fields``):
    the second X-Spam is the one after it, and the stray line stays where it was."""
    msg = b"X-Spam: one\r\nno colon\r\n folded\r\nX-Spam: two\r\n\r\nX-Spam: body\r\n"
    kept = b"X-Spam: one\r\nno colon\r\n folded\r\n\r\nX-Spam: body\r\n"
    assert stage.edit(msg, (), (("X-Spam", 2),)) == kept
    assert stage.edit(msg, (("X-Spam", "Yes"),), (("X-Spam", 0),)) == (
        b"X-Spam: Yes\r\nno colon\r\n folded\r\n\r\nX-Spam: body\r\n"
    )


def test_edit_of_a_message_without_header_section_keeps_its_body() -> None:
    """It starts with the empty line: the fields go on top, the body stays whole."""
    body_only = b"\r\nX-Spam: quoted in the body\r\n\r\nmore\r\n"
    out = stage.edit(body_only, (("X-Spam", "Yes"),), (("X-Spam", 0),))
    assert out == b"X-Spam: Yes\r\n" + body_only


def test_junk_without_rspamds_fields_gets_pyqmails_own() -> None:
    bare = rspamd.Reply("add header", 7.5, 15.0, (("X-Spamd-Bar", "+++"),), (("X-Other", 0),))
    add, remove = stage.junk_fields(bare)
    assert add == (
        ("X-Spam", "Yes"),
        ("X-Spam-Status", "Yes, score=7.50, required=15.00, action=add_header"),
        ("X-Spamd-Bar", "+++"),
    )
    assert remove == (("X-Other", 0), ("X-Spam", 0), ("X-Spam-Status", 0))
    # rspamd's own X-Spam: its fields as they are, nothing of pyqmail's.
    full = rspamd.Reply("add header", 7.5, 15.0, (("X-Spam", "Yes"),), (("X-Spam", 0),))
    assert stage.junk_fields(full) == (full.add, full.remove)


@pytest.mark.parametrize(
    ("answer", "result"),
    [
        (b"stream: OK", None),
        (b"stream: Eicar-Test-Signature FOUND", "Eicar-Test-Signature"),
    ],
)
def test_clamd_replies(answer: bytes, result: str | None) -> None:
    assert clamd.verdict(answer) == result


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (b"INSTREAM size limit exceeded. ERROR", "error:INSTREAM-size-limit-exceeded."),
        (b"stream: a b FOUND", "garbage"),
        (b"PONG", "garbage"),
        (b"", "eof"),
    ],
)
def test_clamd_garbage(answer: bytes, why: str) -> None:
    with pytest.raises(ScanError, match=f"^{why}$"):
        clamd.verdict(answer)


@pytest.fixture
def scanners(rspamd_server: Rspamd, clamd_server: Clamd) -> tuple[Rspamd, Clamd]:
    return rspamd_server, clamd_server


def run(settings: ScanSettings, message: bytes) -> stage.Outcome:
    return asyncio.run(stage.run(settings, ENV, message))


def test_a_refusal_wins_over_the_other_scanners_failure(scanners: tuple[Rspamd, Clamd]) -> None:
    r, c = scanners
    rspamd_down = ScanSettings(
        rspamd=parse_address("127.0.0.1:1", "x"), clamd=parse_address(str(c.socket), "x")
    )
    virus = run(rspamd_down, with_attachment(EICAR))
    assert (virus.verdict.code, virus.verdict.text) == (
        554,
        "5.7.1 virus found: Eicar-Test-Signature.UNOFFICIAL",
    )
    assert "scan_error=rspamd:refused" in virus.verdict.log
    clean = run(rspamd_down, with_attachment(b"text"))
    assert clean.verdict.code == 451
    assert "virus=clean" in clean.verdict.log
    clamd_down = ScanSettings(
        rspamd=parse_address(r.address, "x"), clamd=parse_address("/nonexistent.sock", "x")
    )
    spam = run(clamd_down, MESSAGE.replace(b"hello", GTUBE))
    assert (spam.verdict.code, spam.verdict.text) == (554, "5.7.1 message refused as spam")
    assert "scan_error=clamd:no-socket" in spam.verdict.log
    assert "virus=" not in spam.verdict.log
    assert run(clamd_down, MESSAGE).verdict.code == 451
