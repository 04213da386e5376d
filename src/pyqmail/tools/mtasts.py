"""``pyqmail-dns check --fetch-policy``: is the MTA-STS policy the zone file prints served?

The zone file of the role pyqmail_dns publishes ``_mta-sts.<domain>`` (a TXT with the
policy's id) and prints the policy itself as comment lines under "MTA-STS: serve this at
https://mta-sts.<domain>/.well-known/mta-sts.txt": no pyqmail role serves it, so an admin
copies it to a web server. A sender that finds the TXT fetches the policy; when that fails,
it delivers as if the domain had no MTA-STS (RFC 8461 3.3), and the admin is never told.
This module fetches the policy the way a sender does and compares it with the file's:

- the name ``mta-sts.<domain>`` is resolved with the command's resolver: its CNAME chain
  followed (at most ``MAX_CNAMES`` hops, a loop named), then A and AAAA of the chain's end,
  each address tried on port 443 (``--https-port`` for tests). A name that ``--nameserver``
  does not serve (it answers REFUSED, or a referral: no authoritative answer) is asked of
  the recursive resolver senders use (``--resolver``, by default the system's): a
  hosting provider's name is in a zone the domain's own server is not authoritative for;
- HTTPS with the certificate checked for ``mta-sts.<domain>`` (not the CNAME's target: a
  sender checks the name it asked for) against the system's CAs (``--cafile`` for a private
  CA, read once before any lookup: ``tls_context``): RFC 8461 3.3 requires a valid
  certificate, as a browser checks it;
- ``GET /.well-known/mta-sts.txt``; only ``200`` counts: a redirect is a failure (3xx
  "MUST NOT be followed"), so is a media type other than ``text/plain`` (senders SHOULD
  check it) and a body over 64 KiB (the limit RFC 8461 3.3 suggests to senders);
- the body is read as RFC 8461 3.2 says (``key: value`` lines, CRLF or LF; unknown keys
  ignored; ``version``, ``mode``, ``max_age`` exactly once, ``mx`` at least once unless
  the mode is ``none``), and compared: ``mode`` and ``max_age`` as values, ``mx`` by
  matching (each MX host of the file must match a served pattern, a wildcard covering only
  the left-most label, RFC 8461 4.1; a served pattern that matches none of them is
  ``EXTRA``: not wrong in itself, senders accept a host it matches only if DNS names it as
  an MX, and listing a new MX before DNS does is how an MX change starts, but a pattern
  left over from an old MX is worth knowing of).

Lines: ``MISSING <url>: expected the policy, found <why>`` when no policy could be had,
``DIFFERENT <url>: <key>: expected ..., found ...``, ``EXTRA <url>: mx: ...``.
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.rcode
import dns.resolver

POLICY_PATH = "/.well-known/mta-sts.txt"
MAX_BODY = 64 * 1024
MAX_AGE_LIMIT = 31557600  # RFC 8461 3.2: at most a year
MODES = ("enforce", "testing", "none")
# CNAME hops followed from mta-sts.<domain>: a real chain has one or two (a hosting
# provider's name); more is a mistake, and a loop must end somewhere.
MAX_CNAMES = 8
_HEAD = re.compile(r"^; MTA-STS: serve this at https://mta-sts\.(\S+?)" + re.escape(POLICY_PATH))
_FIELD_LINE = re.compile(r"^;   ([A-Za-z0-9_]+): (.*)$")
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")  # RFC 8461 3.2 sts-policy-ext-name


@dataclass(frozen=True)
class Policy:
    """An MTA-STS policy's fields (RFC 8461 3.2)."""

    mode: str
    mx: tuple[str, ...]
    max_age: int


class PolicyError(Exception):
    """A policy body that is not a valid policy (the message names what is wrong)."""


class FetchError(Exception):
    """No policy could be had from the web server (the message says why)."""


class CafileError(Exception):
    """``--cafile`` cannot be used (the message names the file and why)."""


def parse_policy(text: str) -> Policy:
    """The fields of a policy body; PolicyError naming the first problem."""
    fields: dict[str, list[str]] = {}
    for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep or not _KEY.fullmatch(key):
            raise PolicyError(f"line {number} is not 'key: value': {line[:80]!r}")
        fields.setdefault(key, []).append(value.strip())
    for key in ("version", "mode", "max_age"):
        if len(fields.get(key, [])) != 1:
            raise PolicyError(f"{key!r} must be there exactly once")
    if fields["version"][0] != "STSv1":
        raise PolicyError(f"version {fields['version'][0]!r}: only STSv1 exists")
    mode, age = fields["mode"][0], fields["max_age"][0]
    if mode not in MODES:
        raise PolicyError(f"mode {mode!r}: one of {', '.join(MODES)}")
    if not re.fullmatch(r"[0-9]{1,10}", age) or int(age) > MAX_AGE_LIMIT:
        raise PolicyError(f"max_age {age!r}: a number of seconds up to {MAX_AGE_LIMIT}")
    mx = tuple(m.lower().rstrip(".") for m in fields.get("mx", []))
    if mode != "none" and not mx:
        raise PolicyError(f"mode {mode} without any 'mx' line")
    return Policy(mode, mx, int(age))


