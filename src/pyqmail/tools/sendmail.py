"""pyqmail-sendmail: the sendmail-compatible injector for local programs (cron, monitoring).

``pyqmail-sendmail [--help] [--root /var/qmail] [-f sender] [-F name] [-t] [-i|-oi] [rcpt ...]``
(message on standard input)

- ``-f ADDR`` / ``-r ADDR``: envelope sender (``-f ''`` or ``-f '<>'`` = null sender); default
  ``$MAILUSER``/``$LOGNAME``/``$USER`` (or the uid's name) at ``control/me``.
- ``-F NAME``: full name for the ``From:`` header added when the message has none.
- ``-t``: recipients also from ``To:``, ``Cc:``, ``Bcc:``; ``Bcc:`` is removed (command-line
  recipients are kept too, as Postfix does). Those fields may hold at most
  ``header_size_limit`` bytes (100 KiB, ``pyqmail.headers``) together; more is refused.
- ``-i`` / ``-oi``: a line with a single ``.`` does not end the message (otherwise it does).
- other ``-oX``, ``-odb``/``-odi``, ``-bm``, ``-v``, ``-em``, ``-m``, ``-n``, ``-G``, ``-U`` and
  ``-B``/``-N``/``-R``/``-V``/``-L``/``-O``/``-h`` with their value (Debian's cron runs
  ``sendmail -FCronDaemon -i -B8BITMIME -oem user``) are accepted and ignored; other modes
  (``-bs``, ``-bp``, ...) and unknown options are refused (exit 64).
- addresses without ``@`` get ``@`` + ``control/me``.

Line ends become CRLF in the queue; ``Received:``, ``Date:``, ``Message-ID:`` and ``From:``
are added when missing. The message is committed with ``Queue.enqueue`` (durable) and
pyqmail-send is woken. The caller needs write access to ``queue/tmp`` and ``queue/new``
(root, or a member of group ``pyqmail``). Root's queue file is handed to the queue's owner
(pyqmail-send), mode 0600, so pyqmail-smtpd cannot read it (``pyqmail.queue.store``).

Exit codes (sysexits): 0 queued, 64 usage, 65 bad message or address, 75 queue unavailable
(try again), 78 configuration.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.utils import formatdate, getaddresses
from pathlib import Path
from typing import BinaryIO

from pyqmail.control.send import Control, ControlError
from pyqmail.headers import HEADER_SIZE_LIMIT
from pyqmail.queue.format import QueueError
from pyqmail.queue.store import Queue

EX_USAGE, EX_DATAERR, EX_TEMPFAIL, EX_CONFIG = 64, 65, 75, 78
_IGNORED = {"-odb", "-odi", "-odq", "-bm", "-v", "-em", "-ep", "-eq", "-U", "-m", "-n", "-G"}
# options taking a value that change nothing here (cron sends -B8BITMIME, DSN options ...)
_IGNORED_WITH_VALUE = ("-B", "-N", "-R", "-V", "-L", "-O", "-h")
_ADDRESS = re.compile(r"^[^\s<>()\[\],;:\\\"@]+(?:@[^\s<>()\[\],;:\\\"@]+)?$|^$")
MAX_MESSAGE = 64 * 1024 * 1024
_FIELD_NAME = re.compile(rb"[!-9;-~]+:")


class InjectError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class ShowUsage(Exception):  # noqa: N818 - a request, not an error
    """``--help``: print the usage (this module's docstring) and exit 0."""


@dataclass
class Options:
    root: Path = Path(os.environ.get("PYQMAIL_ROOT", "/var/qmail"))
    sender: str | None = None
    fullname: str | None = None
    extract: bool = False
    dots: bool = True  # a lone "." ends the message
    recipients: list[str] = field(default_factory=list)


def parse_args(argv: Sequence[str]) -> Options:
    opts = Options()
    args = list(argv)
    i = 0

    def value(flag: str) -> str:
        nonlocal i
        arg = args[i]
        if len(arg) > len(flag):
            return arg[len(flag) :]
        i += 1
        if i >= len(args):
            raise InjectError(f"option {flag} needs a value", EX_USAGE)
        return args[i]

    while i < len(args):
        arg = args[i]
        if arg == "--":
            opts.recipients += args[i + 1 :]
            break
        if arg == "--help":
            raise ShowUsage
        if arg == "--root":
            opts.root = Path(value("--root"))
        elif arg.startswith(("-f", "-r")):
            opts.sender = value(arg[:2])
        elif arg.startswith("-F"):
            opts.fullname = value("-F")
        elif arg == "-t":
            opts.extract = True
        elif arg in ("-i", "-oi"):
            opts.dots = False
        elif arg in _IGNORED or (arg.startswith("-o") and len(arg) > 2):
            pass
        elif arg.startswith(_IGNORED_WITH_VALUE):
            value(arg[:2])
        elif arg.startswith("-b"):
            raise InjectError(f"mode {arg!r} is not supported (only -bm, the default)", EX_USAGE)
        elif arg.startswith("-") and arg != "-":
            raise InjectError(f"unsupported option {arg!r}", EX_USAGE)
        else:
            opts.recipients.append(arg)
        i += 1
    return opts


def check_address(address: str, what: str) -> str:
    if any(ch in address for ch in "\r\n\x00") or not _ADDRESS.match(address):
        raise InjectError(f"invalid {what} address {address!r}", EX_DATAERR)
    return address


def qualify(address: str, me: str) -> str:
    return address if "@" in address or not address else f"{address}@{me}"


def default_sender(me: str) -> str:
    for var in ("MAILUSER", "LOGNAME", "USER"):
        name = os.environ.get(var)
        if name:
            return f"{name}@{me}"
    try:
        return f"{pwd.getpwuid(os.getuid()).pw_name}@{me}"
    except KeyError:
        return f"uid{os.getuid()}@{me}"


def normalize(raw: bytes, dots: bool) -> bytes:
    """CRLF line ends; stop at a lone '.' line unless -i."""
    lines = re.split(rb"\r\n|\r|\n", raw)
    if lines and lines[-1] == b"":
        lines.pop()
    if dots and b"." in lines:
        lines = lines[: lines.index(b".")]
    return b"\r\n".join(lines) + b"\r\n" if lines else b""


def _split_headers(message: bytes) -> tuple[list[bytes], bytes]:
    """Header fields (folded lines kept) and the body, which starts with the empty line."""
    if not _FIELD_NAME.match(message):
        return [], b"\r\n" + message  # no header section: everything is body
    end = message.find(b"\r\n\r\n")
    head, body = (message[:end], message[end + 2 :]) if end >= 0 else (message[:-2], b"\r\n")
    fields: list[list[bytes]] = []  # the lines of each field, joined once at the end
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        elif _FIELD_NAME.match(line):
            fields.append([line])
        else:
            raise InjectError(f"malformed header line {line[:60]!r}", EX_DATAERR)
    return [b"\r\n".join(lines) for lines in fields], body


def _extract(fields: list[bytes]) -> list[str]:
    """The addresses of To, Cc and Bcc (``-t``), bounded by ``HEADER_SIZE_LIMIT``."""
    values = [
        f.split(b":", 1)[1].replace(b"\r\n", b" ").decode("utf-8", "replace")
        for f in fields
        if _name(f) in ("to", "cc", "bcc")
    ]
    if sum(len(v) for v in values) > HEADER_SIZE_LIMIT:
        raise InjectError(
            f"To/Cc/Bcc longer than {HEADER_SIZE_LIMIT} bytes together; give the recipients "
            "as arguments instead of -t",
            EX_DATAERR,
        )
    try:
        return [addr for _, addr in getaddresses(values) if addr]
    except RecursionError:  # the email package recurses into nested comments
        raise InjectError("To/Cc/Bcc: comments nested too deeply", EX_DATAERR) from None


def _name(field_: bytes) -> str:
    return field_.split(b":", 1)[0].decode("ascii", "replace").lower()


def build(
    opts: Options, raw: bytes, me: str, now: float | None = None
) -> tuple[str, list[str], bytes]:
    """(sender, recipients, message) ready for the queue; raises InjectError."""
    now = time.time() if now is None else now
    if not raw.strip():
        raise InjectError("empty message on standard input", EX_DATAERR)
    if b"\x00" in raw:
        raise InjectError("message contains NUL bytes", EX_DATAERR)
    message = normalize(raw, opts.dots)
    fields, body = _split_headers(message)
    sender = default_sender(me) if opts.sender is None else opts.sender
    if sender == "<>":
        sender = ""
    sender = qualify(check_address(sender.strip("<>") if sender else "", "sender"), me)
    recipients = [qualify(check_address(r.strip("<>"), "recipient"), me) for r in opts.recipients]
    if opts.extract:
        recipients += [qualify(check_address(a, "recipient"), me) for a in _extract(fields)]
        fields = [f for f in fields if _name(f) != "bcc"]
    recipients = list(dict.fromkeys(r for r in recipients if r))
    if not recipients:
        raise InjectError("no recipients (give addresses or use -t)", EX_DATAERR)
    names = {_name(f) for f in fields}
    added: list[str] = [
        f"Received: (pyqmail-sendmail invoked by uid {os.getuid()}); {formatdate(now)}"
    ]
    if "date" not in names:
        added.append(f"Date: {formatdate(now, localtime=True)}")
    if "message-id" not in names:
        added.append(f"Message-ID: <{int(now)}.{os.getpid()}.{secrets.token_hex(6)}@{me}>")
    if "from" not in names:
        display = (opts.fullname or "").replace('"', "").replace("\r", "").replace("\n", "")
        author = sender or f"MAILER-DAEMON@{me}"
        added.append(f'From: "{display}" <{author}>' if display else f"From: <{author}>")
    head = b"".join(a.encode("utf-8") + b"\r\n" for a in added)
    head += b"".join(f + b"\r\n" for f in fields)
    return sender, recipients, head + body


def inject(argv: Sequence[str], stdin: BinaryIO) -> str:
    """Queue one message; return its queue id or raise InjectError."""
    opts = parse_args(argv)
    try:
        control = Control.load(opts.root, relay_auth=False)  # the relays' passwords: not ours
    except ControlError as exc:
        raise InjectError(str(exc), EX_CONFIG) from None
    raw = stdin.read(MAX_MESSAGE + 1)
    if len(raw) > MAX_MESSAGE:
        raise InjectError(f"message larger than {MAX_MESSAGE} bytes", EX_DATAERR)
    sender, recipients, message = build(opts, raw, control.me)
    meta = {"injected_by_uid": str(os.getuid()), "origin": "local"}  # signed (pyqmail.dkim)
    try:
        return Queue(opts.root / "queue").enqueue(sender, recipients, message, meta).queue_id
    except QueueError as exc:
        raise InjectError(f"cannot queue the message: {exc}", EX_TEMPFAIL) from None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        inject(sys.argv[1:] if argv is None else argv, sys.stdin.buffer)
    except ShowUsage:
        sys.stdout.write(__doc__ or "")
        return 0
    except InjectError as exc:
        sys.stderr.write(f"pyqmail-sendmail: {exc}\n")
        return exc.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
