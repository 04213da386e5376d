"""tcprules(1) source files, their compiled cdb, and tcpserver's per-client lookup.

pyqmail-smtpd applies per-client policy from ``/etc/tcp/smtp.cdb`` exactly as ucspi-tcp's
tcpserver does, and the ``pyqmail_tcprules`` Ansible module writes ``/etc/tcp/smtp`` and
compiles it here, in pure Python, to the very bytes ``tcprules`` would write (tested
against the real ``tcprules``/``tcprulescheck``).

Source format (tcprules.c): one rule per line, ``address:instructions``; lines starting
with ``#`` are comments. Instructions are ``allow`` or ``deny`` followed by any number of
``,VAR="value"`` (any repeated character may replace the quotes: ``,VAR=/value/``).
Addresses:

- ``1.2.3.4`` exact IPv4 address; ``1.2.3.`` ``10.`` prefixes ending in a dot;
- ``1.2.3.37-53`` and ``10.2-3.``: ranges, expanded by tcprules into one key per number;
- ``=mx.example.com`` a host name, ``=.example.com`` a domain suffix, ``=`` any named host:
  the client's TCPREMOTEHOST, which pyqmail-smtpd finds as tcpserver -p does (the PTR
  name, only if its A/AAAA records include the client's address: forward-confirmed), and
  only for a cdb that has such a key (``Rules.names``); no confirmed name, no ``=`` match;
- ``joe@1.2.3.4`` / ``joe@=host``: TCPREMOTEINFO (ident) forms;
- the empty address: the default rule;
- IPv6 (Debian's ucspi-tcp-ipv6): ``::1`` exact, ``2001:db8:`` prefixes ending in a colon,
  written the way tcpserver prints addresses (``ip6_fmt``: lower case, no leading
  zeros, the longest run of zero groups — even a single one — compressed to ``::``). These
  are string prefixes of that notation, as in tcpserver. The IPv4-only ``tcprules`` cannot
  read IPv6 rules (it splits at the first colon); ucspi-tcp-ipv6's can, and so can we.

Compiled form: key = address (ranges expanded), data = ``D\\0`` for deny (nothing for
allow) followed by ``+VAR=value\\0`` per variable.

Lookup order (rules.c): ``info@ip``, ``info@=host``, ``ip``, ``=host``, shorter and
shorter prefixes of ip ending in ``.`` (or ``:`` for IPv6), ``=`` + shorter and shorter
suffixes of host starting with ``.``, ``=`` (when the host is known), then the empty key.
The first key present decides; no key at all means allow with no environment.

Parsing is stricter than tcprules: anything tcprules would skip silently, mangle, or
store under a key tcpserver can never produce (``1.2.3`` without its dot, ``010.1.``,
upper-case host names, duplicate addresses that shadow each other) is a ``RulesError``
naming the rule. Values may not contain double quotes or control characters, so every
rule has exactly one source line.

Imports: the standard library and ``pyqmail.cdb`` only. Ansible loads this file as the
collection's ``plugins/module_utils/pyqmail_rules`` (a symlink), where the ``pyqmail`` package
may not be installed, so the cdb code is imported from the collection's ``pyqmail_cdb``
(a symlink to the same file) when ``pyqmail.cdb`` is not importable; Ansible's payload
builder sees that import and ships the file with the module.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

try:
    from pyqmail.cdb import CDB, CDBError, make
except ImportError:  # pragma: no cover - exercised through ansible-playbook
    from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_cdb import (  # type: ignore[import-untyped,import-not-found,no-redef,unused-ignore]
        CDB,
        CDBError,
        make,
    )

__all__ = [
    "Decision",
    "Rule",
    "Rules",
    "RulesError",
    "address_problem",
    "candidates",
    "check_duplicates",
    "compile_rules",
    "env_problem",
    "format_source",
    "ip6_fmt",
    "make_rule",
    "parse",
    "tcpremoteip",
]

ACTIONS = ("allow", "deny")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_OCTET_RE = re.compile(_OCTET + r"\Z")
_RANGE_RE = re.compile(rf"({_OCTET})-({_OCTET})\Z")
_VAR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_HOST_RE = re.compile(
    r"\.?[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*\Z"
)
MAX_HOST = 253  # characters of a DNS name in text, without the trailing dot (RFC 1035)
MAX_LABEL = 63
_INFO_RE = re.compile(r"[A-Za-z0-9._+-]+\Z")
_IPV6_CHARS_RE = re.compile(r"[0-9a-fA-F:.]+\Z")


class RulesError(ValueError):
    """A rule (or a rules file) is malformed; the message names the rule and the problem."""


@dataclass(frozen=True)
class Rule:
    """One validated rule. ``where`` names it in errors (``/etc/tcp/smtp line 3``,
    ``rules[2]``)."""

    address: str
    allow: bool
    env: tuple[tuple[str, str], ...] = ()
    where: str = "rule"

    @property
    def action(self) -> str:
        return "allow" if self.allow else "deny"

    @property
    def line(self) -> str:
        """The rule as one tcprules source line (no newline)."""
        return self.address + ":" + self.action + "".join(f',{k}="{v}"' for k, v in self.env)

    def cdb_keys(self) -> list[str]:
        """The cdb keys tcprules stores this rule under (ranges expanded)."""
        if "=" in self.address or "@" in self.address or "-" not in self.address:
            return [self.address]
        parts = self.address.split(".")
        for i, part in enumerate(parts):
            m = _RANGE_RE.match(part)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                return [".".join([*parts[:i], str(n), *parts[i + 1 :]]) for n in range(lo, hi + 1)]
        raise AssertionError(f"unvalidated range in {self.address!r}")  # pragma: no cover

    def data(self) -> bytes:
        """The cdb value tcprules stores: ``D\\0`` for deny, then ``+VAR=value\\0`` each."""
        out = b"" if self.allow else b"D\0"
        for name, value in self.env:
            out += b"+" + name.encode() + b"=" + value.encode() + b"\0"
        return out


@dataclass(frozen=True)
class Decision:
    """tcpserver's verdict for one client: the first matching key (None: no rule matched)."""

    allow: bool
    env: dict[str, str] = field(default_factory=dict)
    key: str | None = None


