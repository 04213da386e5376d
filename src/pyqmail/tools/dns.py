"""``pyqmail-dns check``: are the records of a zone file (the role's dns.zone) published?

The role pyqmail_dns writes ``artifacts/<host>/dns.zone`` on the controller: the records the
host's mail needs. This command resolves each owner and type of that file and prints one line
per record that is missing, different or extra, naming the owner, the type, what the file
expects and what DNS answered; exit 1 when there is any, 0 and ``all N records published``
otherwise, 2 before any lookup for input it cannot use (the zone file, ``--cafile``, an
/etc/resolv.conf without a usable nameserver when no ``--nameserver`` is given).

How records are compared:

- TXT by their text (the character strings joined, as SPF, DKIM and DMARC read them). Other
  TXT records at the same name are left alone (a domain has verification TXTs); a published
  TXT with the same ``v=`` tag as an expected one (another SPF, another DKIM key) makes the
  expected one ``DIFFERENT`` when the expected one is missing, and is ``EXTRA`` (with the
  reason: two SPF records are a permerror) when it is there as well.
- Every other type (MX, A, AAAA, TLSA, PTR) as a set: each expected record must be there, and
  one published that the file does not have is ``EXTRA`` (an MX to another host takes mail),
  except another TLSA next to the expected one: ``INFO``, no problem (the next key's record
  published before a key rollover, RFC 7671 8.1).
- TTLs are not compared. DNSSEC (which TLSA needs) is not validated here.

``--fetch-policy`` also fetches each domain's MTA-STS policy from its web server and compares
it with the one the file prints as comments (``pyqmail.tools.mtasts``).

``--nameserver``/``--port`` ask one server (tests start knot on loopback); by default the
system resolver (/etc/resolv.conf) answers, as remote mail servers would see it. A name the
policy fetch needs that ``--nameserver`` does not serve (a CNAME of ``mta-sts.<domain>`` to a
hosting provider's zone) is asked of ``--resolver`` (by default the system resolver): the
recursive resolver a sender would use (RFC 8461 3.3).
"""

from __future__ import annotations

import functools
import ipaddress
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import dns.exception
import dns.name
import dns.rdata
import dns.rdatatype
import dns.resolver
import dns.zone

if TYPE_CHECKING:
    import argparse

    from pyqmail.tools import mtasts

EXIT_PUBLISHED, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2
INFO = "INFO "  # a line that is no problem (another TLSA next to the expected one)


@dataclass(frozen=True)
class Expected:
    """The records of one owner and type in the zone file."""

    owner: dns.name.Name
    rdtype: dns.rdatatype.RdataType
    rdatas: tuple[dns.rdata.Rdata, ...]


class InputError(Exception):
    """Input the command cannot work with (exit 2, before any lookup): the message names it."""


class ZoneFileError(InputError):
    """The zone file cannot be read or parsed (exit 2)."""


