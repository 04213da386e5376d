"""DKIM-Signature header fields (RFC 6376; Ed25519: RFC 8463), relaxed/relaxed.

Own canonicalization, the private-key operation through ``cryptography`` (Debian's
python3-cryptography, which the daemon's hosts have anyway). dkimpy (python3-dkim) was
measured against it (``bench/dkim_sign.py``): its RSA is pure Python and an order of
magnitude slower, and it takes Ed25519 keys only as raw base64 seeds (the key files are
PKCS#8 PEM) and its time from the clock (``t=`` here is the time the message was queued, so
a signature made again from the same key is the same bytes). dkimpy and OpenDKIM verify
what this module makes in the tests (``tests/unit/test_dkim_sign.py``).

What is signed (``signed_names``): the header fields of RFC 6376 5.4.1, plus Message-ID,
Sender, MIME-Version and the Content-* fields that say how the body is read; each as often
as it occurs (the bottom-most instances first, as 5.4.2 says). The fields a message has at
most once (RFC 5322 3.6: From, Sender, Reply-To, To, Cc, Subject, Date, Message-ID,
In-Reply-To, References; RFC 2045: MIME-Version, Content-Type, Content-Transfer-Encoding)
are "over-signed" (``OVERSIGNED``): listed once more than they occur, so a verifier finds
one instance more than the message had and a second instance prepended, which a reader
would show, breaks the signature (RFC 6376 5.4.2, 8.15); the ones a sender shows a reader
(From, Reply-To, Subject, To, Cc: ``OVERSIGNED_ABSENT``) also when absent, so adding one
breaks it too. As rspamd's default ``sign_headers`` ("(o)" and "(x)"): a relay or list may
add a missing Date or Message-ID legitimately. Not trace or list fields (Received,
Resent-*, List-*): a relay or list adds those legitimately. No ``l=``: the whole body is
signed. ``t=`` is the time the message entered the queue; no ``x=``.

What is read: ``split_message`` is linear in the header (``pyqmail.headers.raw_fields``),
and a header section over ``HEADER_SIZE_LIMIT`` (``pyqmail.headers``, the 100 KiB the
sender rules read) is never signed (``header_too_long``; ``pyqmail.dkim.policy`` logs why):
pyqmail-send signs on its one main loop, so the cost of a message must stay bounded.

What is signed is the message as it leaves (``pyqmail.wirelines.wire_lines``: lines over
998 octets broken with CRLF SPACE), not as it was queued: remote delivery breaks them, and
a signature over the unbroken lines would fail at every receiver. Every copy of a signed
message is sent in that form (``pyqmail.send.scheduler``). The signature's own lines stay
short too (``h=`` folded at its colons), so breaking them never changes what it covers.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Sequence
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from pyqmail.dkim.keys import Key
from pyqmail.headers import HEADER_SIZE_LIMIT, head_and_rest, raw_fields
from pyqmail.wirelines import wire_lines

SIGNED: Final = (
    "from", "reply-to", "subject", "date", "to", "cc", "resent-date", "resent-from",
    "resent-sender", "resent-to", "resent-cc", "in-reply-to", "references", "list-id",
    "list-help", "list-unsubscribe", "list-subscribe", "list-post", "list-owner",
    "list-archive", "message-id", "sender", "mime-version", "content-type",
    "content-transfer-encoding", "content-id", "content-description",
)  # fmt: skip
OVERSIGNED: Final = frozenset({
    "from", "sender", "reply-to", "to", "cc", "subject", "date", "message-id", "in-reply-to",
    "references", "mime-version", "content-type", "content-transfer-encoding",
})  # fmt: skip
# Of those, the ones also signed when absent (rspamd's "(o)"; the others are its "(x)", only
# when present): a relay or a list may add a missing Date, Message-ID, MIME-Version or
# Content-* (pyqmail-smtpd adds none to a submission), which would break the signature.
OVERSIGNED_ABSENT: Final = frozenset({"from", "reply-to", "subject", "to", "cc"})
_WSP_RUN = re.compile(rb"[ \t]+")
_FOLD = re.compile(rb"\r\n(?=[ \t])")
B64_LINE: Final = 72

# (name as written, b"" for a line that is no field; the whole field up to and including CRLF)
Field = tuple[bytes, bytes]


def header_too_long(message: bytes, limit: int = HEADER_SIZE_LIMIT) -> bool:
    """Whether the header section of a CRLF message (without the empty line after it) is
    longer than ``limit`` bytes, as ``pyqmail.headers.header_section`` measures it; looks at
    ``limit + 4`` bytes at most."""
    if message.startswith(b"\r\n"):
        return False
    return message.find(b"\r\n\r\n", 0, limit + 4) < 0 and len(message) > limit


def split_message(message: bytes) -> tuple[list[Field], bytes]:
    """The header fields (in order) and the body of a CRLF message, split where every other
    part of pyqmail splits them (``pyqmail.headers.head_and_rest`` and ``raw_fields``, one
    linear pass). A line that is neither a field nor a continuation is a piece of its own
    named ``b""``: never signed, and never part of the field before it, which dkimpy and
    rspamd would then read without it (``raw_fields`` says why)."""
    head, rest = head_and_rest(message)
    if head and not head.endswith(b"\r\n"):
        head += b"\r\n"
    return raw_fields(head), rest[2:]


def relaxed_header(field: bytes) -> bytes:
    """RFC 6376 3.4.2: name lower-cased, unfolded, WSP runs to one SP, none around the colon
    nor at the end; ends in CRLF."""
    name, _, value = field.partition(b":")
    value = _FOLD.sub(b"", value.removesuffix(b"\r\n"))
    value = _WSP_RUN.sub(b" ", value).strip(b" ")
    return name.strip(b" \t").lower() + b":" + value + b"\r\n"


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4: WSP runs to one SP, none at a line's end, no empty lines at the end;
    a non-empty body ends in CRLF, an empty one is empty.

    ``bytes.replace`` rather than regular expressions: a regex substitution per blank made
    this the most expensive part of a signature (1.8 ms for 4 KiB, more than the RSA
    operation; ``bench/dkim_sign.py``); these passes run in C, each halves every run."""
    if not body:
        return b""
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    if b"\t" in body:
        body = body.replace(b"\t", b" ")
    while b"  " in body:
        body = body.replace(b"  ", b" ")
    body = body.replace(b" \r\n", b"\r\n")
    body = body[: len(body) - len(_trailing_crlfs(body)) + 2]  # one CRLF of the run stays
    return b"" if body == b"\r\n" else body