def _fail(where: str, text: str, problem: str) -> RulesError:
    return RulesError(f"{where} ({text!r}): {problem}")


def ip6_fmt(packed: bytes) -> str:
    """Format a 16-byte IPv6 address the way ucspi-tcp-ipv6's ip6_fmt (tcpserver) does.

    Unlike RFC 5952 (Python's ``compressed``), a single zero group is also compressed,
    and an IPv4-mapped address keeps its dotted tail.
    """
    if len(packed) != 16:
        raise ValueError("an IPv6 address has 16 bytes")
    groups = [(packed[i] << 8) | packed[i + 1] for i in range(0, 16, 2)]
    best_start, best_len, run_start = -1, 0, -1
    for i in range(9):
        if i < 8 and groups[i] == 0:
            if run_start < 0:
                run_start = i
        elif run_start >= 0:
            if i - run_start > best_len:
                best_start, best_len = run_start, i - run_start
            run_start = -1
    mapped = packed[:12] == b"\0" * 10 + b"\xff\xff"
    out = ""
    i = 0
    while i < 8:
        if i == 6 and mapped:
            out += ".".join(str(b) for b in packed[12:])
            break
        if i == best_start:
            out += "::" if i == 0 else ":"
            i += best_len
            continue
        out += f"{groups[i]:x}"
        if i < 7:
            out += ":"
        i += 1
    return out