def _zone_text(path: str) -> str:
    """The file's text; ZoneFileError naming it when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError as exc:
        raise ZoneFileError(f"{path}: {exc.strerror}") from exc


def read_zone(text: str, path: str) -> list[Expected]:
    """The records of ``text`` (the file ``path``) grouped by owner and type, in file order
    of owners.

    The file's owners are fully qualified (it spans several zones), so it is parsed with the
    root as origin and without the SOA/NS a real zone must have.
    """
    try:
        zone = dns.zone.from_text(text, origin=dns.name.root, relativize=False, check_origin=False)
    except dns.exception.DNSException as exc:
        raise ZoneFileError(f"{path}: not a zone file: {exc}") from exc
    out = [
        Expected(name, rdataset.rdtype, tuple(rdataset))
        for name, node in zone.nodes.items()
        for rdataset in node.rdatasets
    ]
    if not out:
        raise ZoneFileError(f"{path}: no records")
    return out


class SystemResolverError(dns.resolver.NoResolverConfiguration):
    """/etc/resolv.conf gives no resolver (the message says why). A DNSException: the
    policy fetch's name that needed the system resolver is MISSING with the reason; without
    ``--nameserver`` the command stops before any lookup (exit 2)."""


RESOLV_CONF = "/etc/resolv.conf"


def system_resolver() -> dns.resolver.Resolver:
    """dnspython's resolver from /etc/resolv.conf; SystemResolverError naming the file and
    what is wrong with it. dnspython raises NoResolverConfiguration for a file it cannot read
    or that names no nameserver, and a ValueError for a ``nameserver`` line that is no
    address (``nameserver localhost``): without ``--nameserver`` either was a traceback, and
    the ValueError (no DNSException) one with it too, after every lookup, its lines lost."""
    try:
        return dns.resolver.Resolver()
    except (dns.resolver.NoResolverConfiguration, ValueError) as exc:
        plain = {
            "no nameservers": "no nameserver line",
            f"cannot open {RESOLV_CONF}": "cannot be read",
        }
        why = f"{RESOLV_CONF}: {plain.get(str(exc), str(exc))}"
        raise SystemResolverError(why) from None  # type: ignore[no-untyped-call] # dnspython's


def make_resolver(nameserver: str | None, port: int, timeout: float) -> dns.resolver.Resolver:
    """The system resolver (SystemResolverError when /etc/resolv.conf gives none), or one
    that asks only ``nameserver``:``port``."""
    if nameserver is None:
        resolver = system_resolver()
    else:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [nameserver]
    resolver.port = port
    resolver.timeout = resolver.lifetime = timeout
    return resolver


def resolver_address(text: str) -> tuple[str, int]:
    """``--resolver``'s HOST[:PORT] (``[v6]:PORT`` with a port): the address and port (53
    when none is given); ValueError saying what is wrong."""
    host, port = text, "53"
    if text.startswith("[") and "]" in text:
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r}: after ']' only ':PORT' may follow")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(
            f"{text!r}: {host!r} is not an IP address (a resolver is asked by its address)"
        ) from None
    if not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: the port {port!r} is not a number from 1 to 65535")
    return host, int(port)


def lookup(resolver: dns.resolver.Resolver, want: Expected) -> list[dns.rdata.Rdata]:
    """What DNS answers for the owner and type: [] for no such name or no such record."""
    try:
        answer = resolver.resolve(want.owner, want.rdtype, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return []
    return list(answer.rrset) if answer.rrset is not None else []


def _txt(rdata: dns.rdata.Rdata) -> str:
    """A TXT record's text: its character strings joined."""
    return b"".join(rdata.strings).decode("utf-8", "replace")  # type: ignore[attr-defined]


def _tag(text: str) -> str:
    """The ``v=`` tag a TXT record starts with (v=spf1, v=DKIM1, ...), or ""."""
    head = text.split(";", 1)[0].split(" ", 1)[0].strip().lower()
    return head if head.startswith("v=") else ""


def _line(kind: str, want: Expected, expected: str, found: str) -> str:
    rtype = dns.rdatatype.to_text(want.rdtype)
    return f"{kind} {want.owner} {rtype}: expected {expected}, found {found}"


# The TXT records of which a name must have one: a second one, even a correct copy left next
# to the expected one, breaks the first (each receiver's reason, shown with the EXTRA line).
ONE_PER_NAME = {
    "v=spf1": "two SPF records: receivers get permerror and fail the mail (RFC 7208 4.5)",
    "v=dmarc1": "two DMARC records: receivers apply no DMARC policy (RFC 7489 6.6.3)",
    "v=stsv1": "two MTA-STS records: senders ignore MTA-STS for the domain (RFC 8461 3.1)",
    "v=tlsrptv1": "two TLS-RPT records: senders send no TLS reports (RFC 8460 3)",
    "v=dkim1": "two DKIM keys at one selector: verifiers may fail every signature made with it",
}