def expected_policies(zone_text: str) -> dict[str, Policy]:
    """The policy the zone file prints for each domain, by domain (file order)."""
    out: dict[str, Policy] = {}
    lines = zone_text.splitlines()
    for i, line in enumerate(lines):
        head = _HEAD.match(line)
        if head is None:
            continue
        body = []
        for follow in lines[i + 1 :]:
            field = _FIELD_LINE.match(follow)
            if field is not None:
                body.append(f"{field[1]}: {field[2]}")
            elif not follow.startswith("; (no pyqmail role"):
                break
        try:
            out[head[1].lower()] = parse_policy("\n".join(body))
        except PolicyError as exc:
            raise PolicyError(f"the policy printed for {head[1]}: {exc}") from None
    return out


def matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: ``*.example.com`` matches one label in its place, nothing more."""
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, _, rest = host.partition(".")
        return bool(label) and rest == pattern[2:]
    return host == pattern


def compare(url: str, want: Policy, got: Policy) -> list[str]:
    """One line per difference between the file's policy and the one served."""
    out = []
    if got.mode != want.mode:
        out.append(f"DIFFERENT {url}: mode: expected {want.mode}, found {got.mode}")
    if got.max_age != want.max_age:
        out.append(f"DIFFERENT {url}: max_age: expected {want.max_age}, found {got.max_age}")
    for host in want.mx:
        if not any(matches(p, host) for p in got.mx):
            shown = " ".join(got.mx) or "no mx line"
            out.append(f"DIFFERENT {url}: mx: expected one matching {host}, found {shown}")
    for pattern in got.mx:
        if not any(matches(pattern, host) for host in want.mx):
            out.append(
                f"EXTRA {url}: mx: the policy also accepts hosts matching {pattern}, "
                "which no MX record of the zone names"
            )
    return out