def tcpremoteip(ip: str) -> str:
    """``ip`` as tcpserver puts it in TCPREMOTEIP: dotted quad for IPv4 and IPv4-mapped
    IPv6, ``ip6_fmt`` notation for other IPv6 (any ``%scope`` dropped)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        raise RulesError(f"not an IP address: {ip!r}") from None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return ip6_fmt(addr.packed)
    return str(addr)


def _check_ipv4(address: str) -> str | None:
    """Why ``address`` is not an IPv4 address, prefix or range tcprules handles well."""
    parts = address.split(".")
    prefix = parts[-1] == ""
    if prefix:
        parts = parts[:-1]
    if not parts or any(p == "" for p in parts):
        return "empty number between dots"
    if len(parts) > 4 or (prefix and len(parts) == 4):
        return "an IPv4 address has 4 numbers; a prefix has 1 to 3, each followed by a dot"
    if not prefix and len(parts) != 4:
        return (
            f"{address} is neither a full IPv4 address nor a prefix ending in '.' "
            f"(tcpserver only tries prefixes that end in a dot: write {address}.)"
        )
    ranges = 0
    for part in parts:
        if _OCTET_RE.match(part):
            continue
        m = _RANGE_RE.match(part)
        if m:
            ranges += 1
            if int(m.group(1)) > int(m.group(2)):
                return f"range {part} is empty (the first number must not exceed the second)"
            continue
        return (
            f"{part!r} is not a number from 0 to 255 written as tcpserver writes it "
            "(no leading zeros) nor a range like 10-20"
        )
    if ranges > 1:
        return "tcprules expands only one range per address"
    return None


def _check_ipv6(address: str) -> str | None:
    if not _IPV6_CHARS_RE.match(address):
        return "an IPv6 address or prefix has only hex digits and colons"
    # A prefix is checked on an address that completes it: its formatted form must still
    # start with the prefix, or tcpserver can never write an address that matches.
    candidates = [address + "1", address + "1::"] if address.endswith(":") else [address]
    for candidate in candidates:
        try:
            formatted = tcpremoteip(candidate)
        except RulesError:
            continue
        if ":" not in formatted:
            return f"tcpserver turns IPv4-mapped addresses into IPv4: write {formatted}"
        if address.endswith(":"):
            if formatted.startswith(address):
                return None
            return (
                f"prefix {address} never matches: tcpserver writes addresses in lower case, "
                "without leading zeros, with '::' for the longest run of zero groups"
            )
        if formatted == address:
            return None
        return f"tcpserver writes this address as {formatted}; use that form"
    return "not an IPv6 address, nor an IPv6 prefix ending in ':'"


def _check_host(host: str) -> str | None:
    """Why ``=host`` can never match a client's name (None if it can). The name compared is
    the forward-confirmed name of the client's PTR record (pyqmail-smtpd's tcpserver -p,
    ``pyqmail.smtpd.remotehost``): lower case, without the root's trailing dot, so a rule
    in another spelling would silently never match; it is refused naming the spelling."""
    if host == "":
        return None
    fixed = host.lower().removesuffix(".")
    if host.endswith(".") and fixed:
        return f"host names have no trailing dot in TCPREMOTEHOST: write ={fixed}"
    if host != fixed:
        return f"tcpserver sees host names in lower case: write ={fixed}"
    if not _HOST_RE.match(host):
        return (
            f"={host} is not a host name (letters, digits, '-', '_' and dots) "
            "nor a domain suffix starting with '.'"
        )
    labels = host.removeprefix(".").split(".")
    if len(host.removeprefix(".")) > MAX_HOST or any(len(label) > MAX_LABEL for label in labels):
        return f"a DNS name has at most {MAX_HOST} characters, {MAX_LABEL} between two dots"
    if labels[-1].isdigit():
        return (
            "no host name ends in a number (a PTR name that does is never used): for an IP "
            "address or prefix, write it without '='"
        )
    return None


def _check_address(address: str) -> str | None:
    """Why tcprules/tcpserver would mishandle ``address``, or None if it is fine."""
    if address == "":
        return None
    if any(c.isspace() or not c.isprintable() for c in address):
        return "the address contains whitespace or control characters"
    if '"' in address or "," in address:
        return "the address contains a quote or a comma"
    if "@" in address:
        info, _at, rest = address.partition("@")
        if not _INFO_RE.match(info):
            return f"{info!r} is not a TCPREMOTEINFO user name (letters, digits, . _ + -)"
        if rest.startswith("="):
            if rest == "=" or rest.startswith("=."):
                return "tcpserver tries only info@=<full host name>, no suffixes"
            return _check_host(rest[1:])
        if "-" in rest:
            return "tcprules does not expand ranges in info@address rules"
        problem = _check_ipv6(rest) if ":" in rest else _check_ipv4(rest)
        if problem is None and (rest.endswith((".", ":"))):
            return "tcpserver tries only info@<full address>, no prefixes"
        return problem
    if address.startswith("="):
        return _check_host(address[1:])
    if ":" in address:
        return _check_ipv6(address)
    return _check_ipv4(address)


def _check_value(value: str) -> str | None:
    if '"' in value:
        return "a double quote cannot appear inside a value (it ends the value in tcprules)"
    if any(not c.isprintable() for c in value):
        return "control characters (newline, NUL, tab, ...) cannot appear in a value"
    return None


def address_problem(address: str) -> str | None:
    """Why tcprules/tcpserver would mishandle ``address`` (None if fine), for callers that
    name the rule their own way (the roles' inventory preflight)."""
    return _check_address(address)


def env_problem(name: str, value: str) -> str | None:
    """Why ``name="value"`` cannot be a tcprules variable (None if fine); see ``make_rule``."""
    if not _VAR_RE.match(name):
        return f"bad variable name {name!r}: letters, digits and '_', not starting with a digit"
    return _check_value(value)


def make_rule(
    address: str,
    action: str,
    env: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    where: str = "rule",
    text: str | None = None,
) -> Rule:
    """Validate one rule given as data; raise RulesError naming ``where`` and the rule
    (``text``, by default the rule as a source line)."""
    pairs = list(env.items() if isinstance(env, Mapping) else env)
    if text is None:
        text = f"{address}:{action}" + "".join(f',{k}="{v}"' for k, v in pairs)
    if not isinstance(address, str):
        raise _fail(where, text, "the address must be a string")
    if action not in ACTIONS:
        raise _fail(where, text, f"action must be allow or deny, not {action!r}")
    problem = _check_address(address)
    if problem:
        raise _fail(where, text, f"bad address {address!r}: {problem}")
    seen: set[str] = set()
    for name, value in pairs:
        if not isinstance(name, str) or not _VAR_RE.match(name):
            raise _fail(
                where,
                text,
                f"bad variable name {name!r}: letters, digits and '_', not starting with a digit",
            )
        if name in seen:
            raise _fail(where, text, f"variable {name} is set twice")
        seen.add(name)
        if not isinstance(value, str):
            raise _fail(where, text, f"the value of {name} must be a string")
        problem = _check_value(value)
        if problem:
            raise _fail(where, text, f"bad value for {name}: {problem}")
    return Rule(address, action == "allow", tuple(pairs), where)


def _parse_line(line: str, where: str) -> Rule:
    text = line
    if "\0" in line:
        raise _fail(where, text, "NUL byte in the line")
    if "\r" in line:
        raise _fail(where, text, "carriage return in the line (DOS line endings?)")
    if line[0] in " \t":
        raise _fail(where, text, "leading whitespace (tcprules would make it part of the address)")
    line = line.rstrip(" \t")
    # ucspi-tcp-ipv6 splits at the first colon followed by allow/deny; for addresses
    # without a colon that is the first colon, as in the IPv4-only tcprules.
    colon = -1
    pos = line.find(":")
    while pos >= 0:
        if line.startswith(ACTIONS, pos + 1):
            colon = pos
            break
        pos = line.find(":", pos + 1)
    if colon < 0:
        if ":" not in line:
            raise _fail(
                where,
                text,
                "no ':' between address and instructions (tcprules skips such lines silently)",
            )
        raise _fail(where, text, "the instructions after ':' must start with allow or deny")
    address, rest = line[:colon], line[colon + 1 :]
    action = "allow" if rest.startswith("allow") else "deny"
    rest = rest[len(action) :]
    env: list[tuple[str, str]] = []
    while rest:
        if rest[0] != ",":
            raise _fail(where, text, f"expected ',VAR=\"value\"' after {action}, found {rest!r}")
        eq = rest.find("=")
        if eq < 0:
            raise _fail(where, text, f"{rest!r}: variable without '=' and a quoted value")
        name = rest[1:eq]
        rest = rest[eq + 1 :]
        if not rest:
            raise _fail(where, text, f'variable {name} has no value (write {name}="")')
        delim = rest[0]
        if delim.isalnum() or delim.isspace() or not delim.isprintable():
            raise _fail(
                where,
                text,
                f'the value of {name} must be quoted: {name}="{rest}" (tcprules '
                f"would take {delim!r} as the quote character)",
            )
        end = rest.find(delim, 1)
        if end < 0:
            raise _fail(where, text, f"unbalanced quote {delim} in the value of {name}")
        env.append((name, rest[1:end]))
        rest = rest[end + 1 :]
    return make_rule(address, action, env, where, text)


def parse(text: str, source: str = "<rules>") -> list[Rule]:
    """Parse a tcprules source file strictly; errors name ``source``, the line and its text."""
    rules: list[Rule] = []
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip(" \t") == "" or line.startswith("#"):
            continue
        rules.append(_parse_line(line, f"{source} line {number}"))
    check_duplicates(rules)
    return rules


def check_duplicates(rules: Sequence[Rule]) -> None:
    """Refuse two rules with the same key: tcpserver would only ever see the first."""
    owner: dict[str, Rule] = {}
    for rule in rules:
        for key in rule.cdb_keys():
            first = owner.setdefault(key, rule)
            if first is not rule:
                raise _fail(
                    rule.where,
                    rule.line,
                    f"address {key or '(default)'} is already used by {first.where} "
                    f"({first.line!r}); tcpserver would only ever use the first",
                )


def format_source(rules: Iterable[Rule], header: str = "") -> str:
    """The tcprules source text: ``header`` (each line made a comment), then one rule a line."""
    lines = [("# " + h if h else "#") if not h.startswith("#") else h for h in header.splitlines()]
    lines.extend(rule.line for rule in rules)
    return "".join(line + "\n" for line in lines)


def compile_rules(rules: Sequence[Rule]) -> bytes:
    """The cdb bytes tcprules writes for ``rules`` (in order, ranges expanded)."""
    check_duplicates(rules)
    return make((key.encode(), rule.data()) for rule in rules for key in rule.cdb_keys())


def candidates(ip: str, hostname: str | None = None, info: str | None = None) -> Iterator[str]:
    """The keys tcpserver tries for a client, in order (rules.c ``doit``)."""
    remote = tcpremoteip(ip)
    host = hostname.lower().removesuffix(".") if hostname else None
    if info:
        yield f"{info}@{remote}"
        if host:
            yield f"{info}@={host}"
    yield remote
    if host:
        yield "=" + host
    for end in range(len(remote), 0, -1):
        if remote[end - 1] in ".:":
            yield remote[:end]
    if host:
        for i, c in enumerate(host):
            if c == ".":
                yield "=" + host[i:]
        yield "="
    yield ""


def _decide(data: bytes, key: str) -> Decision:
    """Interpret a cdb value as tcpserver's ``found`` does (entries end in NUL)."""
    env: dict[str, str] = {}
    for entry in data.split(b"\0")[:-1]:
        if entry.startswith(b"D"):
            return Decision(False, {}, key)
        if entry.startswith(b"+") and b"=" in entry:
            name, _eq, value = entry[1:].partition(b"=")
            env[name.decode(errors="surrogateescape")] = value.decode(errors="surrogateescape")
    return Decision(True, env, key)


class Rules:
    """A compiled rules cdb, looked up the way tcpserver does.

    ``names``: whether any key is a host name (``=host``, ``=.domain``, ``=``), found once
    per load. Only then does a client's host name matter, so only then is it looked up
    (a PTR and a forward query per client, before the greeting): every other cdb costs
    nothing more per connection than tcpserver -H."""

    def __init__(self, db: CDB) -> None:
        self.db = db
        self.names = any(key.startswith(b"=") for key, _data in db.items())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Rules:
        """Read a compiled rules cdb; OSError if unreadable, RulesError if corrupt."""
        try:
            return cls(CDB.open(path))
        except CDBError as exc:
            raise RulesError(str(exc)) from exc

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<rules cdb>") -> Rules:
        try:
            return cls(CDB.from_bytes(data, name))
        except CDBError as exc:
            raise RulesError(str(exc)) from exc

    @classmethod
    def from_rules(cls, rules: Sequence[Rule]) -> Rules:
        return cls.from_bytes(compile_rules(rules))

    def name_matters(self, ip: str) -> bool:
        """Whether the client's host name can change its decision: the cdb has host-name
        keys and no key for the client's exact address, the one key tcpserver tries before
        ``=host`` (a relay client listed by address is never kept waiting for DNS)."""
        return self.names and self.db.get(tcpremoteip(ip).encode()) is None

    def lookup(self, ip: str, hostname: str | None = None, info: str | None = None) -> Decision:
        """tcpserver's decision for a client at ``ip`` (any notation; IPv4-mapped IPv6 is
        treated as IPv4), with its reverse-DNS ``hostname`` and ident ``info`` if known.

        The host name is lower-cased and loses a trailing dot, as tcpserver's DNS code
        delivers it; ``None`` or ``""`` means unknown (no ``=`` rules apply)."""
        for key in candidates(ip, hostname, info):
            data = self.db.get(key.encode(errors="surrogateescape"))
            if data is not None:
                return _decide(data, key)
        return Decision(True, {}, None)