def compare_txt(want: Expected, found: list[dns.rdata.Rdata]) -> list[str]:
    """One line per expected TXT that is not published with exactly its text, and one per
    other published record with the ``v=`` tag of an expected SPF, DMARC, MTA-STS, TLS-RPT or
    DKIM record (``EXTRA``: with two, receivers use neither)."""
    texts = [_txt(r) for r in found]
    wanted = [_txt(r) for r in want.rdatas]
    out = []
    for text in wanted:
        tag = _tag(text)
        same_tag = [t for t in texts if tag and _tag(t) == tag and t not in wanted]
        if text not in texts and same_tag:
            out.append(_line("DIFFERENT", want, repr(text), " | ".join(map(repr, same_tag))))
        elif text not in texts:
            shown = " | ".join(map(repr, texts)) or "nothing"
            out.append(_line("MISSING", want, repr(text), shown))
        elif tag in ONE_PER_NAME:
            out += [
                _line("EXTRA", want, f"only {text!r}", f"also {t!r}") + f": {ONE_PER_NAME[tag]}"
                for t in same_tag
            ]
    return out


def compare_set(want: Expected, found: list[dns.rdata.Rdata]) -> list[str]:
    """One line per expected record not published and per published one not expected. A
    TLSA record next to the expected one is ``INFO``, no problem: publishing the next key's
    record before the key changes (or keeping the previous one a while) is how a key rolls
    over without DANE senders deferring (RFC 7671 8.1)."""
    shown = " | ".join(r.to_text() for r in found) or "nothing"
    out = [_line("MISSING", want, r.to_text(), shown) for r in want.rdatas if r not in found]
    extra = [r for r in found if r not in want.rdatas]
    if want.rdtype == dns.rdatatype.TLSA and not out:
        return [
            _line("INFO", want, "this key's record (published)", r.to_text())
            + ": another TLSA published: the previous or next key? remove it once no longer "
            "needed"
            for r in extra
        ]
    out += [
        _line("EXTRA", want, "not this record (not in the zone file)", r.to_text()) for r in extra
    ]
    return out


def check(records: list[Expected], resolver: dns.resolver.Resolver) -> list[str]:
    """Every problem, one line each, in the zone file's order."""
    problems: list[str] = []
    for want in records:
        try:
            found = lookup(resolver, want)
        except dns.exception.DNSException as exc:
            rtype = dns.rdatatype.to_text(want.rdtype)
            problems.append(f"ERROR {want.owner} {rtype}: no answer: {exc}")
            continue
        compare = compare_txt if want.rdtype == dns.rdatatype.TXT else compare_set
        problems += compare(want, found)
    return problems


def _policies(
    args: argparse.Namespace, text: str, resolver: dns.resolver.Resolver
) -> tuple[Callable[[], list[str]], int]:
    """``--fetch-policy``: what checks the served MTA-STS policies (one line per problem),
    and how many there are.

    The file's policies and ``--cafile`` are read here, before any lookup: bad input stops
    the command (exit 2) before it has results to lose.
    """
    from pyqmail.tools import mtasts  # noqa: PLC0415 - only with --fetch-policy

    try:
        wanted = mtasts.expected_policies(text)
    except mtasts.PolicyError as exc:
        raise ZoneFileError(f"{args.zonefile}: {exc}") from exc
    try:
        context = mtasts.tls_context(args.cafile)
    except mtasts.CafileError as exc:
        raise InputError(str(exc)) from exc
    fetcher = mtasts.Fetcher(resolver, args.timeout, context, args.https_port, _outside(args))
    return lambda: mtasts.check_policies(wanted, fetcher), len(wanted)


def _outside(args: argparse.Namespace) -> mtasts.Outside | None:
    """The recursive resolver for names ``--nameserver`` does not serve: ``--resolver``, or
    the system's; None without ``--nameserver`` (the system resolver answers every name)."""
    from pyqmail.tools import mtasts  # noqa: PLC0415 - only with --fetch-policy

    if args.nameserver is None:
        return None
    server = f"--nameserver {args.nameserver} port {args.port}"
    if args.resolver is None:
        label, host, port = "the system resolver (/etc/resolv.conf)", None, 53
    else:
        host, port = args.resolver
        label = f"the resolver {host} port {port} (--resolver)"
    make = functools.cache(functools.partial(make_resolver, host, port, args.timeout))
    return mtasts.Outside(make, label, server)


