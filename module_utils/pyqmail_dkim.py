# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""DKIM selectors and their rotation: the rules and the schedule, without any key material.

Shared by the module ``library/pyqmail_dkim_key.py`` (on the host) and the inventory checks
(the rows of ``module_utils/pyqmail_inventory.py`` in ``pyqmail_signing.py`` and
``pyqmail_control.py``, on the controller), so the preflight refuses exactly what the module
would refuse later. Nothing here imports ``cryptography``.

The schedule (everything in UTC; a *generation* is one RSA and one Ed25519 key made together,
sharing their dates):

- the first generation of a domain signs at once (nothing signs before it);
- rotation off (``rotate_days`` 0): the signing generation signs and stays published forever;
- rotation on: the signing generation signs until ``signs_from + rotate_days``. From
  ``prepublish_days`` before that, a run makes the next generation, which is published (in the
  records) but signs only from then; a generation made late (no run in time) starts signing
  ``prepublish_days`` after it was made, and the old one signs until then - a key never signs
  before it has been in the records for ``prepublish_days``;
- the first run at or after ``signs_until`` retires a generation: it stops signing (it leaves
  ``control/dkimkeys``) and stays in the records ``retire_days`` more (``published_until``);
- the first run at or after ``published_until`` removes its key files and forgets it.

The schedule only moves when the playbook runs: run it at least daily when rotation is on.
Turning rotation off keeps the signing generation forever and drops a pre-published one that
never signed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

ALGORITHMS = {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}
STATE_VERSION = 1
MAX_ROTATE_DAYS = 3650
MAX_DAYS = 365
RSA_BITS = (2048, 4096)  # RFC 8301: sign with >= 2048; verifiers must handle up to 4096
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
DOMAIN_RE = re.compile(rf"({_LABEL}\.)+{_LABEL}\Z")
LABEL_RE = re.compile(rf"{_LABEL}\Z")
PREFIX_RE = re.compile(r"[a-z]([a-z0-9-]{0,29})\Z")
# Names that can never receive mail from the internet: no key for them by default.
LOCAL_ONLY_RE = re.compile(
    r"(\A[^.]+\Z)|(\.|\A)(localhost|localdomain|local|invalid|internal|home\.arpa)\Z"
)


class DkimError(Exception):
    """A problem with the options, the state file or a key file: the message says which."""


# ---- checks shared with the preflight -------------------------------------------------------


def domain_problem(value: str) -> str | None:
    """Why ``value`` cannot be a signing domain (a lower-case DNS name of two labels or more)."""
    if not isinstance(value, str) or len(value) > 253 or not DOMAIN_RE.match(value):
        return (
            f"{value!r} is not a DNS domain name (lower-case labels of letters, digits and "
            "'-', at least two, separated by dots)"
        )
    return None


def prefix_problem(value: str) -> str | None:
    """Why ``value`` cannot start a selector (a DNS label: <prefix><yyyymmdd>[b-z]-ed25519)."""
    if not isinstance(value, str) or not PREFIX_RE.match(value):
        return (
            f"{value!r} is not a selector prefix: 1 to 30 characters, a lower-case letter "
            "first, then letters, digits or '-' (the selector must be one DNS label)"
        )
    return None


HOST_LABEL_MAX = 20  # <label>-<yyyymmdd>[b-z]-ed25519: 39 characters at most, one DNS label
_NOT_LDH = re.compile(r"[^a-z0-9]+")


def host_prefix(host: str) -> str:
    """The default selector prefix of an inventory host: its short name (up to the first dot;
    an IP address whole) as a DNS label, then ``-``: ``mx1.example.org`` -> ``mx1-``.

    Why per host: each host makes its own keys, so two hosts signing for one domain (several
    MX or submission hosts with the same local domain) made the same selector names on the
    same day, ``s20261202-rsa``, with different keys: two TXT records at one name, which
    verifiers reject. Lower-case letters, digits and ``-``; an ``h`` in front when the name
    does not start with a letter; a name longer than ``HOST_LABEL_MAX`` is cut and given 4
    hex digits of its SHA-256 so that long names sharing a start still differ. Names that
    come out the same (``mx_1`` and ``mx-1``) are caught by the DNS zone, which refuses one
    selector with two keys."""
    text = str(host).strip().lower().rstrip(".")
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        text = text.split(".", 1)[0]
    label = _NOT_LDH.sub("-", text).strip("-")
    if not label[:1].isalpha():
        label = f"h{label}".rstrip("-") if label else "h"
    if len(label) > HOST_LABEL_MAX:
        digest = hashlib.sha256(str(host).encode()).hexdigest()[:4]
        label = f"{label[: HOST_LABEL_MAX - 5].rstrip('-')}-{digest}"
    return f"{label}-"


