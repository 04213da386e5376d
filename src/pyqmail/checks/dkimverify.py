"""DKIM verification (RFC 6376; Ed25519: RFC 8463) of every signature of a message.

Through dkimpy (python3-dkim), with our own key lookup: the resolver of the daemon
(``control/dnsresolver``), each lookup within the time left of the check's budget. Each
signature gets its own result, so a failing one never hides a passing one (RFC 6376 6.1).

Bounded work whatever the sender writes (RFC 8301, and the issue's fuzz cases):
- at most ``MAX_SIGNATURES`` signatures are verified; the rest are ``policy`` results;
- a key record longer than ``MAX_KEY_RECORD`` (far past an 8192-bit RSA key) is refused
  before it is parsed, an RSA key under 1024 bits fails (dkimpy's ``minkey``);
- a signature with ``l=`` is never trusted (``policy``: appended text would ride on it);
- dkimpy is never given a header section of more than ``MAX_HEADER_FIELDS`` fields or
  ``HEADER_SIZE_LIMIT`` bytes (100 KiB, Postfix's ``header_size_limit``), nor a signature
  whose ``h=`` lists more than ``MAX_SIGNED_NAMES`` names: each is ``permerror`` unverified.
  dkimpy's ``select_headers`` walks the header list backwards once per name of ``h=``,
  so a signature listing N absent names on a message of N fields cost O(N^2) in pure
  Python, holding the GIL and a check thread after ``inbound.run`` had answered (8,000
  names and fields, 92 KB: 5 s), with nothing but the sender's own key and body hash. The
  bounds keep that under 10 ms a signature; no real signature comes near them (see there);
- the whole verification stops at the deadline; what is left is ``temperror``.

What a signature must be to pass, beyond dkimpy's own checks (which make some of them only
when signing): ``h=`` names From (RFC 6376 5.4, 6.1.1: a signature that does not sign From
MUST be ignored; one that did not would make any text under any From align) and ``a=`` is
not ``rsa-sha1`` (RFC 8301 3.1: verifiers MUST NOT consider such signatures valid); else
``permerror``, unverified.

What DMARC relies on: the d= and s= reported are the ones dkimpy verified (read by its own
tag parser: tag names are case-sensitive and a duplicate tag invalidates the signature,
RFC 6376 3.2, so an ``D=`` cannot stand in for ``d=``). A ``temperror`` names its d= only
when that domain's DNS failed (timeout, SERVFAIL): a key name that is no DNS name
(``s=a..b``, a 64-byte label, ``d=bank.example.`` with its trailing dot) is ``permerror``
(RFC 6376 6.1.1), and a lookup cut short because the signatures before it spent the budget
is a ``temperror`` without a domain. Otherwise a signature in someone else's name, failing
for a reason its author chose, would align as a temperror and turn that domain's DMARC
reject into an accept.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass

import dkim
import dkim.util
import dns.exception
import dns.name
import dns.resolver

from pyqmail.headers import HEADER_SIZE_LIMIT

MAX_SIGNATURES = 8
# Names in one h=: dkimpy's list of fields to sign has 28, pyqmail's signer lists each
# present field as often as it occurs and over-signs the single-instance ones once more;
# 128 leaves room for a signer that over-signs all of dkimpy's list with a few repeated
# fields, and 128 names on 1000 fields cost dkimpy some 20 ms (64: 10 ms, measured).
MAX_SIGNED_NAMES = 128
MAX_HEADER_FIELDS = 1000  # fields of a header section dkimpy is given (real mail: 20 to 100)
MAX_KEY_RECORD = 2048  # bytes of a DKIM key TXT record (8192-bit RSA: about 1.4 KB)
QUIET = logging.getLogger("pyqmail.checks.dkimpy")
QUIET.addHandler(logging.NullHandler())
QUIET.propagate = False
_EMPTY_LINE = re.compile(rb"\n\r?\n")  # the header section's end, as dkimpy splits lines
_FIELD_START = re.compile(rb"\n[^ \t]")  # a line that is not a continuation
_SIGNATURE = re.compile(rb"(?im)^dkim-signature[ \t]*:")


class KeyLookupTempError(Exception):
    """A key lookup that timed out or failed: temperror, not fail (RFC 6376 6.1.2).
    ``spent``: the time budget ended it, not the key's DNS (other signatures used it up)."""

    def __init__(self, text: str, spent: bool = False) -> None:
        super().__init__(text)
        self.spent = spent


