"""The preflight checks of the per-client rules: tcprules addresses and the environment they
give (rows of CHECKS in ``pyqmail_inventory``: ``pyqmail_rules__*``, ``pyqmail__listener_env``).

Why its own module: what an address and a variable of a rule may be is decided by
``pyqmail_rules``, the code of the module ``pyqmail_tcprules`` (imported, not copied, so the
preflight refuses exactly what the module would refuse later), plus the per-client knobs
pyqmail-smtpd reads as numbers (``GREETDELAY``; ``SCAN``: ``pyqmail_scanners``'s), plus the one
relation across the variables: an address only once in deny, relay_clients, rules and the
catch-all, since tcpserver uses the first rule that matches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

try:
    from pyqmail.rules import RulesError, address_problem, env_problem, make_rule
except ImportError:  # pragma: no cover - the controller without the pyqmail package
    from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_rules import (  # type: ignore[import-untyped,import-not-found,no-redef,unused-ignore]
        RulesError,
        address_problem,
        env_problem,
        make_rule,
    )

from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_checkbase import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    Problems,
    shown,
)
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_scanners import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    scan_problem,
)


def tcprules_env(name: str, env: Mapping[str, Any]) -> Problems:
    """Variables of a tcprules rule: names and string values tcprules can store."""
    for var, value in env.items():
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            yield f'{name}.{var}: {shown(value)} is not a string; give one, e.g. {var}: "1"'
            continue
        problem = env_problem(str(var), str(value)) or knob_problem(str(var), str(value))
        if problem:
            yield f"{name}.{var}: {problem}"


def knob_problem(var: str, value: str) -> str:
    """A per-client knob pyqmail-smtpd reads as a number (src/pyqmail/checks/greet.py)."""
    if var == "GREETDELAY" and not (value.isdigit() and value.isascii() and int(value) <= 60):
        return f"{value!r} is not a greeting pause in seconds, 0 to 60"
    if var == "SCAN":
        return scan_problem(value)
    return ""


def check_listener_env(name: str, value: Mapping[str, Any], values: Mapping[str, Any]) -> Problems:
    """Each listener's environment is added to every allow rule of its own rules cdb."""
    del values
    for listener, env in value.items():
        yield from tcprules_env(f"{name}.{listener}", env or {})


def check_address(name: str, value: Any, values: Mapping[str, Any]) -> Problems:
    """A tcprules address, as the pyqmail_tcprules module would accept it."""
    del values
    problem = address_problem(value)
    if problem:
        yield f"{name}: {value!r} is not a tcprules address: {problem}"


def check_rules(name: str, value: list[dict[str, Any]], values: Mapping[str, Any]) -> Problems:
    """pyqmail_rules__rules: address and environment of each rule."""
    for index, rule in enumerate(value):
        yield from check_address(f"{name}[{index}].address", rule["address"], values)
        yield from tcprules_env(f"{name}[{index}].env", rule.get("env") or {})


def check_default_env(name: str, value: Mapping[str, Any], values: Mapping[str, Any]) -> Problems:
    """pyqmail_rules__default_env: the catch-all rule's environment, and every address only
    once across deny, relay_clients, rules and the catch-all (tcpserver uses the first)."""
    yield from tcprules_env(name, value)
    rules: list[tuple[str, str]] = [
        (f"pyqmail_rules__deny[{i}]", a) for i, a in enumerate(values["pyqmail_rules__deny"])
    ]
    rules += [
        (f"pyqmail_rules__relay_clients[{i}]", a)
        for i, a in enumerate(values["pyqmail_rules__relay_clients"])
    ]
    rules += [
        (f"pyqmail_rules__rules[{i}].address", r["address"])
        for i, r in enumerate(values["pyqmail_rules__rules"])
    ]
    if value:
        rules.append((name, ""))
    owner: dict[str, str] = {}
    for where, address in rules:
        try:
            keys = make_rule(address, "allow").cdb_keys()
        except RulesError:
            continue  # reported by check_address
        for key in keys:
            first = owner.setdefault(key, where)
            if first != where:
                what = f"address {key!r}" if key else "the catch-all address ''"
                yield f"{where}: {what} is already used by {first}; tcpserver would use only that"
                break