def rotation_problem(rotate_days: int, prepublish_days: int, retire_days: int) -> str | None:
    """Why these three periods do not make a usable schedule, naming the offending one."""
    if not 1 <= prepublish_days <= MAX_DAYS:
        return f"prepublish_days: {prepublish_days} is out of range: must be from 1 to {MAX_DAYS}"
    if not 1 <= retire_days <= MAX_DAYS:
        return f"retire_days: {retire_days} is out of range: must be from 1 to {MAX_DAYS}"
    if rotate_days != 0 and not prepublish_days + 1 <= rotate_days <= MAX_ROTATE_DAYS:
        return (
            f"rotate_days: {rotate_days} is out of range: 0 (no rotation) or from "
            f"prepublish_days + 1 ({prepublish_days + 1}) to {MAX_ROTATE_DAYS}"
        )
    return None


def rsa_bits_problem(bits: int) -> str | None:
    """RFC 8301: 2048 bits at least for signing; 4096 the most verifiers must accept."""
    if not RSA_BITS[0] <= bits <= RSA_BITS[1] or bits % 8:
        return f"{bits} is out of range: a multiple of 8 from {RSA_BITS[0]} to {RSA_BITS[1]}"
    return None


def virtual_keys(text: str) -> list[str]:
    """The domain keys of a control/virtualdomains text (``domain:prefix`` lines)."""
    keys = []
    for line in text.splitlines():
        key, sep, _value = line.strip().rpartition(":")
        if sep and key and not line.lstrip().startswith("#") and "@" not in key:
            keys.append(key.lower())
    return keys


def is_local(domain: str, locals_: Iterable[str], virtual: Iterable[str]) -> bool:
    """``domain`` is delivered here: in control/locals, or a virtual domain (``.x`` = below x)."""
    domain = domain.lower()
    if domain in {d.lower() for d in locals_}:
        return True
    return any(domain == key or (key.startswith(".") and domain.endswith(key)) for key in virtual)


# ---- the state ------------------------------------------------------------------------------


def iso(when: dt.datetime) -> str:
    """UTC timestamp as the state file stores it."""
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str, what: str) -> dt.datetime:
    """An ISO 8601 time (``Z`` or an offset; naive = UTC) as an aware datetime."""
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (TypeError, ValueError, AttributeError) as exc:
        raise DkimError(f"{what}: {text!r} is not an ISO 8601 time") from exc
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).replace(microsecond=0)


@dataclass
class Key:
    """One selector: its key file, its dates and the public key its record publishes."""

    selector: str
    algorithm: str  # rsa-sha256 | ed25519-sha256
    created: str
    signs_from: str
    signs_until: str | None = None
    published_until: str | None = None
    public: str = ""  # base64 of the p= tag; "" only while planned in check mode

    @property
    def generation(self) -> str:
        """The selector without its algorithm suffix: the keys made together."""
        return self.selector.rsplit("-", 1)[0]

    def signing(self, now: dt.datetime) -> bool:
        """Signs at ``now``: started and not retired."""
        return parse_time(self.signs_from, self.selector) <= now and self.published_until is None

    def txt(self) -> str:
        """The DKIM TXT record (RFC 6376 3.6.1; k=ed25519: RFC 8463)."""
        kind = "ed25519" if self.algorithm == "ed25519-sha256" else "rsa"
        return f"v=DKIM1; k={kind}; p={self.public}"


@dataclass
class State:
    """Every selector of one domain still published, oldest first."""

    domain: str
    keys: list[Key] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """What the state file holds."""
        return {
            "version": STATE_VERSION,
            "domain": self.domain,
            "keys": [asdict(key) for key in self.keys],
        }


def load_state(data: Any, domain: str, where: str) -> State:
    """The state of ``domain`` from the parsed JSON of its state file, checked."""
    if not isinstance(data, Mapping) or data.get("version") != STATE_VERSION:
        raise DkimError(f"{where}: not a pyqmail DKIM state file of version {STATE_VERSION}")
    if data.get("domain") != domain:
        raise DkimError(f"{where}: holds the keys of {data.get('domain')!r}, not {domain!r}")
    keys = []
    names = set()
    for index, raw in enumerate(data.get("keys") or []):
        try:
            key = Key(**raw)
        except TypeError as exc:
            raise DkimError(f"{where}: keys[{index}]: {exc}") from exc
        if not LABEL_RE.match(key.selector) or key.selector in names:
            raise DkimError(f"{where}: keys[{index}]: bad or repeated selector {key.selector!r}")
        if key.algorithm not in ALGORITHMS.values():
            raise DkimError(f"{where}: keys[{index}]: unknown algorithm {key.algorithm!r}")
        for name in ("created", "signs_from", "signs_until", "published_until"):
            if getattr(key, name) is not None:
                parse_time(getattr(key, name), f"{where}: keys[{index}].{name}")
        names.add(key.selector)
        keys.append(key)
    return State(domain, keys)


# ---- the schedule ---------------------------------------------------------------------------


