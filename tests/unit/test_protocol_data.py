"""DATA framing: end marker, smuggling variants, bare CR/LF, dot-unstuffing, size, Message-ID."""

from __future__ import annotations

import pytest
from test_protocol_support import HOST, TLS, Server, in_data, policy, ready

from pyqmail.protocol import (
    Close,
    MessageAbort,
    MessageData,
    MessageEnd,
    Policy,
    Send,
    State,
)
from tests.core_buffers import held_bytes

QUEUED = "250 2.0.0 Ok: queued as Q1"
BARE_LF = f"550 5.5.2 {HOST} Error: bare <LF> received"
BARE_CR = f"550 5.5.2 {HOST} Error: bare <CR> received"
NUL = "554 5.6.0 Error: message contains a NUL character"
HOPS = "554 5.4.6 Error: too many hops, this message is looping"


def splits(data: bytes) -> list[list[bytes]]:
    """The data in one piece, byte by byte, and split in two at every position."""
    ways = [[data], [data[i : i + 1] for i in range(len(data))]]
    ways += [[data[:i], data[i:]] for i in range(1, len(data))]
    return ways


def feed(pol: Policy, pieces: list[bytes]) -> Server:
    srv = in_data(pol)
    for piece in pieces:
        if srv.closed:
            break
        srv.send(piece)
    return srv


FRAMING = [
    # (name, bare_lf, client bytes after DATA, stored body or None, replies after 354)
    ("simple", False, b"hello\r\n.\r\n", b"hello\r\n", [QUEUED]),
    ("empty message", False, b".\r\n", b"", [QUEUED]),
    ("no final CRLF needed before dot", False, b"a\r\n.\r\n", b"a\r\n", [QUEUED]),
    ("stuffed leading dot", False, b"..leading\r\n.\r\n", b".leading\r\n", [QUEUED]),
    ("stuffed dot line", False, b"a\r\n..\r\n.\r\n", b"a\r\n.\r\n", [QUEUED]),
    ("dot then text", False, b"a\r\n.b\r\n.\r\n", b"a\r\nb\r\n", [QUEUED]),
    ("triple dots", False, b"...\r\n.\r\n", b"..\r\n", [QUEUED]),
    ("NUL refused", False, b"a\x00b\r\n.\r\n", None, [NUL]),
    ("dot NUL is not the end", False, b"a\r\n.\x00\r\n.\r\n", None, [NUL]),
    ("NUL dot is not the end", False, b"a\r\n\x00.\r\n.\r\n", None, [NUL]),
    ("NUL after a tolerated LF", True, b"a\nb\x00\r\n.\r\n", None, [NUL]),
    ("dot space is not the end", False, b"a\r\n. \r\n.\r\n", b"a\r\n \r\n", [QUEUED]),
    ("empty lines", False, b"\r\n\r\nx\r\n\r\n.\r\n", b"\r\n\r\nx\r\n\r\n", [QUEUED]),
    ("8-bit bytes", False, b"\xc3\xa9\xff\r\n.\r\n", b"\xc3\xa9\xff\r\n", [QUEUED]),
    ("LF dot LF strict", False, b"a\n.\nMAIL FROM:<e@example.net>\r\n", None, [BARE_LF]),
    ("CRLF dot LF strict", False, b"a\r\n.\nRCPT TO:<x@y.example>\r\n", None, [BARE_LF]),
    ("LF dot CRLF strict", False, b"a\n.\r\nNOOP\r\n", None, [BARE_LF]),
    ("CR dot CR", False, b"a\r.\rNOOP\r\n", None, [BARE_CR]),
    ("CR dot CRLF", False, b"a\r.\r\nNOOP\r\n", None, [BARE_CR]),
    ("CRLF dot CR", False, b"a\r\n.\rNOOP\r\n", None, [BARE_CR]),
    ("CR CRLF", False, b"a\r\r\n.\r\n", None, [BARE_CR]),
    ("bare LF at start", False, b"\n.\r\n", None, [BARE_LF]),
    ("bare LF tolerated", True, b"a\nb\r\n.\r\n", b"a\r\nb\r\n", [QUEUED]),
    ("LF dot LF never ends", True, b"a\n.\nb\r\n.\r\n", b"a\r\n\r\nb\r\n", [QUEUED]),
    ("LF dot CRLF never ends", True, b"a\n.\r\nNOOP\r\n.\r\n", b"a\r\n\r\nNOOP\r\n", [QUEUED]),
    ("CRLF dot LF never ends", True, b"a\r\n.\nNOOP\r\n.\r\n", b"a\r\n\r\nNOOP\r\n", [QUEUED]),
    ("LF dot dot unstuffed", True, b"a\n..\r\n.\r\n", b"a\r\n.\r\n", [QUEUED]),
    ("bare CR refused even when LF tolerated", True, b"a\rb\r\n.\r\n", None, [BARE_CR]),
    ("bare CR after a tolerated LF", True, b"a\nb\rc\r\n.\r\n", None, [BARE_CR]),
    ("bare CR right after a tolerated LF", True, b"\n\r\r\n.\r\n", None, [BARE_CR]),
    ("pipelined after end", False, b"x\r\n.\r\nNOOP\r\n", b"x\r\n", [QUEUED, "250 2.0.0 Ok"]),
]


