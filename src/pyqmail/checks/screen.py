"""The envelope checks of one session: blocklists at MAIL, greylisting at RCPT.

Why its own module: ``smtpd/session.py`` only creates a ``Screen`` per connection, holds
its greeting until ``Screen.wait`` says the lookups are done, hands ``Screen.envelope`` to
the core (``Policy.screen``) and adds ``Screen.fields`` to the message's log line. What is
decided, and when, is here; the lists themselves are ``dnsbl``, the triplets ``greylist``.

``Checks`` is one worker's share: the lists' resolver with its cache (``listlookup``, made
when lists are first configured: dnspython is loaded only then, see
``pyqmail.checks.libraries``) and the greylist database, kept across sessions and
reconfigured on HUP.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pyqmail.checks import dnsbl, greylist, libraries
from pyqmail.checks.verdict import Verdict
from pyqmail.control import table
from pyqmail.control.reader import ControlError
from pyqmail.log import log

if TYPE_CHECKING:
    from pyqmail.checks.listlookup import Lookup


@dataclass(frozen=True)
class Settings:
    """The blocklist and greylist control files of pyqmail-smtpd."""

    dnsbl: dnsbl.Settings
    greylist: greylist.Settings


def load(control: Path, *, lookups: bool = True) -> Settings:
    """Read and check every file (``ControlError`` naming the file, before anything runs).
    ``lookups`` False: the lists are checked but none is asked (a listener that never
    screens a client: ``pyqmail.control.smtpd.load``'s ``inbound``)."""
    grey = greylist.Settings(
        table.GREYLISTDELAY.read(control), table.GREYLISTLIFETIME.read(control)
    )
    if grey.active and grey.delay >= grey.lifetime:
        raise ControlError(
            f"{control / 'greylistdelay'}: {grey.delay} seconds is not shorter than"
            f" {control / 'greylistlifetime'} ({grey.lifetime} seconds)"
        )
    lists = dnsbl.load(
        control,
        threshold=table.DNSBLTHRESHOLD.read(control),
        timeout=table.DNSBLTIMEOUT.read(control),
        tempfail=table.DNSBLTEMPFAIL.read(control) == 1,
    )
    if not lookups:  # no lists; the resolver settings serve the host names of =host rules
        return Settings(dnsbl.Settings(timeout=lists.timeout, nameservers=lists.nameservers), grey)
    if lists.active:
        libraries.require("lists", control / ("dnsbl" if lists.lists else "dnswl"))
    return Settings(lists, grey)


def pairs(text: str) -> dict[str, str]:
    """A verdict's ``key=value key=value`` as log fields."""
    return dict(part.split("=", 1) for part in text.split() if "=" in part)


class Checks:
    """One worker's resolver (and its cache) and greylist connection."""

    def __init__(self, root: Path, settings: Settings) -> None:
        self.root = root
        self.lookup: Lookup | None = None
        self._configure(settings.dnsbl)
        self.greylist = greylist.Greylist(root)

    def _configure(self, lists: dnsbl.Settings) -> None:
        """The resolver for ``lists``: made when there are lists to ask, kept when a HUP
        removes them (a session that started before still asks them)."""
        if self.lookup is not None:
            self.lookup.configure(lists)
        elif lists.active:
            # loaded by the configuration (pyqmail.checks.libraries), not here
            from pyqmail.checks.listlookup import Lookup  # noqa: PLC0415

            self.lookup = Lookup(lists)

    def reload(self, root: Path, settings: Settings) -> None:
        """HUP: new name servers, or a new root, for sessions from now on."""
        self._configure(settings.dnsbl)
        if root != self.root:
            self.greylist.close()
            self.root, self.greylist = root, greylist.Greylist(root)

    def shutdown(self) -> None:
        self.greylist.close()

    def screen(self, settings: Settings, mode: str, ip: str, env: Mapping[str, str]) -> Screen:
        """The checks of one new connection (lookups start now, on port 25 only)."""
        return Screen(self, settings, mode, ip, env)


class Screen:
    """One session's envelope checks (see the module's docstring)."""

    def __init__(
        self, checks: Checks, settings: Settings, mode: str, ip: str, env: Mapping[str, str]
    ) -> None:
        self.checks, self.settings, self.ip = checks, settings, ip
        self.rbl = dnsbl.rblsmtpd(env)  # the tcprules entry decides first
        self.known = self.rbl is not None and self.rbl.action == "accept"
        self.lists: Verdict | None = None  # the lists' verdict, once they answered
        self.allowed = False
        self.grey: list[str] = []  # the greylist states of this message's recipients
        self.task: asyncio.Task[None] | None = None
        self._waiting: list[Callable[[], None]] = []
        lookups = mode == "smtp" and settings.dnsbl.active and self.rbl is None
        if lookups and "RELAYCLIENT" not in env:
            self.task = asyncio.get_running_loop().create_task(self._lookups())

    async def _lookups(self) -> None:
        """Ask the lists, keep the verdict, log a hit or a failure, wake the greeting."""
        try:
            lookup = self.checks.lookup
            assert lookup is not None  # noqa: S101 - made by the configuration that has lists
            result = await lookup.check(self.ip, self.settings.dnsbl)
            self.allowed = result.allowed is not None
            self.lists = dnsbl.verdict(result, self.settings.dnsbl, self.ip)
            if result.hits or result.failed or result.allowed:
                log("dnsbl", ip=self.ip, action=self.lists.action, **pairs(self.lists.log))
        except Exception as exc:  # noqa: BLE001 - a bug here must not hold the greeting
            log("error", ip=self.ip, text="blocklist lookups failed", error=repr(exc))
        finally:
            self.task = None
            for callback in self._waiting:
                callback()
            self._waiting.clear()

    def wait(self, callback: Callable[[], None]) -> bool:
        """True if the lookups still run: ``callback`` is called when they are done."""
        if self.task is None:
            return False
        self._waiting.append(callback)
        return True

    def envelope(self, sender: str, rcpt: str | None) -> str | None:
        """``Policy.screen``: MAIL (``rcpt`` None) or RCPT of a client that may not relay;
        a reply line refuses it, None lets it through."""
        if rcpt is None:
            self.grey = []
            found = self.rbl if self.rbl is not None and not self.known else self.lists
            return self._reply(found, sender, None)
        grey = self.settings.greylist
        if not grey.active or self.known or self.allowed:
            return None
        found = self.checks.greylist.check(self.ip, sender, rcpt, grey, time.time())
        self.grey.append(found.log.split()[0].partition("=")[2])
        return self._reply(found, sender, rcpt)

    def _reply(self, found: Verdict | None, sender: str, rcpt: str | None) -> str | None:
        """A refusal or deferral as a reply line, logged; None for an accept."""
        if found is None or found.action == "accept":
            return None
        status = "5.7.1" if found.code >= 500 else "4.7.1"
        log(
            "refuse",
            ip=self.ip,
            code=found.code,
            **pairs(found.log),
            **{"from": f"<{sender}>"},
            to=None if rcpt is None else f"<{rcpt}>",
        )
        return f"{found.code} {status} {found.text}"

    def fields(self) -> dict[str, str]:
        """What the message's log line gets: list hits below the threshold, greylist."""
        out = pairs(self.lists.log) if self.lists is not None else {}
        if self.grey:
            out["greylist"] = ",".join(self.grey)
        return out
