"""ARC (RFC 8617) chain verification, through dkimpy (python3-dkim), informational only.

The result goes into the Authentication-Results header (``arc=pass|fail|none``) and the log
line; it never changes the verdict here (a forwarder's chain vouches for results it saw, a
local policy on top of DMARC would decide what that is worth). Bounded like DKIM: at most
``MAX_SETS`` ARC sets are looked at (RFC 8617 allows 50), keys through the same lookup and
deadline (``dkimverify._KeyLookup``); a key that cannot be fetched in time fails the chain.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import dkim
import dns.resolver

from pyqmail.checks.dkimverify import QUIET, KeyLookup, KeyLookupTempError

MAX_SETS = 10
_SEAL = re.compile(rb"(?im)^arc-seal[ \t]*:")


@dataclass(frozen=True)
class ArcResult:
    """``result``: pass, fail or none (RFC 8617 4.4), and why."""

    result: str
    reason: str = ""


def verify(message: bytes, res: dns.resolver.Resolver, budget: float = 5.0) -> ArcResult:
    """The ARC chain's validation status of ``message``."""
    head = re.split(rb"\r?\n\r?\n", message, maxsplit=1)[0]
    seals = len(_SEAL.findall(head))
    if seals == 0:
        return ArcResult("none")
    if seals > MAX_SETS:
        return ArcResult("fail", f"over {MAX_SETS} ARC sets")
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
