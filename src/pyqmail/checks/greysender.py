"""The envelope sender as greylisting keys it: one key for a sender whose address changes with
every message.

Why its own module: these rewrites are greylisting's alone (``pyqmail.checks.greylist``), and
each is a small parser of a scheme other software defines. Taken raw, a BATV sender
(``prvs=1234abcdef=user@example.com``, a new tag every day and message), an SRS one (the
forwarder's ``SRS0=HHH=TT=orig.example=user@fwd.example``, a new hash and timestamp every
time) or a VERP one (``bounce-1001-4711@lists.example``: a number per message or recipient)
never comes back as the same triplet: every message waits out the delay, and a mailing
list is delayed for ever. As postgrey does (``do_sender_substitutions``), plus SRS:

1. lower case; no ``@`` (the null sender ``<>`` included): as it is
2. SRS undone: ``SRS0=hash=tt=domain=local@forwarder`` is ``local@domain``; ``SRS1=hash=
   forwarder==hash=tt=domain=local@...`` the same after its ``==`` (the separator after
   ``SRS0``/``SRS1`` may be ``=``, ``+`` or ``-``); a malformed one stays as it is
3. a BATV tag dropped: ``prvs=TAG=`` (RFC draft, also ``msprvs1=``) and Barracuda's
   ``btv1==TAG==`` before the local part
4. a ``+extension`` dropped (Postfix-style VERP ``list+user=dom@``)
5. every run of digits in the local part made one ``#`` (``bounce-#-#``)

The domain is never rewritten (after SRS, the original sender's): the client store keys on
it. What this costs: ``user1@`` and ``user2@`` of one domain and network share a triplet.
"""

from __future__ import annotations

import re

_SRS0 = re.compile(r"srs0[=+-][^=]*=[^=]*=([^=]+)=(.+)\Z")  # hash, timestamp, domain, local
_SRS1 = re.compile(r"srs1[=+-][^=]*=[^=]*==(.+)\Z")  # hash, first forwarder, then SRS0's rest
_BATV = re.compile(r"(?:prvs|msprvs1)=[0-9a-z]+=|btv1==[0-9a-z]+==")
_DIGITS = re.compile(r"[0-9]+")


def _unsrs(local: str) -> tuple[str, str] | None:
    """(local, domain) of the original sender of an SRS address's local part, or None."""
    one = _SRS1.match(local)
    if one is not None:
        rest = one.group(1)
        local = f"srs0={rest}" if rest.count("=") >= 3 else local
    zero = _SRS0.match(local)
    if zero is None or not zero.group(2):
        return None
    return zero.group(2), zero.group(1)


def normalise(sender: str) -> str:
    """The sender as the triplet and the client store key it (the module's docstring)."""
    addr = sender.lower()
    local, at, domain = addr.rpartition("@")
    if not at or not local:
        return addr
    original = _unsrs(local)
    if original is not None:
        local, domain = original
    local = _BATV.sub("", local, count=1) if _BATV.match(local) else local
    local = local.split("+", 1)[0] or local
    return f"{_DIGITS.sub('#', local)}@{domain}"