@dataclass(frozen=True)
class DkimResult:
    """One signature's result (RFC 8601 dkim= values) and its d=, s=, a= and b= start."""

    result: str  # pass, fail, neutral, policy, temperror, permerror
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    b: str = ""  # the first 8 characters of b= (RFC 6008 header.b)
    reason: str = ""


def _tags(value: bytes) -> dict[bytes, bytes] | None:
    """The tag=value pairs of a DKIM-Signature exactly as dkimpy reads them (its parser:
    ``D=`` is not ``d=``, RFC 6376 3.2); None when dkimpy refuses the list (a duplicate
    tag, a part that is no tag=value), so no d= of a signature it never verified is
    reported."""
    try:
        tags: dict[bytes, bytes] = dkim.util.parse_tag_value(value)
    except dkim.util.InvalidTagValueList:
        return None
    return tags


def _head_end(message: bytes) -> int:
    """Where the header section of ``message`` ends, as dkimpy reads it (lines split at
    LF or CRLF, up to the first empty one)."""
    if message.startswith((b"\n", b"\r\n")):
        return 0
    m = _EMPTY_LINE.search(message)
    return len(message) if m is None else m.start()


def oversized(message: bytes) -> str | None:
    """Why the header section of ``message`` is not given to dkimpy (over
    ``HEADER_SIZE_LIMIT`` bytes or ``MAX_HEADER_FIELDS`` fields), None when it may be.
    Linear: a C-speed search and count."""
    end = _head_end(message)
    if end > HEADER_SIZE_LIMIT:
        return f"header section over {HEADER_SIZE_LIMIT} bytes"
    if len(_FIELD_START.findall(message, 0, end)) >= MAX_HEADER_FIELDS:
        return f"header section over {MAX_HEADER_FIELDS} fields"
    return None


def signed_names(h: bytes) -> list[bytes]:
    """The names of an ``h=`` value in lower case, as dkimpy splits them."""
    return [name.lower() for name in re.split(rb"\s*:\s*", h.strip())]


def refusal(tags: dict[bytes, bytes]) -> str | None:
    """Why a signature with ``tags`` is ``permerror`` before any work is done on it (an
    ``a=rsa-sha1``, an ``h=`` over ``MAX_SIGNED_NAMES`` names or without From), None when
    it goes to dkimpy."""
    if tags.get(b"a", b"").strip().lower() == b"rsa-sha1":
        return "rsa-sha1 is not valid (RFC 8301 3.1)"
    names = signed_names(tags.get(b"h", b""))
    if len(names) > MAX_SIGNED_NAMES:
        return f"h= lists over {MAX_SIGNED_NAMES} names"
    if b"from" not in names:
        return "From not signed (RFC 6376 6.1.1)"
    return None