@pytest.mark.parametrize(
    ("name", "bare_lf", "data", "body", "replies"), FRAMING, ids=[c[0] for c in FRAMING]
)
def test_framing_any_split(
    name: str, bare_lf: bool, data: bytes, body: bytes | None, replies: list[str]
) -> None:
    pol = policy(bare_lf=bare_lf, reject_unauth_pipelining=False)
    for pieces in splits(data):
        srv = feed(pol, pieces)
        after = srv.lines()[srv.lines().index("354 End data with <CR><LF>.<CR><LF>") + 1 :]
        assert after == replies, pieces
        (msg,) = srv.messages
        if body is None:
            assert msg.aborted is not None and msg.end is None, pieces
            assert srv.closed == (replies != [NUL])  # a NUL is refused, the session goes on
        else:
            assert msg.body == body, pieces
            assert msg.end is not None and msg.aborted is None


SMUGGLE_ENDS = [
    b"\n.\n", b"\n.\r\n", b"\r.\n", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r", b"\n.\r",
    b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\r\n\x00.\x00\r\n", b"\r\n. \r\n",
    b"\r\r\n.\r\r\n", b"\r\n\n.\n\n",
]  # fmt: skip


@pytest.mark.parametrize("bare_lf", [False, True])
@pytest.mark.parametrize("fake_end", SMUGGLE_ENDS)
def test_smuggled_commands_are_never_executed(fake_end: bytes, bare_lf: bool) -> None:
    smuggled = (
        b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nforged\r\n"
    )
    data = b"Subject: hi\r\n\r\nbody" + fake_end + smuggled + b"\r\n.\r\n"
    srv = feed(policy(bare_lf=bare_lf, reject_unauth_pipelining=False), [data])
    after = srv.lines()[srv.lines().index("354 End data with <CR><LF>.<CR><LF>") + 1 :]
    assert len(srv.messages) == 1
    assert after in ([QUEUED], [BARE_LF], [BARE_CR], [NUL])
    if after == [QUEUED]:
        assert b"forged" in srv.messages[0].body  # the "commands" are message content
    elif after == [NUL]:
        assert srv.messages[0].end is None and not srv.closed
    else:
        assert srv.closed


