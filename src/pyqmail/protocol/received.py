"""The Received header the core puts in front of every message it accepts (RFC 5321 4.4).

Everything in it that the client chose (HELO name, TLS cipher names as the library reported
them, the AUTH login) is reduced to printable ASCII without comment delimiters and bounded,
so no client can fold, extend or end the header, or make it ambiguous. The ``with`` keyword
follows RFC 3848 / RFC 6531 (``ESMTPSA``, ``UTF8SMTPS``...). The date is formatted once per
second: this runs for every message. It is formatted here rather than by
``email.utils.format_datetime`` (the same text): ``email.utils`` and what it imports are
0.4 MiB in every pyqmail-smtpd process for one line.
"""

from __future__ import annotations

import time

from pyqmail.protocol.client import Client
from pyqmail.protocol.events import Policy, TLSInfo
from pyqmail.protocol.helo import MAX_HELO
from pyqmail.protocol.sasl import MAX_USERNAME

_date_cache: tuple[int, str] = (-1, "")
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")  # RFC 5322 3.3: English names
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def protocol_name(client: Client, *, utf8: bool) -> str:
    """The RFC 3848 / 6531 ``with`` keyword of a session (``utf8``: the transaction's)."""
    if not client.esmtp:
        return "SMTP"
    name = "UTF8SMTP" if utf8 else "ESMTP"
    return name + ("S" if client.tls_active else "") + ("A" if client.auth_user else "")


def received_header(policy: Policy, client: Client, protocol: str) -> bytes:
    """The header, CRLF-terminated. A TLS session whose details the server did not pass
    (``Policy.tls_active`` without ``tls_info``) is noted as ``(using TLS)``."""
    host = _printable(policy.client_host, 255) if policy.client_host else "unknown"
    helo = _printable(client.helo or "", MAX_HELO + 1)  # and its trailing dot
    lines = [f"Received: from {helo} ({host} [{policy.client_ip}])"]
    if client.tls_active:
        tls = client.tls
        lines.append(tls_comment(tls) if tls is not None else "\t(using TLS)")
    if client.auth_user and policy.auth_header:
        lines.append(f"\t(authenticated user: {_printable(client.auth_user, MAX_USERNAME)})")
    lines.append(f"\tby {policy.hostname} (pyqmail) with {protocol};")
    lines.append(f"\t{_rfc5322_date(policy.clock())}")
    return ("\r\n".join(lines) + "\r\n").encode("ascii", "replace")


def tls_comment(tls: TLSInfo) -> str:
    """The continuation line naming the TLS version and cipher."""
    bits = f" ({tls.bits} bits)" if tls.bits else ""
    version, cipher = _printable(tls.version, 50), _printable(tls.cipher, 100)
    return f"\t(using {version} with cipher {cipher}{bits})"


def _printable(text: str, limit: int) -> str:
    """For headers: printable ASCII, no comment delimiters, bounded."""
    clean = "".join(c if " " < c <= "~" and c not in "()\\" else "?" for c in text[:limit])
    return clean or "?"


def _rfc5322_date(when: float) -> str:
    """The RFC 5322 date of the whole second in UTC (``Fri, 04 Dec 2026 18:45:07 +0000``,
    what ``email.utils.format_datetime`` gives), computed once per second (hot path)."""
    global _date_cache  # noqa: PLW0603 - a one-entry cache
    second = int(when)
    if _date_cache[0] != second:
        t = time.gmtime(second)
        text = (
            f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
        )
        _date_cache = (second, text)
    return _date_cache[1]
