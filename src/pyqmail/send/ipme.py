"""This host's own addresses (qmail's ``ipme``): where remote delivery must never connect.

The kernel's own tables are the source, read with the standard library only:

- IPv4: the ``LOCAL`` routes of ``/proc/net/fib_trie`` (every address assigned to an
  interface, and whole local ranges such as ``127.0.0.0/8``, all of which reach this host);
- IPv6: ``/proc/net/if_inet6`` (every interface address, ``::1`` included).

Always added, whatever the tables say: ``127.0.0.0/8``, ``::1``, and the unspecified
addresses ``0.0.0.0/8`` and ``::`` (a connection to them reaches this host on Linux).
IPv4-mapped IPv6 addresses (``::ffff:127.0.0.1``) are checked as their IPv4 address.
Where ``/proc`` is missing (not Linux), the addresses the host name resolves to stand in.

The tables are read again after ``TTL`` seconds, so an address added to an interface is
known within a minute without a restart; the listen addresses of pyqmail-smtpd are
interface addresses, so they are covered.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from pathlib import Path

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

TTL = 60.0
PROC = Path("/proc/net")
_ALWAYS: tuple[Network, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("0.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
    ipaddress.ip_network("::/128"),
)


def parse_fib_trie(text: str) -> list[Network]:
    """The ``LOCAL`` entries of ``/proc/net/fib_trie``: an ``|-- a.b.c.d`` line, then
    ``/len host LOCAL`` lines for that key."""
    out: list[Network] = []
    key = ""
    for line in text.splitlines():
        word = line.strip()
        if word.startswith("|-- "):
            key = word[4:]
        elif word.startswith("/") and word.endswith(" LOCAL") and key:
            length = word[1:].split(" ", 1)[0]
            try:
                out.append(ipaddress.ip_network(f"{key}/{length}", strict=False))
            except ValueError:
                continue
    return out


def parse_if_inet6(text: str) -> list[Network]:
    """Every address of ``/proc/net/if_inet6`` (32 hex digits first on each line)."""
    out: list[Network] = []
    for line in text.splitlines():
        digits = line.split(" ", 1)[0]
        if len(digits) != 32:
            continue
        try:
            out.append(ipaddress.ip_network(int(digits, 16).to_bytes(16, "big")))
        except ValueError:
            continue
    return out


def _read(path: Path) -> str | None:
    """bytes.decode, not read_text: a text file looks its codec up, which imports a module,
    and pyqmail-send may no longer be able to import anything once it dropped privileges."""
    try:
        return path.read_bytes().decode("ascii", "replace")
    except OSError:
        return None


def _by_name() -> list[Network]:
    """Fallback without /proc: the addresses this host's name resolves to."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None)
    except OSError:
        return []
    out: list[Network] = []
    for info in infos:
        try:
            out.append(ipaddress.ip_network(str(info[4][0]).split("%", 1)[0]))
        except ValueError:
            continue
    return out


def read_local_networks(proc: Path = PROC) -> tuple[Network, ...]:
    """Every network whose addresses reach this host, from the kernel's tables."""
    found: list[Network] = list(_ALWAYS)
    trie, inet6 = _read(proc / "fib_trie"), _read(proc / "if_inet6")
    if trie is None and inet6 is None:
        found += _by_name()
    found += parse_fib_trie(trie or "") + parse_if_inet6(inet6 or "")
    return tuple(dict.fromkeys(found))


class LocalAddresses:
    """``is_local(address)``: is ``address`` one of this host's own? (cached for ``ttl``)."""

    def __init__(self, proc: Path = PROC, ttl: float = TTL) -> None:
        self.proc = proc
        self.ttl = ttl
        self._networks: tuple[Network, ...] = ()
        self._read_at = -ttl - 1.0
        self._lock = threading.Lock()

    def networks(self) -> tuple[Network, ...]:
        with self._lock:
            now = time.monotonic()
            if now - self._read_at > self.ttl:
                self._networks = read_local_networks(self.proc)
                self._read_at = now
            return self._networks

    def is_local(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.networks())