def test_end_marker_split_across_reads_keeps_nothing_extra() -> None:
    srv = in_data()
    conn = srv.conn
    events = conn.receive(b"line\r")
    assert events == [MessageData(b"line")]  # a trailing CR may start the end marker: held back
    srv.handle(events)
    assert held_bytes(conn) <= 4 + 64 * 1024
    srv.handle(conn.receive(b"\n."))
    srv.handle(conn.receive(b"\r"))
    srv.handle(conn.receive(b"\n"))
    assert srv.messages[0].body == b"line\r\n"
    assert srv.lines()[-1] == QUEUED


def test_data_path_emits_one_chunk_per_read() -> None:
    conn = in_data().conn
    events = conn.receive(b"a\r\n..b\r\nc\r\n" * 100)
    chunks = [e for e in events if isinstance(e, MessageData)]
    assert len(chunks) == 1
    # the final CRLF may begin the end marker: it is held until the next read
    assert chunks[0].chunk == (b"a\r\n.b\r\nc\r\n" * 100)[:-2]
    assert held_bytes(conn) <= 64 * 1024 + 2


# ----- size limit ----------------------------------------------------------------------------


def test_databytes_exact_limit_accepted() -> None:
    srv = feed(policy(databytes=10), [b"01234567\r\n.\r\n"])
    assert srv.lines()[-1] == QUEUED


def test_databytes_exceeded_reads_to_end_then_552() -> None:
    srv = in_data(policy(databytes=1000))
    conn = srv.conn
    srv.send(b"x" * 900 + b"\r\n")
    before = len(srv.events)
    for _ in range(1000):  # 1 MB more: nothing buffered, nothing forwarded
        srv.send(b"y" * 998 + b"\r\n")
        assert held_bytes(conn) < 64 * 1024 + 8
    new = srv.events[before:]
    assert [type(e) for e in new] == [MessageAbort]
    assert srv.send(b".\r\n") == ["552 5.3.4 Error: message exceeds fixed size limit"]
    assert srv.messages[0].aborted == "message exceeds databytes"
    assert srv.messages[0].end is None
    assert conn.state is State.READY
    assert srv.cmd("MAIL FROM:<a@example.net>") == "250 2.1.0 Ok"  # session goes on


def test_long_message_lines_are_accepted() -> None:
    line = b"z" * 100_000 + b"\r\n"
    srv = feed(policy(), [line, b".\r\n"])
    assert srv.messages[0].body == line
    assert srv.lines()[-1] == QUEUED


def test_message_size_reported() -> None:
    srv = feed(policy(), [b"abc\r\n.\r\n"])
    msg = srv.messages[0]
    assert msg.end is not None and msg.end.size == len(msg.data)


# ----- Received header, Message-ID ----------------------------------------------------------


def test_received_header_plain() -> None:
    srv = feed(policy(), [b"x\r\n.\r\n"])
    header = bytes(srv.messages[0].data[: -len(b"x\r\n")])
    assert header == (
        b"Received: from client.example.net (client.example.net [192.0.2.7])\r\n"
        b"\tby mx.example.test (pyqmail) with ESMTP;\r\n"
        b"\tTue, 14 Nov 2023 22:13:20 +0000\r\n"
    )


def test_received_header_tls_auth_and_odd_helo() -> None:
    pol = policy(
        tls_active=True,
        tls_info=TLS,
        auth_mechanisms=("PLAIN",),
        client_host=None,
        auth_header=True,
    )
    srv = Server(pol)
    assert srv.cmd("EHLO (evil)\\helo") == "501 5.5.4 Error: invalid EHLO hostname"
    srv.cmd("EHLO _odd-.host_")
    assert srv.cmd("AUTH PLAIN AGJvYgBodW50ZXIy").startswith("235")
    srv.cmd("MAIL FROM:<a@example.net>")
    srv.cmd("RCPT TO:<x@elsewhere.test>")
    srv.cmd("DATA")
    srv.send(b"x\r\n.\r\n")
    header = bytes(srv.messages[0].data[: -len(b"x\r\n")])
    assert header == (
        b"Received: from _odd-.host_ (unknown [192.0.2.7])\r\n"
        b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256 bits))\r\n"
        b"\t(authenticated user: bob)\r\n"
        b"\tby mx.example.test (pyqmail) with ESMTPSA;\r\n"
        b"\tTue, 14 Nov 2023 22:13:20 +0000\r\n"
    )


