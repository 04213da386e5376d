"""What every part of pyqmail-send shares: delivery outcomes, addresses.

The control files pyqmail-send reads (``Control``, ``Route``) live in
``pyqmail.control.send``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

Kind = Literal["ok", "temp", "perm"]
DOUBLE_BOUNCE_SENDER = "#@[]"


@dataclass(frozen=True)
class Result:
    """The outcome of one delivery attempt to one recipient."""

    kind: Kind
    detail: str
    status: str = ""  # RFC 3463 enhanced status, e.g. 5.1.1
    remote: str = "local"  # host that answered, for the log and the DSN Remote-MTA
    diagnostic: str = ""  # DSN Diagnostic-Code, e.g. "smtp; 550 5.1.1 unknown user"
    tls: str = "-"
    verified: str = "-"

    @classmethod
    def ok(cls, detail: str, **kw: str) -> Result:
        return cls("ok", detail, kw.pop("status", "2.0.0"), **kw)

    @classmethod
    def temp(cls, detail: str, status: str = "4.0.0", **kw: str) -> Result:
        return cls("temp", detail, status, **kw)

    @classmethod
    def perm(cls, detail: str, status: str = "5.0.0", **kw: str) -> Result:
        return cls("perm", detail, status, **kw)


def one_line(text: str, limit: int = 400) -> str:
    """Make remote-controlled text safe for a log line or a header: no control characters.

    Called several times per delivery (the manager's log lines and state records); text
    that is already printable, nearly all of it, skips the per-character pass."""
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else " " for ch in text)
    return " ".join(text.split())[:limit]


def named(exc: BaseException) -> str:
    """An exception as a log line or a deferral names it: its class, then its message (a
    ``MemoryError`` has none)."""
    text = one_line(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def split_address(address: str) -> tuple[str, str]:
    """``local@domain`` -> (local, lowercased domain); no ``@`` -> (address, "")."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain.lower()


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
