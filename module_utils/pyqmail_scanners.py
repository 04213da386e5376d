"""The preflight checks of the pyqmail_scanners role (rows of CHECKS in pyqmail_inventory).

Why its own module: what a scanner address, a score threshold and the per-client ``SCAN``
variable may be is the role's business; ``pyqmail_inventory`` only lists the rows. The
address rule is the daemon's (``pyqmail.scan.settings.parse_address``: an IP address and
port, or an absolute socket path, no host names), plus the role's own: the scanners the role
runs listen on loopback only, so any other address is one the listeners could not reach
(or one that would open the scanner to the network).
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

Problems = Iterator[str]

THRESHOLD_ORDER = ("greylist", "add_header", "rewrite_subject", "reject")
SCAN_VALUES = ("", "0", "1")
SOCKET_PATH_RE = re.compile(r"/[A-Za-z0-9._/+@-]*\Z")  # pyqmail_checkbase.SAFE_PATH_RE


def address_problem(text: str) -> str:
    """What is wrong with a scanner address the role runs the scanner on ("" = fine)."""
    if text.startswith("/"):
        # Written into root's run script (quoted there): the characters of any path it names.
        if len(text.encode()) > 107 or not SOCKET_PATH_RE.match(text):
            return (
                "is not a usable Unix socket path (at most 107 bytes; letters, digits and "
                "'._/+@-' only: no blanks, no shell metacharacters)"
            )
        return ""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(host) if sep else None
    except ValueError:
        ip = None
    if ip is None:
        return "is not an address: give a loopback ip:port, [ipv6]:port or /socket/path"
    if not port.isdigit() or not 0 < int(port) < 65536:
        return f"has no port from 1 to 65535 after the last ':' ({port!r})"
    if not ip.is_loopback:
        return (
            "is not a loopback address: the role runs the scanner on this host, listening on "
            "loopback or a Unix socket only (127.0.0.1:port, [::1]:port or /socket/path)"
        )
    return ""


def nameserver_problem(text: str) -> str:
    """What is wrong with one of rspamd's DNS servers ("" = fine): an IP address and port
    (192.0.2.53:53, [2001:db8::53]:53), any address (a site's resolver may be another host),
    never a name (rspamd would need DNS to find its DNS server)."""
    host, sep, port = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    try:
        ip = ipaddress.ip_address(host) if sep else None
    except ValueError:
        ip = None
    if ip is None or (ip.version == 6) != bracketed:
        return "is not an IP address and port: give ip:port or [ipv6]:port (127.0.0.1:53)"
    if not port.isdigit() or not 0 < int(port) < 65536:
        return f"has no port from 1 to 65535 after the last ':' ({port!r})"
    return ""


def check_dns_servers(name: str, value: Any, values: Mapping[str, Any]) -> Problems:
    """pyqmail_scanners__rspamd_dns_servers: each entry an ip:port rspamd can use."""
    del values
    for index, entry in enumerate(value):
        problem = nameserver_problem(str(entry))
        if problem:
            yield f"{name}[{index}]: {str(entry)!r} {problem}"


def check_scanner_address(name: str, value: Any, values: Mapping[str, Any]) -> Problems:
    """pyqmail_scanners__rspamd_listen and __clamd_listen."""
    del values
    problem = address_problem(str(value))
    if problem:
        yield f"{name}: {str(value)!r} {problem}"


def _score(value: Any) -> float | None:
    """A threshold as a number; None when it does not parse (bool is no number)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def check_thresholds(name: str, value: Mapping[str, Any], values: Mapping[str, Any]) -> Problems:
    """Each threshold a number (or null: the action is off), growing from greylist to
    reject, as rspamd needs them to mean anything."""
    del values
    scores: dict[str, float] = {}
    for action in THRESHOLD_ORDER:
        raw = value.get(action)
        if raw is None:
            continue
        score = _score(raw)
        if score is None or not math.isfinite(score):
            yield f"{name}.{action}: {raw!r} is not a score (a number such as 6 or 7.5, or null)"
            continue
        scores[action] = score
    ordered = [a for a in THRESHOLD_ORDER if a in scores]
    for lower, higher in itertools.pairwise(ordered):
        if scores[lower] >= scores[higher]:
            yield (
                f"{name}.{higher}: {scores[higher]:g} is not above {lower} ({scores[lower]:g}); "
                f"the thresholds must grow from greylist to reject"
            )


def check_timeout(name: str, value: int, values: Mapping[str, Any]) -> Problems:
    """control/scantimeout's range."""
    del values
    if not 1 <= value <= 300:
        yield f"{name}: {value} is out of range: must be from 1 to 300"


def _max_size(name: str, value: int, values: Mapping[str, Any], scanner: str) -> Problems:
    """A scanner's largest message: 1 MiB or more, and at least what the listeners take
    (``databytes``), so no message they take is one the scanner could not judge (the
    listeners accept a larger one unscanned: src/pyqmail/scan/settings.py). Equal is enough:
    the listeners compare what the client sent, which ``databytes`` bounds, and the scanners
    themselves take ``pyqmail_scanners__headroom`` more, for the fields the listeners add
    (roles/pyqmail_scanners/vars/main.yml). ``databytes`` 0
    (no limit) is refused too: the listeners would take a message of any size and pass it
    on unscanned (a virus padded past clamd's limit); a bad databytes is its own check's."""
    try:
        databytes = int(str(values.get("pyqmail_control__databytes")))
    except ValueError:
        databytes = -1
    if value < 1_048_576:
        yield f"{name}: {value} is out of range: must be 1048576 (1 MiB) or more"
    elif databytes == 0:
        yield (
            f"{name}: pyqmail_control__databytes is 0 (no limit), so the listeners would "
            f"take messages larger than {value} bytes, which {scanner} cannot scan, and "
            f"accept them unscanned: set pyqmail_control__databytes to at most {value}"
        )
    elif value < databytes:
        yield (
            f"{name}: {value} is smaller than pyqmail_control__databytes ({databytes}): the "
            f"listeners would take messages {scanner} cannot scan, and accept them unscanned"
        )


def check_clamd_max_size(name: str, value: int, values: Mapping[str, Any]) -> Problems:
    """clamd (StreamMaxLength) must take the largest message the listeners take."""
    if values.get("pyqmail_scanners__clamav_enabled"):
        yield from _max_size(name, value, values, "clamd")


def check_rspamd_max_size(name: str, value: int, values: Mapping[str, Any]) -> Problems:
    """rspamd (max_message) must take the largest message the listeners take."""
    if values.get("pyqmail_scanners__rspamd_enabled"):
        yield from _max_size(name, value, values, "rspamd")


def scan_problem(value: str) -> str:
    """The tcprules variable SCAN (src/pyqmail/scan/settings.py): "", 0 or 1."""
    if value.strip() not in SCAN_VALUES:
        return f"{value!r} is not '', 0 (not scanned) or 1 (scanned)"
    return ""
