"""The preflight checks of DKIM signing (rows of CHECKS in ``pyqmail_inventory``: the role
``pyqmail_dkim``'s variables).

Why its own module: the rules themselves are ``pyqmail_dkim``'s, shared with the module
``pyqmail_dkim_key`` on the host, which has no use for the preflight's rows; these rows apply
them to the variables, and add what only the whole inventory can say: a signing domain must be
one delivered here (``pyqmail_control``'s local domains or virtualdomains), the keys'
group must not be one that pyqmail-smtpd or a delivery child is in, and a retired key must stay
published as long as a message it signed may wait in the queue (``queuelifetime``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_checkbase import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    Problems,
)
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_control import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    check_locals,
)
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_dkim import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    MAX_DAYS,
    domain_problem,
    is_local,
    prefix_problem,
    rotation_problem,
    rsa_bits_problem,
    virtual_keys,
)

# pyqmail-send's default queuelifetime (src/pyqmail/control/table.py, QUEUELIFETIME; a test
# keeps the two equal: this module runs on the controller, without the daemon's package).
QUEUELIFETIME_DEFAULT: Final = 604800
DAY: Final = 86400


def _dkim_on(values: Mapping[str, Any]) -> bool:
    return bool(values.get("pyqmail_dkim__enabled"))


def check_dkim_domains(name: str, value: list[str], values: Mapping[str, Any]) -> Problems:
    """Signing domains: DNS names, each once, each delivered here (locals or virtualdomains)."""
    if not _dkim_on(values):
        return
    local = values.get("pyqmail_control__locals") or []
    # A bad local domain is reported there; whether ours are local is then unknown.
    known = not any(True for _problem in check_locals("", local, values))
    virtual = virtual_keys(
        str((values.get("pyqmail_control__extra") or {}).get("virtualdomains") or "")
    )
    seen: dict[str, str] = {}
    for index, item in enumerate(value):
        where = f"{name}[{index}]"
        problem = domain_problem(item)
        if problem:
            yield f"{where}: {problem}"
            continue
        first = seen.setdefault(item, where)
        if first != where:
            yield f"{where}: {item!r} is listed twice (first at {first})"
        elif known and not is_local(item, local, virtual):
            yield (
                f"{where}: {item!r} is not a local domain (pyqmail_control__locals or "
                "pyqmail_control__extra.virtualdomains); a host signs only its own domains"
            )


def check_dkim_prefix(name: str, value: str, values: Mapping[str, Any]) -> Problems:
    """The selector prefix: selectors must be DNS labels."""
    del values
    problem = prefix_problem(value)
    if problem:
        yield f"{name}: {problem}"


def check_dkim_bits(name: str, value: int, values: Mapping[str, Any]) -> Problems:
    """RFC 8301: sign with 2048 bits or more."""
    del values
    problem = rsa_bits_problem(value)
    if problem:
        yield f"{name}: {problem}"


def check_dkim_rotation(name: str, value: int, values: Mapping[str, Any]) -> Problems:
    """The rotation period and its pre-publication and retirement days fit together."""
    del name
    problem = rotation_problem(
        value, values["pyqmail_dkim__prepublish_days"], values["pyqmail_dkim__retire_days"]
    )
    if problem:
        yield f"pyqmail_dkim__{problem}"


def check_dkim_group(name: str, value: str, values: Mapping[str, Any]) -> Problems:
    """The keys' group must not be one pyqmail-smtpd or a delivery child is in."""
    shared = {
        values.get("pyqmail__group"): "pyqmail__group",
        values.get("pyqmail__auth_group"): "pyqmail__auth_group",
        values.get("pyqmail__remote_user"): "pyqmail__remote_user",
        values.get("pyqmail__mailbox_user"): "pyqmail__mailbox_user",
    }
    if value in shared:
        yield (
            f"{name}: {value!r} is also {shared[value]}: other daemons would read the DKIM "
            "keys; name a group of pyqmail-send's manager alone"
        )


def _queuelifetime(values: Mapping[str, Any]) -> int | None:
    """control/queuelifetime as pyqmail-send reads it (its first line, seconds), from
    pyqmail_control__extra, else the daemon's default; None when it is no number (that is
    the daemon's --check to report)."""
    text = (values.get("pyqmail_control__extra") or {}).get("queuelifetime")
    if text is None:
        return QUEUELIFETIME_DEFAULT
    lines = str(text).strip().splitlines()
    first = lines[0].strip() if lines else ""
    return int(first) if first.isdigit() else None


def check_dkim_retire(name: str, value: int, values: Mapping[str, Any]) -> Problems:
    """With rotation on, a retired key's record stays ``retire_days`` after it stopped signing:
    no shorter than ``queuelifetime``, or a message signed just before the switch and retried
    later leaves with a signature whose key is gone (it fails at every receiver). Rotation off
    retires nothing that ever signed."""
    if not _dkim_on(values) or not values.get("pyqmail_dkim__rotate_days"):
        return
    lifetime = _queuelifetime(values)
    if lifetime is None or not 1 <= value <= MAX_DAYS:  # reported by their own checks
        return
    if value * DAY < lifetime:
        days = -(-lifetime // DAY)
        yield (
            f"{name}: {value} days ({value * DAY} seconds) is shorter than queuelifetime "
            f"({lifetime} seconds, pyqmail_control__extra.queuelifetime or pyqmail-send's "
            "default): a message signed just before a key retires and retried later would "
            f"leave after the key's DNS record is removed; set it to {days} days or more"
        )