def _trailing_crlfs(body: bytes) -> bytes:
    """The run of CRLFs ``body`` ends with (it ends with one at least), found in C: the tail
    of CR and LF octets, from after its last doubled octet (``CRCR`` or ``LFLF``: a bare CR
    or LF is a line's content, not an empty line), starting at a CR. A loop per CRLF took
    seconds for megabytes of empty lines."""
    tail = body[len(body.rstrip(b"\r\n")) :]
    start = max(tail.rfind(b"\r\r"), tail.rfind(b"\n\n")) + 1
    run = tail[start:]
    return run[1:] if run.startswith(b"\n") else run


def body_hash(body: bytes) -> str:
    """``bh=``: base64 of SHA-256 of the relaxed body."""
    return base64.b64encode(hashlib.sha256(relaxed_body(body)).digest()).decode()


def signed_names(fields: Sequence[Field]) -> list[str]:
    """``h=``: every field of ``SIGNED`` present, as many times as it occurs; each of
    ``OVERSIGNED`` present once more, and each of ``OVERSIGNED_ABSENT`` listed once when
    absent."""
    counts: dict[str, int] = {}
    for raw, _ in fields:
        low = raw.strip(b" \t").decode("ascii", "replace").lower()
        counts[low] = counts.get(low, 0) + 1
    names: list[str] = []
    for name in SIGNED:
        count = counts.get(name, 0)
        extra = name in OVERSIGNED_ABSENT or (count > 0 and name in OVERSIGNED)
        names += [name] * (count + extra)
    return names


def header_input(fields: Sequence[Field], names: Iterable[str]) -> bytes:
    """The signed fields canonicalized, each name taking its next instance from the bottom
    (RFC 6376 5.4.2); a name with no instance left adds nothing."""
    by_name: dict[str, list[bytes]] = {}
    for raw, text in fields:
        by_name.setdefault(raw.strip(b" \t").decode("ascii", "replace").lower(), []).append(text)
    out = []
    for name in names:
        instances = by_name.get(name)
        if instances:
            out.append(relaxed_header(instances.pop()))
    return b"".join(out)


def _fold_names(names: Sequence[str]) -> str:
    """``h=``'s value folded after a colon when a line would pass ``B64_LINE`` characters
    (RFC 6376 allows FWS there): a message with many signed fields would otherwise give a
    line over 998 octets, which delivery breaks inside a name."""
    lines = [""]
    for index, name in enumerate(names):
        piece = name + (":" if index < len(names) - 1 else "")
        if lines[-1] and len(lines[-1]) + len(piece) > B64_LINE:
            lines.append("")
        lines[-1] += piece
    return "\r\n\t".join(lines)


def _tags(key: Key, when: int, names: list[str], bh: str) -> bytes:
    """The DKIM-Signature field up to ``b=`` (empty), folded at its tags."""
    h = _fold_names(names)
    return (
        f"DKIM-Signature: v=1; a={key.algorithm}; c=relaxed/relaxed; d={key.domain};\r\n"
        f"\ts={key.selector}; t={when};\r\n"
        f"\th={h};\r\n"
        f"\tbh={bh};\r\n"
        f"\tb="
    ).encode("ascii")


def _private_op(key: Key, data: bytes) -> bytes:
    """rsa-sha256: RSASSA-PKCS1-v1_5 over SHA-256 of ``data``; ed25519-sha256 (RFC 8463):
    PureEdDSA over the SHA-256 digest of ``data``."""
    private = key.private
    if isinstance(private, rsa.RSAPrivateKey):
        return private.sign(data, padding.PKCS1v15(), hashes.SHA256())
    return private.sign(hashlib.sha256(data).digest())


def _fold_b64(value: str) -> bytes:
    """``b=`` folded into lines the way the other tags are (verifiers drop its FWS)."""
    parts = [value[i : i + B64_LINE] for i in range(0, len(value), B64_LINE)]
    return "\r\n\t".join(parts).encode("ascii")


def sign(message: bytes, keys: Sequence[Key], when: int) -> bytes:
    """One ``DKIM-Signature`` field per key (in ``keys`` order), each with its CRLF, to put
    in front of ``wire_lines(message)``, the form every delivery sends (``message`` as
    queued: CRLF line ends, lines of any length)."""
    fields, body = split_message(wire_lines(message))
    names = signed_names(fields)
    signed = header_input(fields, names)
    bh = body_hash(body)
    out = []
    for key in keys:
        head = _tags(key, when, names, bh)
        data = signed + relaxed_header(head).removesuffix(b"\r\n")
        value = base64.b64encode(_private_op(key, data)).decode("ascii")
        out.append(head + _fold_b64(value) + b"\r\n")
    return b"".join(out)
