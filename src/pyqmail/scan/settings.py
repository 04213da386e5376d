"""The scanners' control files, read with pyqmail-smtpd's others, and who is scanned.

=================  ==========================================================================
``rspamd``         where rspamd's normal worker listens: ``127.0.0.1:11333``,
                   ``[::1]:11333`` or an absolute Unix socket path; absent: no spam scan
``clamd``          where clamd listens, the same forms; absent: no virus scan
``scantimeout``    seconds all scanners of one message may take together; default 20,
                   1 to 300. A scanner still busy then counts as failed
``scantempfail``   1 (default): a scanner that is down, slow or answers garbage gets the
                   client ``451 4.7.1`` (Postfix's ``milter_default_action = tempfail``);
                   0: the message is accepted unscanned (logged)
``scanclients``    whose mail is scanned, one class a line: ``inbound`` (neither a relay
                   client nor an AUTH login), ``relay`` (RELAYCLIENT or a listed client
                   certificate), ``auth`` (an AUTH login); default ``inbound``
``rspamdactions``  ``<rspamd action>=<reply>`` lines overriding what an action gets:
                   ``accept`` (delivered, rspamd's headers added), ``junk`` (the same, into
                   the recipient's Junk folder), ``defer`` (``451 4.7.1``), ``refuse``
                   (``554 5.7.1``). Defaults: reject=refuse, soft reject=defer,
                   rewrite subject=junk, add header=junk, greylist=accept, no action=accept
``rspamdmaxsize``  bytes; a message the client sent larger than this is not sent to rspamd:
                   accepted without its verdict, logged ``not_scanned=rspamd:<size>><limit>``.
                   rspamd must take ``table.SCANNER_HEADROOM`` (1 MiB) more than this (its
                   ``max_message``; the role sets it so): the copy it gets carries our
                   Received field and Authentication-Results too. Default 51380224, rspamd's
                   own ``max_message`` less that (rspamd resets the connection above it, which
                   read as a failed scanner: 451 on every retry until the message bounced)
``clamdmaxsize``   the same for clamd (its ``StreamMaxLength`` and ``MaxFileSize``, which
                   must take the headroom too: a stream over ``MaxFileSize`` is answered
                   ``stream: OK`` unscanned); default 103809024, clamd's default less it.
                   Without the role, set the scanner's own limits by hand that much above
                   these files: with ``clamdmaxsize`` equal to ``StreamMaxLength`` (as the
                   instructions before session 36 had it) a message near the limit gets
                   ``INSTREAM size limit exceeded``: ``451`` on every retry (``scantempfail``
                   1), or accepted unscanned (0)
=================  ==========================================================================

Why a message over a scanner's limit is accepted unscanned rather than refused: the
listener offered the client ``databytes`` (EHLO ``SIZE``), so the message is one it agreed
to take, and a scanner's limit is this host's business, not the sender's; a ``552`` would
bounce legitimate large mail for good, and the scanner could never have judged it anyway
(Amavis, spamc ``-s`` and rspamd's milter proxy pass such mail on unscanned too). Spam is
small, and the role keeps ``databytes`` within both limits (its preflight refuses a larger
one, and 0, no limit, with a scanner on), so on its hosts nothing the client sends is above
them (the limits are compared with the client's bytes, which ``databytes`` bounds); a
hand-made configuration that lets it (``databytes`` 0, say) sees each such message in the log.

Per listener and per client, the tcprules environment decides first (as simscan's per-IP
settings did): ``SCAN=""`` or ``SCAN="0"``: this client's mail is not scanned; ``SCAN="1"``:
it is, whatever its class; absent: ``scanclients`` decides. Each listener has its own rules
cdb (``--rules``), so a catch-all ``:allow,SCAN="1"`` line sets a listener's default. A
malformed value is logged and ignored.

A bad file raises ``ControlError`` naming the file and line, before anything changes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pyqmail.checks import libraries
from pyqmail.control import table
from pyqmail.control.reader import ControlError, Line, read_line, read_lines
from pyqmail.log import log

ACTIONS = ("no action", "greylist", "add header", "rewrite subject", "soft reject", "reject")
REPLIES = ("accept", "junk", "defer", "refuse")
DEFAULT_ACTIONS: Mapping[str, str] = {
    "no action": "accept",
    "greylist": "accept",  # pyqmail's own greylisting works at RCPT (pyqmail.checks.greylist)
    "add header": "junk",
    "rewrite subject": "junk",  # the subject is left alone: the Junk folder says enough
    "soft reject": "defer",
    "reject": "refuse",
}
CLASSES = ("inbound", "relay", "auth")


@dataclass(frozen=True)
class Address:
    """Where a scanner listens: a Unix socket ``path``, or ``host`` and ``port``."""

    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.path:
            return self.path
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, where: str) -> Address:
    """``host:port`` (an IP address; IPv6 in brackets) or an absolute socket path. No host
    names: a DNS lookup per message, or a name that resolves elsewhere, is not wanted."""
    if text.startswith("/"):
        if "\0" in text or len(text.encode()) > 107:
            raise ControlError(f"{where}: {text!r} is not a usable Unix socket path")
        return Address(path=text)
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host) if sep else None
    except ValueError:
        ip = None
    if ip is None:
        raise ControlError(
            f"{where}: {text!r} is not an address (ip:port, [ipv6]:port or /socket/path)"
        )
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ControlError(f"{where}: port {port!r} of {text!r} is not a port (1-65535)")
    return Address(host=str(ip), port=int(port))


@dataclass(frozen=True)
class ScanSettings:
    """The scanners' configuration (``enabled``: at least one scanner is named)."""

    rspamd: Address | None = None
    clamd: Address | None = None
    timeout: int = 20
    tempfail: bool = True
    clients: frozenset[str] = frozenset({"inbound"})
    actions: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_ACTIONS))
    rspamd_max: int = table.RSPAMDMAXSIZE.value  # bytes rspamd is sent at most
    clamd_max: int = table.CLAMDMAXSIZE.value  # ... and clamd

    @property
    def enabled(self) -> bool:
        return self.rspamd is not None or self.clamd is not None


