"""rspamd's HTTP scan protocol: ``POST /checkv2`` to its normal worker, one connection a
message.

Why a bare socket and no HTTP library: the exchange is one request with the whole message
as its body and ``Connection: close``, sent in one piece (one wake-up of rspamd, not one for
the head and one for the body), and one reply with a ``Content-Length`` and a JSON body;
that is a few lines, and it keeps every read bounded (the head at most ``MAX_HEAD`` bytes,
the body ``MAX_BODY``), which a scanner answering garbage must not get around.

Why one connection a message and no pool of kept-alive ones: rspamd's normal worker (3.4,
Debian 12's) answers every request with ``Connection: close`` and closes, whatever the
request asks for, so a kept connection would never carry a second scan.

The envelope goes along as rspamd's request headers (its protocol page): ``Ip``, ``Helo``,
``From`` (the envelope sender; left out for the null sender), ``Rcpt`` once per recipient,
``User`` (the AUTH login), ``Queue-Id`` and ``Hostname``, so its rules see what an MTA in
milter mode would tell it. A value is cleaned of control characters first (no header
injection through a HELO name).

``Hostname`` is the client's forward-confirmed host name (``pyqmail.smtpd.remotehost``, looked
up while the session runs: ``smtpd/intake.py``). Without it rspamd's hfilter module adds
``HFILTER_HOSTNAME_UNKNOWN`` (+2.5 in rspamd 3.4) to every message, whoever sent it. A
client with no confirmed name (no PTR, a PTR whose name does not point back, a failed
lookup) gets no ``Hostname`` at all, which is what rspamd reads as unknown: its own milter
proxy drops Postfix's ``unknown`` rather than pass it on ("skip unknown hostname from being
added", rspamd_milter.c), and rspamd 3.4 takes a ``Hostname: unknown`` sent over HTTP for a
host name, so that client would lose the symbol its missing name deserves.

From the reply we take ``action`` (one of ``settings.ACTIONS``), ``score`` and
``required_score``, and rspamd's header edits (``milter.add_headers``, ``milter.remove_headers``,
what its ``milter_headers`` module asks for: ``X-Spam``, ``X-Spamd-Result``, ...); those are
checked here (a header name of field characters, a value without empty lines, at most
``MAX_FIELDS`` fields and ``MAX_ADDED`` bytes) before ``stage`` puts them in the message.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from dataclasses import dataclass

from pyqmail.scan import wire
from pyqmail.scan.settings import ACTIONS, Address
from pyqmail.scan.wire import ScanError

MAX_HEAD = 16 * 1024  # the reply's status line and header fields
MAX_BODY = 1024 * 1024  # its JSON (every symbol with its options fits many times over)
MAX_FIELDS = 32  # header fields rspamd may add to one message
MAX_ADDED = 32 * 1024  # their bytes together

_FIELD_NAME = re.compile(r"[!-9;-~]{1,76}")  # RFC 5322 ftext, a sane length
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True)
class Envelope:
    """What rspamd is told about the message besides its bytes."""

    ip: str
    helo: str
    sender: str
    recipients: tuple[str, ...]
    user: str | None = None
    queue_id: str = ""
    hostname: str | None = None  # forward-confirmed; None: unknown (no Hostname sent)


@dataclass(frozen=True)
class Reply:
    """rspamd's verdict and the header edits it asks for."""

    action: str
    score: float
    required: float
    add: tuple[tuple[str, str], ...] = ()  # (name, value) in the order they go on top
    remove: tuple[tuple[str, int], ...] = ()  # (name, index): milter's, 0 = every one


def _value(text: str) -> str:
    """A request header value: no CR, LF or other control character."""
    return _CONTROL.sub("?", text.replace("\t", " "))


def request(env: Envelope, size: int) -> bytes:
    """The request head for a message of ``size`` bytes."""
    lines = [
        "POST /checkv2 HTTP/1.1",
        "Host: localhost",
        "Connection: close",
        f"Content-Length: {size}",
        f"Ip: {_value(env.ip)}",
        f"Helo: {_value(env.helo)}",
    ]
    if env.sender:
        lines.append(f"From: {_value(env.sender)}")
    lines += [f"Rcpt: {_value(r)}" for r in env.recipients]
    if env.user:
        lines.append(f"User: {_value(env.user)}")
    if env.queue_id:
        lines.append(f"Queue-Id: {_value(env.queue_id)}")
    if env.hostname:
        lines.append(f"Hostname: {_value(env.hostname)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "replace")


async def check(address: Address, env: Envelope, message: bytes) -> Reply:
    """Ask rspamd about ``message``; ``ScanError`` when it cannot be asked or answers
    garbage (the caller bounds the time)."""
    sock = await wire.open_socket(address)
    try:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, request(env, len(message)) + message)
        head, rest = await _read_head(sock)
        length = _content_length(head)
        body = await _read_body(sock, rest, length)
    except OSError as exc:
        raise ScanError(f"io:{exc.errno}") from None
    finally:
        wire.close_socket(sock)
    return parse(body)