class KeyLookup:
    """dkimpy's key lookup: TXT through the resolver within the deadline, each lookup at
    most ``each`` seconds. A missing key, a key name that is no DNS name (an empty or
    over-long label, non-ASCII: RFC 6376 6.1.1 makes such a signature unusable, not
    retryable) or an over-long record (refused unparsed) is remembered in ``problem``:
    permerror, not fail (RFC 8601 2.7.1). Only DNS that does not answer is temporary."""

    def __init__(self, res: dns.resolver.Resolver, deadline: float, each: float = math.inf):
        self.res = res
        self.deadline = deadline
        self.each = each
        self.problem = ""

    def __call__(self, name: bytes, timeout: float = 5) -> bytes:
        """The key record of ``name`` (b"" when there is no usable one)."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise KeyLookupTempError("time budget spent", spent=True)
        try:
            qname = dns.name.from_text(name.decode("ascii"))
        except (UnicodeDecodeError, dns.exception.DNSException) as exc:
            self.problem = f"key name is no DNS name ({type(exc).__name__})"
            return b""
        lifetime = min(timeout, self.each)
        try:
            answer = self.res.resolve(qname, "TXT", search=False, lifetime=min(left, lifetime))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            self.problem = "no key"
            return b""
        except dns.exception.Timeout:
            if left < lifetime:  # cut short: the signatures before this one spent the time
                raise KeyLookupTempError("time budget spent", spent=True) from None
            raise KeyLookupTempError("Timeout") from None
        except dns.exception.DNSException as exc:
            raise KeyLookupTempError(f"{type(exc).__name__}") from None
        records = [b"".join(r.strings) for r in answer]
        if len(records) != 1:
            self.problem = "not one key record"
            return b""
        if len(records[0]) > MAX_KEY_RECORD:
            self.problem = f"key record over {MAX_KEY_RECORD} bytes"
            return b""
        return records[0]


def _one(signer: dkim.DKIM, index: int, tags: dict[bytes, bytes], lookup: KeyLookup) -> DkimResult:
    """The result of signature ``index`` (its tags already parsed, as dkimpy parses them)."""
    base = {
        "domain": tags.get(b"d", b"").decode("ascii", "replace").lower(),
        "selector": tags.get(b"s", b"").decode("ascii", "replace"),
        "algorithm": tags.get(b"a", b"").decode("ascii", "replace"),
        "b": re.sub(rb"\s+", b"", tags.get(b"b", b""))[:8].decode("ascii", "replace"),
    }
    if b"l" in tags:
        return DkimResult("policy", reason="l= not trusted", **base)
    why = refusal(tags)
    if why is not None:
        return DkimResult("permerror", reason=why, **base)
    lookup.problem = ""
    try:
        ok = signer.verify(idx=index, dnsfunc=lookup)
    except KeyLookupTempError as exc:
        if exc.spent:  # no d=: a timeout the signer arranged must not align (see above)
            return DkimResult("temperror", reason="time budget spent")
        return DkimResult("temperror", reason=f"key lookup: {exc}", **base)
    except dkim.ValidationError as exc:
        return DkimResult("fail", reason=str(exc)[:80], **base)
    except (dkim.DKIMException, ValueError, TypeError, KeyError, IndexError) as exc:
        return DkimResult("permerror", reason=f"{type(exc).__name__}: {exc}"[:80], **base)
    if (signer.domain, signer.selector) != (tags.get(b"d"), tags.get(b"s")):
        return DkimResult("permerror", reason="dkimpy verified another d= or s=")
    if not ok and lookup.problem:
        return DkimResult("permerror", reason=lookup.problem, **base)
    return DkimResult("pass" if ok else "fail", **base)


def verify(message: bytes, res: dns.resolver.Resolver, budget: float = 10.0) -> list[DkimResult]:
    """The result of each DKIM signature of ``message`` (top first); [] when unsigned. A key
    lookup takes at most half the budget, so one signature's silent DNS leaves another the
    time its own lookup needs. A header section dkimpy is not given (``oversized``) with a
    signature in it: one ``permerror``, naming no domain."""
    too_large = oversized(message)
    if too_large is not None:
        signed = _SIGNATURE.search(message, 0, _head_end(message))
        return [DkimResult("permerror", reason=too_large)] if signed else []
    try:
        signer = dkim.DKIM(message, logger=QUIET, minkey=1024, timeout=max(int(budget), 1))
    except dkim.DKIMException as exc:
        return [DkimResult("permerror", reason=f"message: {exc}"[:80])]
    fields = [v for n, v in signer.headers if n.lower() == b"dkim-signature"]
    if not fields:
        return []
    deadline = time.monotonic() + budget
    lookup = KeyLookup(res, deadline, each=budget / 2)
    results = []
    for index, field in enumerate(fields):
        tags = _tags(field)
        if index >= MAX_SIGNATURES:
            results.append(DkimResult("policy", reason=f"over {MAX_SIGNATURES} signatures"))
        elif tags is None:
            results.append(DkimResult("permerror", reason="tag list dkimpy refuses"))
        elif time.monotonic() >= deadline:
            results.append(DkimResult("temperror", reason="time budget spent"))
        else:
            results.append(_one(signer, index, tags, lookup))
    return results
