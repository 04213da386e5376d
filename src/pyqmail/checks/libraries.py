"""The inbound checks' libraries: loaded by a pyqmail-smtpd whose control files use them
(and dnspython for a rules cdb with host names).

Why: dnspython, dkimpy (with PyNaCl), pyspf, publicsuffix2 and authres, with the standard
modules they pull in (``importlib.metadata``, ``email``, ``zipfile``, ...), are some 9 MB of
memory in each pyqmail-smtpd process: a quarter of a listener that never asks the DNS
(checks off, or a listener whose clients all relay or log in).

When: pyqmail-smtpd reads its control files only after dropping privileges, and the daemon's
user cannot always read the interpreter's own library directory (a Python built under
/root, say), so what it imports later may fail. ``preload`` therefore runs as root, before
the drop, and imports each group whose control file *exists* (existence only: nothing is
read as root; ``authchecks`` holding 0 still loads the group). Loading the configuration
then ``require``s the group a file turns on: already there, or imported now (a HUP that
turns the checks on), or a ``ControlError`` naming the file when it cannot be imported; a
start refuses it, a HUP keeps the configuration in force.

=========  ==================================  ===========================================
group      control files                       modules (and with them the libraries)
=========  ==================================  ===========================================
``auth``   ``authchecks``                      ``pyqmail.checks.inbound``: SPF, DKIM, ARC,
                                               DMARC, Authentication-Results
``lists``  ``dnsbl``, ``dnswl``                ``pyqmail.checks.listlookup``: the lists'
                                               DNS queries (dnspython's asyncio resolver)
``hosts``  the ``--rules`` cdb, when it has    ``pyqmail.smtpd.remotehost``: the client's
           a host-name key (``=host``);        forward-confirmed PTR name (dnspython too),
           ``rspamd``                          for ``=host`` rules and rspamd's ``Hostname``
=========  ==================================  ===========================================

The ``hosts`` group is the one exception to "existence only": its trigger is what the rules
cdb holds, so ``preload_rules`` opens it as root and looks at its keys (``Rules.names``),
nothing more; the daemon reads it again after the drop for its rules. The cdb is root's
own configuration (tcprules and the ``pyqmail_tcprules`` module write it as root, 0644)
and the reader is the bounded pure-Python one of ``pyqmail.cdb``. Loading dnspython for
every listener with a rules file instead would cost every host without ``=`` rules the
memory this module exists to save.

The modules that run a group's checks import its modules inside the function that needs
them, after ``require`` (they are in ``sys.modules`` by then).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from pyqmail.control.reader import ControlError

GROUPS: dict[str, tuple[str, ...]] = {
    "auth": ("pyqmail.checks.inbound",),
    "lists": ("pyqmail.checks.listlookup",),
    "hosts": ("pyqmail.smtpd.remotehost",),
}
FILES: dict[str, str] = {
    "authchecks": "auth",
    "dnsbl": "lists",
    "dnswl": "lists",
    "rspamd": "hosts",  # the client's name for rspamd (pyqmail.scan.rspamd)
}


def preload(control: Path) -> list[str]:
    """As root, before the privilege drop: import the groups whose files exist in
    ``control``. Returns the groups loaded; one that fails here is reported, naming its
    file, when the configuration ``require``s it."""
    loaded = []
    for name, group in FILES.items():
        if group in loaded or not (control / name).exists():
            continue
        try:
            require(group, control / name)
        except ControlError:
            continue
        loaded.append(group)
    return loaded


def preload_rules(rules: Path | None) -> list[str]:
    """As root, before the privilege drop: import the ``hosts`` group if the rules cdb has
    a host-name key (see above). ``["hosts"]`` if loaded; a cdb that cannot be read or
    imports that fail are reported when the configuration is loaded."""
    if rules is None:
        return []
    from pyqmail.rules import Rules, RulesError  # noqa: PLC0415 - only with a rules cdb

    try:
        if not Rules.load(rules).names:
            return []
        require("hosts", rules)
    except (OSError, RulesError, ControlError):
        return []
    return ["hosts"]


def require(group: str, where: Path) -> None:
    """Import ``group``'s modules (a no-op when loaded); ControlError naming ``where``, the
    file that turns the group on, if they cannot be imported."""
    for module in GROUPS[group]:
        try:
            importlib.import_module(module)
        except (ImportError, OSError) as exc:
            what, when = ("checks", "this file exists")
            if group == "hosts" and where.name == "rspamd":
                what = "rspamd's client host names"
            elif group == "hosts":
                what, when = ("host-name rules (=host)", "this cdb has them")
            raise ControlError(
                f"{where}: turns on {what} whose libraries cannot be loaded ({module}: "
                f"{exc}); pyqmail-smtpd loads them before dropping privileges when {when} "
                "at start: restart it"
            ) from None