def tls_context(cafile: str | None) -> ssl.SSLContext:
    """The context of every fetch: certificates checked against the system's CAs or those of
    ``cafile``, TLS 1.2 at least. Built once, before any lookup: a bad ``--cafile`` is bad
    input (exit 2, CafileError naming it and why), not a failure of each fetch, and not a
    traceback after the DNS checks ran (their lines lost, exit 1 as if problems were found)."""
    try:
        context = ssl.create_default_context(cafile=cafile)
    except ssl.SSLError as exc:
        why = f"{exc.library}: {exc.reason}" if exc.reason else str(exc)
        raise CafileError(f"--cafile {cafile}: no PEM certificate could be read ({why})") from None
    except OSError as exc:
        raise CafileError(f"--cafile {cafile}: {exc.strerror or exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _via(chain: list[str]) -> str:
    """How an error's name was reached: "" for ``mta-sts.<domain>`` itself."""
    return f" (CNAME chain {' -> '.join(chain)})" if len(chain) > 1 else ""


def _refused(exc: dns.resolver.NoNameservers) -> bool:
    """Whether a server answered REFUSED (knot's answer for a name outside its zones)."""
    errors = exc.kwargs.get("errors") or []
    return any(e[4] is not None and e[4].rcode() == dns.rcode.REFUSED for e in errors)


@dataclass(frozen=True)
class Outside:
    """The recursive resolver asked for a name ``--nameserver`` does not serve, and how a
    message names it. Made when first needed (``make``): the system resolver is read from
    /etc/resolv.conf only then, and a machine without one fails that name, not the command."""

    make: Callable[[], dns.resolver.Resolver]
    label: str  # "the system resolver (/etc/resolv.conf)", "--resolver 192.0.2.1 port 53"
    server: str  # "--nameserver 192.0.2.53 port 53"


@dataclass(frozen=True)
class Fetcher:
    """How policies are fetched: the command's resolver (and the recursive one for names
    outside its zones, None when the command's resolver is the system's recursive one), the
    TLS context, the HTTPS port."""

    resolver: dns.resolver.Resolver
    timeout: float
    context: ssl.SSLContext
    port: int = 443
    outside: Outside | None = None

    def _ask(self, name: str, rdtype: str, via: str) -> dns.resolver.Answer:
        """DNS's answer for ``name`` and ``rdtype`` (empty: no such record); FetchError.

        ``--nameserver`` is asked first, each name anew (a chain may leave its zones and come
        back); a name it does not serve goes to the recursive resolver (``_ask_outside``).
        """
        try:
            answer = self.resolver.resolve(name, rdtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            raise FetchError(f"{name} does not exist in DNS{via}") from None
        except dns.resolver.NoNameservers as exc:
            if self.outside is None or not _refused(exc):
                raise FetchError(f"{name}: no answer from DNS: {exc}{via}") from None
            why = "answered REFUSED"
        except dns.exception.DNSException as exc:
            raise FetchError(f"{name}: no answer from DNS: {exc}{via}") from None
        else:
            # An authoritative answer (AA) or a recursive resolver's (RA) is the answer; an
            # authoritative server's answer with neither is a referral to another server.
            if self.outside is None or answer.response.flags & (dns.flags.AA | dns.flags.RA):
                return answer
            why = "gave no authoritative answer (a referral)"
        return self._ask_outside(self.outside, name, rdtype, via, why)

    def _ask_outside(
        self, outside: Outside, name: str, rdtype: str, via: str, why: str
    ) -> dns.resolver.Answer:
        """``_ask`` of the recursive resolver; a FetchError says it was asked and why."""
        note = f" ({outside.server} {why}, so {outside.label} was asked){via}"
        try:
            return outside.make().resolve(name, rdtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            raise FetchError(f"{name} does not exist in DNS{note}") from None
        except dns.exception.DNSException as exc:
            raise FetchError(f"{name}: no answer from DNS: {exc}{note}") from None

    def chain(self, name: str) -> list[str]:
        """``name`` and the names its CNAME chain leads to, one CNAME query a hop.

        A sender's recursive resolver follows the chain; an authoritative server (what
        ``--nameserver`` asks) answers an A query with the CNAME alone when its target is in
        another zone, and dnspython's stub resolver does not ask again. CNAME queries, rather
        than following the A answer's canonical name, also name a loop inside one zone,
        which the server answers as a chain dnspython refuses as too long. A hop into a zone
        the server does not serve (a hosting provider's) is asked of the recursive resolver
        (``_ask``), as the sender's resolver would find it.
        """
        chain = [name]
        while True:
            answer = self._ask(chain[-1], "CNAME", _via(chain))
            if answer.rrset is None:
                return chain
            target = answer.rrset[0].target.to_text(omit_final_dot=True).lower()
            if target in chain:
                raise FetchError(f"{name} is a CNAME loop: {' -> '.join([*chain, target])}")
            chain.append(target)
            if len(chain) > MAX_CNAMES + 1:
                shown = " -> ".join(chain)
                raise FetchError(f"{name}: a CNAME chain over {MAX_CNAMES} hops: {shown} ...")

    def addresses(self, name: str) -> list[str]:
        """The A then AAAA addresses of ``name``, or of its CNAME chain's end; FetchError
        when there are none."""
        chain = self.chain(name)
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            answer = self._ask(chain[-1], rdtype, _via(chain))
            found += [r.to_text() for r in answer.rrset or []]
        if not found:
            raise FetchError(f"{chain[-1]} has no A or AAAA record{_via(chain)}")
        return found

    def fetch(self, domain: str) -> str:
        """The policy body served for ``domain``; FetchError with the last failure."""
        name = f"mta-sts.{domain}"
        last = ""
        for address in self.addresses(name):
            try:
                return self._get(address, name)
            except (OSError, http.client.HTTPException) as exc:
                last = f"{address} port {self.port}: {exc}"
        raise FetchError(last)

    def _get(self, address: str, name: str) -> str:
        """One HTTPS GET of the policy at ``address``, the certificate checked for ``name``."""
        raw = socket.create_connection((address, self.port), timeout=self.timeout)
        with raw, self.context.wrap_socket(raw, server_hostname=name) as tls:
            request = (
                f"GET {POLICY_PATH} HTTP/1.1\r\nHost: {name}\r\n"
                "User-Agent: pyqmail-dns\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
            )
            tls.sendall(request.encode("ascii"))
            response = http.client.HTTPResponse(tls)
            response.begin()
            return _body(response)


def _body(response: http.client.HTTPResponse) -> str:
    """The body of a 200 ``text/plain`` answer of at most MAX_BODY bytes, else FetchError."""
    if response.status != 200:
        where = response.getheader("Location")
        moved = f" to {where}" if where and 300 <= response.status < 400 else ""
        raise FetchError(f"HTTP {response.status} {response.reason}{moved} (only 200 counts)")
    kind = (response.getheader("Content-Type") or "").split(";", 1)[0].strip().lower()
    if kind != "text/plain":
        raise FetchError(f"Content-Type {kind or 'missing'}, not text/plain")
    body = response.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise FetchError(f"the policy is over {MAX_BODY} bytes")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FetchError(f"the policy is not UTF-8 text: {exc}") from None


def check_policies(wanted: dict[str, Policy], fetcher: Fetcher) -> list[str]:
    """Every problem with the served policies of ``wanted`` (``expected_policies``: the
    file's, by domain), one line each."""
    out = []
    for domain, want in wanted.items():
        url = f"https://mta-sts.{domain}{POLICY_PATH}"
        try:
            got = parse_policy(fetcher.fetch(domain))
        except FetchError as exc:
            out.append(f"MISSING {url}: expected the policy, found {exc}")
            continue
        except PolicyError as exc:
            out.append(f"DIFFERENT {url}: expected a valid policy, found {exc}")
            continue
        out += compare(url, want, got)
    return out
