"""One line of ``control/dnsbl`` or ``control/dnswl``: a zone, an answer filter, a weight.

Why its own module (standard library only): pyqmail-smtpd reads these lines
(``pyqmail.checks.dnsbl``) and the preflight checks the role's variables that become them
(the collection's ``pyqmail_control``, through its link ``module_utils/pyqmail_dnslistspec``):
one parser, so the preflight refuses exactly what the daemon would refuse at its start.

The syntax is Postfix's ``postscreen_dnsbl_sites`` (postconf(5)), plus this project's older
``zone=weight``::

    zone                      any answer in 127.0.0.0/8 is a listing, weight 1
    zone=weight               weight 1 to 100 (the older form, kept)
    zone*weight               the same, as Postfix writes it
    zone=127.0.0.[2..11]      only answers matching the filter are listings
    zone=127.0.[0..255].[1;3]*2
                              a filter and a weight

A filter is four dot-separated octets; each is a number (0 to 255), or ``[...]`` holding one or
more ``;``-separated numbers or ``a..b`` ranges (a no greater than b). An answer that matches
no filter of its zone is no listing, as in Postfix. An allow list (``dnswl``) takes a filter
but no weight. The same zone may come back with other filters (Postfix does so to weigh a
list's return codes differently); the same zone with the same filter twice is an error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

WEIGHT_MAX = 100
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_NUMBER = re.compile(r"[0-9]{1,3}\Z")
_OCTET = r"(?:\[[^\[\]]*\]|[^.\[\]]+)"  # a number, or [...] (whose ranges hold dots)
_FILTER = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}\Z")
_OCTETS = re.compile(_OCTET)


class SpecError(ValueError):
    """A line that is not ``zone[=filter][*weight]``: the text says what is wrong."""


@dataclass(frozen=True)
class Filter:
    """Which A answers count as a listing: per octet, the allowed ranges."""

    text: str
    octets: tuple[tuple[tuple[int, int], ...], ...]

    def matches(self, answer: str) -> bool:
        parts = answer.split(".")
        if len(parts) != 4 or not all(p.isascii() and p.isdigit() for p in parts):
            return False
        return all(
            any(lo <= int(p) <= hi for lo, hi in ranges)
            for p, ranges in zip(parts, self.octets, strict=True)
        )


@dataclass(frozen=True)
class Entry:
    """One line: the zone asked, its filter (None: any answer in 127/8), its weight."""

    zone: str
    filter: Filter | None = None
    weight: int = 1

    def matches(self, answer: str) -> bool:
        return answer.startswith("127.") if self.filter is None else self.filter.matches(answer)

    def text(self) -> str:
        """The entry as a line would spell it (logs, ``--check``)."""
        return self.zone + (f"={self.filter.text}" if self.filter else "")


def is_zone(zone: str) -> bool:
    """A DNS list zone: a lower-case host name with at least one dot, no trailing dot."""
    return (
        0 < len(zone) <= 253
        and "." in zone
        and all(_LABEL.match(label) for label in zone.split("."))
    )


def _number(text: str, what: str) -> int:
    if not _NUMBER.match(text) or int(text) > 255:
        raise SpecError(f"{what}: {text!r} is not a number from 0 to 255")
    return int(text)


def _octet(text: str, where: str) -> tuple[tuple[int, int], ...]:
    """One octet of a filter: ``N`` or ``[N;A..B;...]``."""
    if not (text.startswith("[") and text.endswith("]")):
        value = _number(text, where)
        return ((value, value),)
    inner = text[1:-1]
    if not inner:
        raise SpecError(f"{where}: [] holds no number or range")
    ranges = []
    for item in inner.split(";"):
        lo_text, dots, hi_text = item.partition("..")
        lo = _number(lo_text, where)
        hi = _number(hi_text, where) if dots else lo
        if lo > hi:
            raise SpecError(f"{where}: range {item!r} is empty ({lo} is above {hi})")
        ranges.append((lo, hi))
    return tuple(ranges)


def parse_filter(text: str, zone: str) -> Filter:
    """``d.d.d.d``, each d a number, ``[a..b]`` or ``[a;b;c]`` (Postfix's filter)."""
    octets = _OCTETS.findall(text) if _FILTER.match(text) else []
    if len(octets) != 4:
        raise SpecError(
            f"filter of {zone}: {text!r} is not four octets d.d.d.d (each a number,"
            " [a..b] or [a;b;c])"
        )
    parsed = tuple(
        _octet(octet, f"filter of {zone}, octet {n}") for n, octet in enumerate(octets, 1)
    )
    return Filter(text, parsed)


def _weight(text: str, zone: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= WEIGHT_MAX:
        raise SpecError(f"weight of {zone} must be 1 to {WEIGHT_MAX}: {text!r}")
    return int(text)


def parse_entry(text: str, *, allow: bool = False) -> Entry:
    """One line of ``dnsbl`` (``allow`` False) or ``dnswl``; SpecError saying what is wrong
    (the caller adds the file and line, or the variable)."""
    spec = text.strip()
    head, star, weight_text = spec.partition("*")
    name, eq, rest = head.partition("=")
    zone = name.strip().lower().removesuffix(".")
    if not is_zone(zone):
        raise SpecError(f"not a DNS list zone (a domain name): {name.strip()!r}")
    rest = rest.strip()
    if eq and not rest:
        raise SpecError(f"nothing after the = of {zone} (a filter such as 127.0.0.[2..11])")
    legacy = bool(eq) and "." not in rest and "[" not in rest  # zone=weight, as before
    if allow and (star or legacy):
        raise SpecError(f"{zone}: an allow list takes a filter but no weight: {spec!r}")
    if legacy and star:
        raise SpecError(f"{zone}: two weights: {spec!r}")
    weight = 1
    if star or legacy:
        weight = _weight((weight_text if star else rest).strip(), zone)
    answer_filter = parse_filter(rest, zone) if eq and not legacy else None
    return Entry(zone, answer_filter, weight)


def entries(
    texts: Iterable[str], *, allow: bool = False
) -> Iterator[tuple[int, Entry | SpecError]]:
    """Each line (index from 0) parsed, or what is wrong with it: the daemon stops at the
    first error, the preflight names them all. On a blocklist a zone given twice with the
    same filter is an error (which weight would count?); on an allow list (``allow``), which
    has no weights, the second is left out, as the files before the filters were read (an
    old dnswl listing a zone with and without its trailing dot kept working)."""
    seen: set[tuple[str, str]] = set()
    for index, text in enumerate(texts):
        try:
            entry = parse_entry(text, allow=allow)
        except SpecError as exc:
            yield index, exc
            continue
        key = (entry.zone, entry.filter.text if entry.filter else "")
        if key in seen and allow:
            continue
        if key in seen:
            yield index, SpecError(f"{entry.text()} is listed twice")
        else:
            seen.add(key)
            yield index, entry
