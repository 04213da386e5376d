"""ARC (RFC 8617) chain verification, through dkimpy (python3-dkim), informational only.

The result goes into the Authentication-Results header (``arc=pass|fail|none``) and the log
line; it never changes the verdict here (a forwarder's chain vouches for results it saw, a
local policy on top of DMARC would decide what that is worth). Bounded like DKIM: at most
``MAX_SETS`` ARC sets are looked at (RFC 8617 allows 50), keys through the same lookup and
deadline (``dkimverify.KeyLookup``); a key that cannot be fetched in time fails the chain.
The header bounds of DKIM hold here too (``dkimverify.oversized``, ``MAX_SIGNED_NAMES`` for
an ARC-Message-Signature's ``h=``): dkimpy selects an AMS's header fields as it does a
DKIM signature's, at the same quadratic cost; past them the chain fails unverified.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import dkim
import dkim.util
import dns.resolver

from pyqmail.checks.dkimverify import (
    MAX_SIGNED_NAMES,
    QUIET,
    KeyLookup,
    KeyLookupTempError,
    oversized,
    signed_names,
)

MAX_SETS = 10
_SEAL = re.compile(rb"(?im)^arc-seal[ \t]*:")
_AMS = re.compile(rb"(?im)^arc-message-signature[ \t]*:(.*+(?:\r?\n[ \t].*+)*+)")


@dataclass(frozen=True)
class ArcResult:
    """``result``: pass, fail or none (RFC 8617 4.4), and why."""

    result: str
    reason: str = ""


def _too_many_names(value: bytes) -> bool:
    """Whether an ARC-Message-Signature value's ``h=`` lists over ``MAX_SIGNED_NAMES`` names
    (a tag list dkimpy refuses is left to it: it fails the chain without selecting)."""
    try:
        tags = dkim.util.parse_tag_value(value)
    except dkim.util.InvalidTagValueList:
        return False
    return len(signed_names(tags.get(b"h", b""))) > MAX_SIGNED_NAMES


def verify(message: bytes, res: dns.resolver.Resolver, budget: float = 5.0) -> ArcResult:
    """The ARC chain's validation status of ``message``."""
    head = re.split(rb"\r?\n\r?\n", message, maxsplit=1)[0]
    seals = len(_SEAL.findall(head))
    if seals == 0:
        return ArcResult("none")
    if seals > MAX_SETS:
        return ArcResult("fail", f"over {MAX_SETS} ARC sets")
    too_large = oversized(message)
    if too_large is not None:
        return ArcResult("fail", too_large)
    if any(_too_many_names(value) for value in _AMS.findall(head)):
        return ArcResult("fail", f"ARC-Message-Signature h= lists over {MAX_SIGNED_NAMES} names")
    lookup = KeyLookup(res, time.monotonic() + budget)
    try:
        cv, _results, reason = dkim.arc_verify(
            message, logger=QUIET, dnsfunc=lookup, minkey=1024, timeout=max(int(budget), 1)
        )
    except KeyLookupTempError as exc:
        return ArcResult("fail", f"key lookup: {exc}")
    except (dkim.DKIMException, ValueError, TypeError, KeyError, IndexError) as exc:
        return ArcResult("fail", f"{type(exc).__name__}: {exc}"[:80])
    if cv == dkim.CV_Pass:
        return ArcResult("pass")
    if cv == dkim.CV_None:
        return ArcResult("none", str(reason)[:80])
    return ArcResult("fail", str(reason)[:80])