@pytest.mark.parametrize(
    "when",
    [0, 951782400, 951868799.9, 1078012800, 1703980800 - 1, 1704067199, 4107542400, 1795000000],
)
def test_received_date_is_the_standard_librarys(when: float) -> None:
    """The header's date, formatted without ``email.utils``, is exactly its text: every day
    and month name, the end of a leap year's February, a year's last second, 2100."""
    from datetime import UTC, datetime
    from email.utils import format_datetime

    from pyqmail.protocol.received import _rfc5322_date

    expected = format_datetime(datetime.fromtimestamp(int(when), UTC))
    assert _rfc5322_date(when) == expected
    for day in range(7 * 12):  # each weekday with each month, at one time of day
        second = int(when) + day * 32 * 86400 + 3723
        assert _rfc5322_date(second) == format_datetime(datetime.fromtimestamp(second, UTC))


def test_helo_protocol_is_smtp() -> None:
    srv = ready(helo="HELO client")
    srv.cmd("MAIL FROM:<>")
    srv.cmd("RCPT TO:<u@example.test>")
    srv.cmd("DATA")
    assert srv.messages[0].start.protocol == "SMTP"
    assert b"with SMTP;" in srv.messages[0].data


MESSAGE_IDS = [
    (b"Message-ID: <a@b>\r\nSubject: x\r\n\r\nbody\r\n", "<a@b>"),
    (b"Subject: x\r\nmessage-id:<lower@case>\r\n\r\n", "<lower@case>"),
    (b"MESSAGE-ID:   <spaces@x>   \r\n\r\n", "<spaces@x>"),
    (b"Message-ID:\r\n <folded@x>\r\n\r\n", "<folded@x>"),
    (b"Message-ID: <a@b>", "<a@b>"),  # no header end at all
    (b"Subject: x\r\n\r\nMessage-ID: <in@body>\r\n", None),
    (b"\r\nMessage-ID: <no@headers>\r\n", None),
    (b"X-Message-ID: <x@x>\r\nResent-Message-ID: <r@x>\r\n\r\n", None),
    (b"Message-ID: <ctl\x01\x7f\xff@x>\r\n\r\n", "<ctl???@x>"),
    (b"Message-ID: <" + b"x" * 2000 + b">\r\n\r\n", "<" + "x" * 997),
    (b"Message-ID: \r\n\r\n", None),
    (b"X-Pad: " + b"p" * 70_000 + b"\r\nMessage-ID: <late@x>\r\n\r\n", None),
    (b"X-Fold: a\r\n" + b" b\r\n" * 20_000 + b"Message-ID: <deep@x>\r\n\r\n", None),
]


@pytest.mark.parametrize(("content", "message_id"), MESSAGE_IDS)
def test_message_id_extraction(content: bytes, message_id: str | None) -> None:
    srv = in_data()
    for i in range(0, len(content), 8192):
        srv.send(content[i : i + 8192])
        assert held_bytes(srv.conn) <= 64 * 1024 + 8
    srv.send(b"\r\n.\r\n")
    end = srv.messages[0].end
    assert end is not None
    assert end.message_id == message_id


def test_close_after_bare_lf_stops_everything() -> None:
    srv = in_data()
    events = srv.conn.receive(b"ok\r\nbad\nNOOP\r\n")
    assert events == [MessageAbort("bare LF in message"), Send(BARE_LF.encode() + b"\r\n"), Close()]
    assert srv.conn.closed
    assert srv.conn.receive(b"NOOP\r\n") == []
    assert not any(isinstance(e, MessageEnd) for e in events)