@dataclass
class Plan:
    """What one run does: the new state, and the selectors made, retired and removed."""

    state: State
    generated: list[Key] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    removed: list[Key] = field(default_factory=list)
    rescheduled: list[str] = field(default_factory=list)

    def signing(self, now: dt.datetime) -> list[Key]:
        """The keys that sign now (control/dkimkeys)."""
        return [key for key in self.state.keys if key.signing(now)]


def _new_selector_base(prefix: str, when: dt.datetime, taken: set[str]) -> str:
    """``<prefix><yyyymmdd>``, with b, c... appended when that generation exists already."""
    base = f"{prefix}{when:%Y%m%d}"
    for suffix in ["", *"bcdefghijklmnopqrstuvwxyz"]:
        if base + suffix not in taken:
            return base + suffix
    raise DkimError(f"more than 26 generations of DKIM keys made on {when:%Y-%m-%d}")


def _generation(state: State, prefix: str, signs_from: dt.datetime, now: dt.datetime) -> list[Key]:
    """A new RSA and Ed25519 selector pair (public keys still empty)."""
    base = _new_selector_base(prefix, now, {key.generation for key in state.keys})
    return [
        Key(f"{base}-{name}", algorithm, iso(now), iso(signs_from))
        for name, algorithm in ALGORITHMS.items()
    ]


def _first(state: State, prefix: str, now: dt.datetime, rotate_days: int) -> list[Key]:
    """The first generation of a domain: it signs at once (nothing signs before it)."""
    keys = _generation(state, prefix, now, now)
    for key in keys:
        key.signs_until = iso(now + dt.timedelta(days=rotate_days)) if rotate_days else None
    return keys


def _schedule_next(
    result: Plan, now: dt.datetime, prefix: str, period: dt.timedelta, pre: dt.timedelta
) -> None:
    """Rotation on: end the signing generation, make its successor in time, pre-published."""
    live = [key for key in result.state.keys if key.published_until is None]
    started = [key for key in live if parse_time(key.signs_from, key.selector) <= now]
    waiting = [key for key in live if key not in started]
    # The current generation: the one that started last (an older one is about to retire).
    latest = max((key.signs_from for key in started), key=lambda t: parse_time(t, t), default="")
    started = [key for key in started if key.signs_from == latest]
    for key in started:
        if key.signs_until is None:  # rotation just turned on
            start = parse_time(key.signs_from, key.selector)
            key.signs_until = iso(max(start + period, now + pre))
            result.rescheduled.append(key.selector)
    if not started:
        return
    if waiting:
        signs_from = min(parse_time(key.signs_from, key.selector) for key in waiting)
    else:
        until = min(parse_time(key.signs_until or "", key.selector) for key in started)
        if now < until - pre:
            return
        # A successor made late (no run in time) waits its prepublish days all the same.
        signs_from = max(until, now + pre)
        result.generated = _generation(result.state, prefix, signs_from, now)
        for key in result.generated:
            key.signs_until = iso(signs_from + period)
        result.state.keys.extend(result.generated)
    for key in started:  # the old generation signs until its successor does
        if parse_time(key.signs_until or "", key.selector) < signs_from:
            key.signs_until = iso(signs_from)
            result.rescheduled.append(key.selector)


def _stop_rotation(result: Plan, now: dt.datetime) -> None:
    """Rotation off: the generation that started last signs forever (even past its planned
    end: its successor was never made); a pre-published one that never signed goes."""
    live = [key for key in result.state.keys if key.published_until is None]
    started = [key for key in live if parse_time(key.signs_from, key.selector) <= now]
    latest = max((key.signs_from for key in started), key=lambda t: parse_time(t, t), default="")
    for key in live:
        if key not in started:
            result.removed.append(key)
            result.state.keys.remove(key)
        elif key.signs_from == latest and key.signs_until is not None:
            key.signs_until = None
            result.rescheduled.append(key.selector)


def plan(
    state: State,
    now: dt.datetime,
    *,
    prefix: str,
    rotate_days: int,
    prepublish_days: int,
    retire_days: int,
) -> Plan:
    """The state after a run at ``now``; ``state`` is not changed."""
    keys = [Key(**asdict(key)) for key in state.keys]
    result = Plan(State(state.domain, keys))
    if rotate_days:
        period, pre = dt.timedelta(days=rotate_days), dt.timedelta(days=prepublish_days)
        _schedule_next(result, now, prefix, period, pre)
    else:
        _stop_rotation(result, now)
    # Retire the generations whose time is over; forget those no longer published.
    for key in keys:
        over = key.signs_until is not None and parse_time(key.signs_until, key.selector) <= now
        if key.published_until is None and over:
            key.published_until = iso(now + dt.timedelta(days=retire_days))
            result.retired.append(key.selector)
    for key in list(keys):
        if key.published_until is not None and parse_time(key.published_until, "") <= now:
            result.removed.append(key)
            keys.remove(key)
    if not any(key.published_until is None for key in keys):
        result.generated = _first(result.state, prefix, now, rotate_days)
        keys.extend(result.generated)
    return result