async def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """The reply's head (up to its empty line) and what came after it, at most
    ``MAX_HEAD`` bytes of head."""
    data = b""
    while True:
        chunk = await wire.recv(sock, 65536)
        if not chunk:
            raise ScanError("eof")
        data += chunk
        end = data.find(b"\r\n\r\n")
        if end >= 0 and end + 4 <= MAX_HEAD:
            return data[: end + 4], data[end + 4 :]
        if end >= 0 or len(data) > MAX_HEAD:
            raise ScanError("head-too-long")


async def _read_body(sock: socket.socket, rest: bytes, length: int | None) -> bytes:
    """The body after the head: ``length`` bytes, or up to EOF when there is no
    ``Content-Length``; never more than ``MAX_BODY``."""
    if length is not None and length > MAX_BODY:
        raise ScanError("reply-too-long")
    most = MAX_BODY if length is None else length
    chunks, size = [rest], len(rest)
    while size < most or length is None:
        chunk = await wire.recv(sock, 65536)
        if not chunk:
            if length is None:
                break
            raise ScanError("short-body")
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_BODY:
            raise ScanError("reply-too-long")
    return b"".join(chunks)[:most]


def _content_length(head: bytes) -> int | None:
    """The status must be 200; the Content-Length, if any (chunked is not rspamd's way)."""
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or not status[0].startswith("HTTP/1.") or not status[1].isdigit():
        raise ScanError("not-http")
    if status[1] != "200":
        raise ScanError(f"http-{status[1]}")
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip()
        if name == "transfer-encoding" and value.lower() != "identity":
            raise ScanError("chunked")
        if name == "content-length":
            if not value.isdigit() or len(value) > 12:
                raise ScanError("bad-content-length")
            length = int(value)
    return length


def parse(body: bytes) -> Reply:
    """The JSON reply; anything but an object with a known action and numeric scores is
    garbage (``ScanError``)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise ScanError("not-json") from None
    if not isinstance(data, dict):
        raise ScanError("not-an-object")
    action, score, required = data.get("action"), data.get("score"), data.get("required_score")
    if action not in ACTIONS:
        raise ScanError("no-action" if "error" not in data else "rspamd-error")
    if not isinstance(score, int | float) or not isinstance(required, int | float):
        raise ScanError("no-score")
    if isinstance(score, bool) or isinstance(required, bool):
        raise ScanError("no-score")
    milter = data.get("milter")
    milter = milter if isinstance(milter, dict) else {}
    return Reply(
        str(action),
        float(score),
        float(required),
        _added(milter.get("add_headers")),
        _removed(milter.get("remove_headers")),
    )


def _added(spec: object) -> tuple[tuple[str, str], ...]:
    """``{name: value | {"value": v, "order": n} | [those]}`` as checked (name, value)
    pairs, in rspamd's order (then by name)."""
    if not isinstance(spec, dict):
        return ()
    found: list[tuple[int, str, str]] = []
    for name, entry in spec.items():
        if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
            raise ScanError("bad-header-name")
        for item in entry if isinstance(entry, list) else [entry]:
            value, order = (
                (item.get("value"), item.get("order", 0)) if isinstance(item, dict) else (item, 0)
            )
            if not isinstance(value, str) or not isinstance(order, int):
                raise ScanError("bad-header-value")
            found.append((order, name, fold(value)))
    found.sort(key=lambda x: (x[0], x[1]))
    if len(found) > MAX_FIELDS or sum(len(n) + len(v) for _, n, v in found) > MAX_ADDED:
        raise ScanError("too-many-headers")
    return tuple((name, value) for _, name, value in found)


def fold(value: str) -> str:
    """A header value rspamd folded with LF or CRLF: CRLF line ends, every continuation
    line starting with white space, no empty line (it would end the header section), no
    other control character."""
    lines = [_CONTROL.sub("", line) for line in re.split(r"\r?\n", value)]
    kept = [lines[0].strip()] + [ln for ln in lines[1:] if ln.strip()]
    return "\r\n".join(
        ln if i == 0 or ln[:1] in (" ", "\t") else "\t" + ln for i, ln in enumerate(kept)
    )


def _removed(spec: object) -> tuple[tuple[str, int], ...]:
    """``{name: index}``: which incoming fields rspamd wants gone (a forged ``X-Spam``)."""
    if not isinstance(spec, dict):
        return ()
    out = []
    for name, index in spec.items():
        if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
            raise ScanError("bad-header-name")
        if not isinstance(index, int) or isinstance(index, bool):
            raise ScanError("bad-header-index")
        out.append((name, index))
    return tuple(out[:MAX_FIELDS])