def _run(args: argparse.Namespace) -> int:
    text = _zone_text(args.zonefile)
    records = read_zone(text, args.zonefile)
    try:
        resolver = make_resolver(args.nameserver, args.port, args.timeout)
    except SystemResolverError as exc:
        raise InputError(f"the system resolver cannot be used (no --nameserver): {exc}") from None
    fetch, policies = _policies(args, text, resolver) if args.fetch_policy else (None, 0)
    lines = check(records, resolver)
    if fetch is not None:
        lines += fetch()
    problems = [line for line in lines if not line.startswith(INFO)]
    count = sum(len(r.rdatas) for r in records)
    for line in lines:
        sys.stdout.write(line + "\n")
    if problems:
        sys.stdout.write(f"{len(problems)} problem(s) in {count} records of {args.zonefile}\n")
        return EXIT_PROBLEMS
    served = f" and {policies} MTA-STS policies served" if args.fetch_policy else ""
    sys.stdout.write(f"all {count} records published{served}\n")
    return EXIT_PUBLISHED


def main(argv: Sequence[str] | None = None) -> int:
    """``pyqmail-dns check ZONEFILE``: exit 0 all published, 1 problems, 2 bad input."""
    import argparse  # noqa: PLC0415 - CLI only

    parser = argparse.ArgumentParser(
        prog="pyqmail-dns",
        description="Check that the records of a zone file (artifacts/<host>/dns.zone, "
        "written by the role pyqmail_dns) are published in DNS.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    chk = sub.add_parser("check", help="resolve every record of the file; exit 1 if any differs")
    chk.add_argument("zonefile", help="the zone file, e.g. artifacts/mx1.example.org/dns.zone")
    chk.add_argument(
        "--nameserver",
        help="ask this server (default: the system resolver); with --fetch-policy, names it "
        "does not serve go to --resolver",
    )
    chk.add_argument("--port", type=int, default=53, help="port of the name server (default 53)")
    chk.add_argument("--timeout", type=float, default=5.0, help="seconds per query (default 5)")
    chk.add_argument(
        "--fetch-policy",
        action="store_true",
        help="also fetch each domain's MTA-STS policy over HTTPS, as senders do, and compare it "
        "with the one the file prints",
    )
    chk.add_argument(
        "--https-port", type=int, default=443, help="port of the policy's web server (default 443)"
    )
    chk.add_argument(
        "--cafile", help="trust these CAs for the policy's web server (default: the system's)"
    )
    chk.add_argument(
        "--resolver",
        metavar="HOST[:PORT]",
        help="with --fetch-policy and --nameserver: the recursive resolver to follow names "
        "outside the zone file's zones (a CNAME of mta-sts.<domain> to a hosting provider), "
        "as senders do (default: the system resolver, /etc/resolv.conf)",
    )
    args = parser.parse_args(argv)
    _check_resolver(parser, args)
    for option, port in (("--port", args.port), ("--https-port", args.https_port)):
        if not 0 < port < 65536:
            parser.error(f"{option} {port}: must be from 1 to 65535")
    try:
        return _run(args)
    except InputError as exc:
        sys.stderr.write(f"pyqmail-dns: {exc}\n")
    return EXIT_USAGE


def _check_resolver(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--resolver`` read into (address, port); a usage error (exit 2) naming what is wrong,
    and when it would not be used (only the policy fetch asks it, and only for names
    ``--nameserver`` does not serve)."""
    if args.resolver is None:
        return
    if not args.fetch_policy or args.nameserver is None:
        parser.error(
            f"--resolver {args.resolver}: only used with --fetch-policy and --nameserver "
            "(without --nameserver the system resolver answers every name)"
        )
    try:
        args.resolver = resolver_address(args.resolver)
    except ValueError as exc:
        parser.error(f"--resolver {exc}")


if __name__ == "__main__":
    sys.exit(main())
