"""A real authoritative DNS server for tests: Debian's ``knotd`` on loopback.

``DnsServer({"example.org.": zone_text})`` writes a knot configuration and one zone file per
zone into a temporary directory, starts ``knotd`` in the foreground on 127.0.0.1 and a free high
port with its own rundir, storage and control socket (never /etc/knot, /run/knot or
/var/lib/knot, so it runs unprivileged as well as root, beside a packaged knot), waits until it
answers a SOA query for every zone, and stops it by its PID on exit::

    with DnsServer({"example.org.": "@ MX 10 mx1.example.org."}) as dns:
        answer = dns.resolver().resolve("example.org.", "MX")

A zone text may use names relative to its zone (``$ORIGIN`` is the zone) and may leave out the
SOA and NS records: a zone without a SOA gets a made-up SOA and NS so that knot loads it. knot
refuses a zone with a syntax error; that refusal is raised with knot's log, not a timeout.

``silent_server()`` never answers; ``silent_for(upstream, suffix)`` passes queries on but
never answers those under ``suffix``; ``recording(upstream)`` passes every query on and
keeps a log of them.

``split_zones(text, origins)`` puts the records of a multi-zone file (such as the
``dns.zone`` the pyqmail_dns role writes, whose owners are fully qualified and span several
zones) into the zone each owner belongs to.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset
import dns.zone

KNOTD = shutil.which("knotd") or "/usr/sbin/knotd"
START_TIMEOUT = 15.0
STUB_SOA = (
    "@ 300 IN SOA ns.invalid. hostmaster.invalid. 1 3600 600 86400 300\n@ 300 IN NS ns.invalid.\n"
)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``host`` (knot listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError(f"no port free for both UDP and TCP on {host}")


@contextlib.contextmanager
def silent_server(host: str = "127.0.0.1") -> Iterator[tuple[str, int]]:
    """A DNS server that never answers: a bound UDP socket nobody reads. (A free port may
    not do: the kernel can answer a query there with ICMP port unreachable at once.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((host, 0))
        yield host, int(udp.getsockname()[1])


@contextlib.contextmanager
def silent_for(
    upstream: tuple[str, int], suffix: str, host: str = "127.0.0.1", rdtype: str | None = None
) -> Iterator[tuple[str, int]]:
    """A DNS server that passes queries on to ``upstream`` (a ``DnsServer``) but never
    answers those for names under ``suffix`` (only those of type ``rdtype`` when given:
    the A query of a name hangs while its ``_dmarc`` TXT answers): one sender-chosen name
    whose DNS hangs while every other name answers, as a resolver in production sees it."""
    origin = dns.name.from_text(suffix)
    only = None if rdtype is None else dns.rdatatype.from_text(rdtype)

    def drop(question: dns.rrset.RRset) -> bool:
        return question.name.is_subdomain(origin) and only in (None, question.rdtype)

    with _proxy(upstream, host, drop, []) as address:
        yield address


@contextlib.contextmanager
def recording(
    upstream: tuple[str, int], host: str = "127.0.0.1"
) -> Iterator[tuple[tuple[str, int], list[tuple[str, str]]]]:
    """A DNS server that passes every query on to ``upstream`` and notes it first: its
    address and the query log, ``(name, type)`` per query in arrival order (``name``
    absolute, as asked): what a test reads to tell whether a daemon asked DNS at all."""
    seen: list[tuple[str, str]] = []
    with _proxy(upstream, host, lambda _question: False, seen) as address:
        yield address, seen


@contextlib.contextmanager
def _proxy(
    upstream: tuple[str, int],
    host: str,
    drop: Callable[[dns.rrset.RRset], bool],
    seen: list[tuple[str, str]],
) -> Iterator[tuple[str, int]]:
    """A UDP DNS server on ``host`` passing queries on to ``upstream``, each noted in
    ``seen``; those ``drop`` says of get no answer (the client waits for its timeout)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((host, 0))
        udp.settimeout(0.2)
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                try:
                    wire, client = udp.recvfrom(65535)
                except TimeoutError:
                    continue
                query = dns.message.from_wire(wire)
                question = query.question[0] if query.question else None
                if question is not None:
                    seen.append((question.name.to_text(), dns.rdatatype.to_text(question.rdtype)))
                if question is not None and drop(question):
                    continue
                answer = dns.query.udp(query, upstream[0], port=upstream[1], timeout=2.0)
                udp.sendto(answer.to_wire(), client)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield host, int(udp.getsockname()[1])
        finally:
            stop.set()
            thread.join(2)


def _origin(name: str) -> str:
    """The zone name, absolute and lower case; a clear error for a name that is not one."""
    try:
        return dns.name.from_text(name).to_text().lower()
    except dns.exception.DNSException as exc:
        raise ValueError(f"DnsServer: zone name {name!r} is not a DNS name: {exc}") from exc


def _has_soa(origin: str, text: str) -> bool:
    """Whether ``text`` has a SOA at the zone apex; a text dnspython cannot parse counts as
    having one, so that knot judges it and its own error (in its log) is raised."""
    try:
        zone = dns.zone.from_text(text, origin=origin, relativize=False, check_origin=False)
    except dns.exception.DNSException:
        return True
    node = zone.get_node(origin)
    return node is not None and node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.SOA) is not None


def zone_file(origin: str, text: str) -> str:
    """The zone file knot loads: ``$ORIGIN``/``$TTL`` first, a stub SOA and NS if none."""
    head = f"$ORIGIN {origin}\n$TTL 300\n"
    if not _has_soa(origin, head + text):
        head += STUB_SOA
    return head + text + ("" if text.endswith("\n") else "\n")


def split_zones(text: str, origins: list[str]) -> dict[str, str]:
    """Each record of ``text`` (absolute owners) in the deepest of ``origins`` containing it.

    Raises ValueError naming an owner that is in none of the zones.
    """
    names = sorted((dns.name.from_text(o) for o in origins), key=len, reverse=True)
    parsed = dns.zone.from_text(text, origin=dns.name.root, relativize=False, check_origin=False)
    out: dict[str, list[str]] = {n.to_text(): [] for n in names}
    for owner, ttl, rdata in parsed.iterate_rdatas():
        zone = next((n for n in names if owner.is_subdomain(n)), None)
        if zone is None:
            raise ValueError(f"split_zones: {owner} is in none of the zones {origins}")
        out[zone.to_text()].append(f"{owner} {ttl} IN {rdata.rdtype.name} {rdata.to_text()}")
    return {zone: "".join(f"{line}\n" for line in lines) for zone, lines in out.items()}


class DnsServer:
    """knotd serving ``zones`` (zone name -> zone text) on ``host``:``port`` until exit."""

    def __init__(self, zones: dict[str, str], host: str = "127.0.0.1", port: int = 0) -> None:
        if not zones:
            raise ValueError("DnsServer: no zone to serve")
        self.zones = {_origin(name): text for name, text in zones.items()}
        self.host = host
        self.want_port = port  # 0: a free high port (bench/checks_peer.py needs 53)
        self.port = 0
        self.dir = Path()
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def log(self) -> str:
        """knotd's log so far (its stderr), for error messages."""
        path = self.dir / "knotd.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def _config(self) -> str:
        """knot.conf: everything under self.dir, one UDP and TCP worker, no zone file sync."""
        d = self.dir
        zones = "".join(f"  - domain: {name}\n" for name in self.zones)
        return (
            "server:\n"
            f'    rundir: "{d}/run"\n'
            f'    pidfile: "{d}/run/knot.pid"\n'
            f"    listen: {self.host}@{self.port}\n"
            "    udp-workers: 1\n    tcp-workers: 1\n    background-workers: 1\n"
            "log:\n  - target: stderr\n    any: info\n"
            f'database:\n    storage: "{d}/db"\n'
            f'control:\n    listen: "{d}/run/knot.sock"\n'
            "template:\n  - id: default\n"
            f'    storage: "{d}/zones"\n'
            '    file: "%s.zone"\n'
            "    zonefile-sync: -1\n    zonefile-load: whole\n    journal-content: none\n"
            f"zone:\n{zones}"
        )

    def _write(self) -> Path:
        """Writes the configuration and the zone files; returns the configuration's path."""
        for sub in ("run", "db", "zones"):
            (self.dir / sub).mkdir(mode=0o700)
        for name, text in self.zones.items():
            (self.dir / "zones" / f"{name}zone").write_text(zone_file(name, text))
        conf = self.dir / "knot.conf"
        conf.write_text(self._config())
        return conf

    def __enter__(self) -> DnsServer:
        for attempt in range(3):
            try:
                self._start()
            except RuntimeError as exc:
                # Another process took the free port between the probe and knot's bind.
                if "address already in use" not in str(exc) or attempt == 2:
                    raise
                continue
            return self
        raise AssertionError("unreachable")

    def _start(self) -> None:
        """knotd on a fresh port and directory, until it serves every zone (else stopped)."""
        self._tmp = tempfile.TemporaryDirectory(prefix="knot-")
        self.dir = Path(self._tmp.name)
        self.port = self.want_port or free_port(self.host)
        conf = self._write()
        with (self.dir / "knotd.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [KNOTD, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _answers_soa(self, zone: str) -> bool:
        """Whether knot answers authoritatively with the SOA of ``zone`` (it is loaded)."""
        query = dns.message.make_query(zone, dns.rdatatype.SOA)
        try:
            reply = dns.query.udp(query, self.host, timeout=0.2, port=self.port)
        except (dns.exception.Timeout, OSError):
            return False
        return reply.rcode() == 0 and bool(reply.answer)

    def _wait_ready(self) -> None:
        """Until every zone answers its SOA; knot's log in the error if it exits, refuses a
        zone or hangs."""
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        pending = list(self.zones)
        while pending:
            if self.proc.poll() is not None:
                raise RuntimeError(f"knotd exited with {self.proc.returncode}:\n{self.log}")
            if "failed to load zone" in self.log:  # knot keeps running without the zone
                raise RuntimeError(f"knotd refused a zone:\n{self.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"knotd did not serve {pending} in {START_TIMEOUT}s:\n{self.log}"
                )
            if self._answers_soa(pending[0]):
                pending.pop(0)
            else:
                time.sleep(0.05)

    def stop(self) -> None:
        """TERM to our knotd by PID (KILL after 10 s), then the temporary directory goes."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None

    def resolver(self) -> dns.resolver.Resolver:
        """A dnspython resolver that asks this server only (no /etc/resolv.conf)."""
        res = dns.resolver.Resolver(configure=False)
        res.nameservers = [self.host]
        res.port = self.port
        res.timeout = res.lifetime = 2.0
        return res