def _address(control: Path, name: str) -> Address | None:
    line = read_line(control / name)
    if line is None or not line.text:
        return None
    return parse_address(line.text, line.where)


def _clients(lines: list[Line] | None) -> frozenset[str]:
    if lines is None:
        return frozenset({"inbound"})
    for line in lines:
        if line.text not in CLASSES:
            raise ControlError(
                f"{line.where}: {line.text!r} is not a client class (one of {', '.join(CLASSES)})"
            )
    return frozenset(line.text for line in lines)


def _actions(lines: list[Line] | None) -> dict[str, str]:
    """The defaults with the file's ``action=reply`` lines on top (``add_header`` as
    rspamd's configuration spells it is taken too)."""
    out = dict(DEFAULT_ACTIONS)
    for line in lines or []:
        action, sep, reply = (part.strip() for part in line.text.partition("="))
        action = action.replace("_", " ")
        if not sep or action not in ACTIONS:
            raise ControlError(
                f"{line.where}: {line.text!r}: not <rspamd action>=<reply>; the actions are "
                f"{', '.join(ACTIONS)}"
            )
        if reply not in REPLIES:
            raise ControlError(
                f"{line.where}: {reply!r} is not a reply (one of {', '.join(REPLIES)})"
            )
        out[action] = reply
    return out


def load(control: Path) -> ScanSettings:
    """Read and check every file (``ControlError`` naming the file, before anything runs).
    rspamd is told the client's host name, which takes dnspython (the ``hosts`` group of
    ``pyqmail.checks.libraries``): required here, so a HUP that names rspamd loads it."""
    rspamd = _address(control, table.RSPAMD.name)
    if rspamd is not None:
        libraries.require("hosts", control / table.RSPAMD.name)
    return ScanSettings(
        rspamd=rspamd,
        clamd=_address(control, table.CLAMD.name),
        timeout=table.SCANTIMEOUT.read(control),
        tempfail=table.SCANTEMPFAIL.read(control) == 1,
        clients=_clients(read_lines(control / table.SCANCLIENTS.name)),
        actions=_actions(read_lines(control / table.RSPAMDACTIONS.name)),
        rspamd_max=table.RSPAMDMAXSIZE.read(control),
        clamd_max=table.CLAMDMAXSIZE.read(control),
    )


def applies(settings: ScanSettings, origin: str | None, env: Mapping[str, str]) -> bool:
    """Is a message of this client scanned? ``origin``: ``auth``, ``relay`` or None
    (inbound, ``smtpd.intake.message_origin``); ``env``: the client's tcprules environment."""
    if not settings.enabled:
        return False
    value = env.get("SCAN")
    if value is not None:
        text = value.strip()
        if text in ("", "0"):
            return False
        if text == "1":
            return True
        log("warning", text=f"rule sets SCAN={value!r}, not '', 0 or 1; ignored")
    return (origin or "inbound") in settings.clients
