"""The inventory checks of the pyqmail roles, run by the preflight before any task changes a host.

The role ``pyqmail_preflight`` (a dependency of ``pyqmail``, so the first thing every play of
every playbook runs) calls the action ``pyqmail_preflight``, which hands this module the
values of every variable any pyqmail role declares, as the roles would see them. ``check``
returns one line per problem, all problems at once, each naming the variable and the element:
``pyqmail_rules__relay_clients[1]: '999.1.1.1' is not a tcprules address: ...``. Nothing else
(no spec dump, no value of a ``no_log`` option).

Three stages:

1. ``unknown``: ``pyqmail*`` inventory variables that no role declares (typos).
2. ``validate``: each value against its option in ``roles/<role>/meta/argument_specs.yml``,
   with Ansible's own type converters (what each role's argument validation would refuse
   later), required keys, choices and unknown keys inside dicts. The converted values (with
   the defaults of sub-options filled in) go to stage 3.
3. ``CHECKS``: one table, variable name -> function, for what a spec cannot say: ranges,
   addresses, duplicates, relations between variables. A new role adds its rows here; a
   variable without a row is checked by its spec alone. One row asks the host:
   ``pyqmail_dovecot__enabled`` (``pyqmail_dovecot``: which Dovecot it has or would get),
   through the command runner the action gives as ``host_run``; without one it is skipped.

The address, password and certificate-name rules are the ones the modules apply
(``pyqmail_rules``, ``pyqmail_authdb``, ``pyqmail_crypto``), imported, not copied, so the
preflight refuses exactly what a module would refuse later.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ansible.module_utils.common.validation import (
    check_type_bool,
    check_type_dict,
    check_type_int,
    check_type_list,
    check_type_path,
    check_type_raw,
    check_type_str,
)

try:
    from pyqmail.authdb import AuthDBError, validate_name, validate_password
    from pyqmail.rules import RulesError, address_problem, env_problem, make_rule
except ImportError:  # pragma: no cover - the controller without the pyqmail package
    from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_authdb import (  # type: ignore[import-untyped,import-not-found,no-redef,unused-ignore]
        AuthDBError,
        validate_name,
        validate_password,
    )
    from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_rules import (  # type: ignore[import-untyped,import-not-found,no-redef,unused-ignore]
        RulesError,
        address_problem,
        env_problem,
        make_rule,
    )

from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_dkim import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    domain_problem,
    is_local,
    prefix_problem,
    rotation_problem,
    rsa_bits_problem,
    virtual_keys,
)
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_dovecot import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    check_dovecot_version,
)
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_scanners import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    check_clamd_max_size,
    check_dns_servers,
    check_scanner_address,
    check_thresholds,
    scan_problem,
)
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_scanners import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    check_timeout as check_scan_timeout,
)

__all__ = ["CHECKS", "check", "unknown", "validate"]

Problems = Iterator[str]
Check = Callable[[str, Any, Mapping[str, Any]], Problems]

CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "str": check_type_str,
    "int": check_type_int,
    "bool": check_type_bool,
    "list": check_type_list,
    "dict": check_type_dict,
    "path": check_type_path,
    "raw": check_type_raw,
}
TYPE_NAMES = {
    "str": "a string",
    "int": "an integer",
    "bool": "a boolean",
    "list": "a list",
    "dict": "a dict",
    "path": "a path",
}


def shown(value: Any) -> str:
    """A value as the messages print it: strings quoted, ``null`` for None."""
    return "null" if value is None else repr(value)


# --- stage 1: variables no role declares ------------------------------------------------------


def unknown(names: list[str], declared: set[str]) -> list[str]:
    """One line per ``pyqmail*`` name that no role declares: such a typo would silently fall
    back to the default."""
    return [
        f"{name}: no pyqmail role declares this variable (a typo?)"
        for name in sorted(names)
        if name.startswith("pyqmail_") and name not in declared
    ]


# --- stage 2: the argument specs --------------------------------------------------------------


def _convert(path: str, value: Any, kind: str, secret: bool) -> tuple[Any, str | None]:
    """``value`` converted to ``kind`` as Ansible's argument validation does, or the problem."""
    try:
        return CONVERTERS[kind](value), None
    except (TypeError, ValueError):
        what = "it" if secret else shown(value)
        return None, f"{path}: {what} is not {TYPE_NAMES.get(kind, kind)}"


def _validate_dict(path: str, value: dict[str, Any], options: Mapping[str, Any]) -> Problems:
    """Check the keys of one dict against ``options``; fill in defaults and conversions."""
    for key in value:
        if key not in options:
            yield f"{path}: unknown key {key!r} (known: {', '.join(options)})"
    for key, spec in options.items():
        if value.get(key) is None:
            if spec.get("required"):
                yield f"{path}: {key!r} is required"
            elif "default" in spec and key not in value:
                value[key] = spec["default"]
            continue
        yield from _validate_value(f"{path}.{key}", value, key, spec)


def _validate_value(path: str, holder: Any, key: Any, spec: Mapping[str, Any]) -> Problems:
    """Check ``holder[key]`` against one option spec, replacing it by its converted value."""
    kind = spec.get("type", "str")
    secret = bool(spec.get("no_log"))
    value, problem = _convert(path, holder[key], kind, secret)
    if problem:
        yield problem
        return
    holder[key] = value
    choices = spec.get("choices")
    if kind == "list":
        elements = spec.get("elements")
        for index in range(len(value)):
            where = f"{path}[{index}]"
            if elements:
                sub = {"type": elements, "no_log": secret, "options": spec.get("options")}
                if choices:
                    sub["choices"] = choices
                yield from _validate_value(where, value, index, sub)
        return
    if choices and value not in choices:
        what = "it" if secret else shown(value)
        yield f"{path}: {what} is not one of {', '.join(map(str, choices))}"
    if kind == "dict" and spec.get("options"):
        yield from _validate_dict(path, value, spec["options"])


def validate(values: dict[str, Any], specs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Check every declared variable in ``values`` against its spec (converting in place)."""
    problems: list[str] = []
    for name, spec in specs.items():
        if name not in values:
            if spec.get("required"):
                problems.append(f"{name}: is required")
            continue
        if values[name] is None:
            kind = TYPE_NAMES.get(spec.get("type", "str"), "a value")
            problems.append(f"{name}: is null; give {kind} (or leave it out for the default)")
            continue
        problems.extend(_validate_value(name, values, name, spec))
    return problems


# --- stage 3: what a spec cannot say ----------------------------------------------------------

_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
DOMAIN_RE = re.compile(rf"({_LABEL}\.)*{_LABEL}\Z")
HOST_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
LOCAL_PART_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*\Z")
MAILBOX_RE = re.compile(r"[a-z0-9][a-z0-9._+-]{0,63}\Z")
ADDRESS_RE = re.compile(r"[^@\s:|&#/]+@[A-Za-z0-9.-]+\Z")
SENDER_LOCAL_RE = re.compile(r"[^@\s:|&#/\\\"<>(),;]{1,64}\Z")
MAILDIR_RE = re.compile(r"/\S*/\Z")
HOME_RE = re.compile(r"/[^:\s]+\Z")
HOME_BASE_RE = re.compile(r"/[^:\s]*\Z")  # "/" too: check_home_base names it
CONTROL_NAME_RE = re.compile(r"[a-z][a-z0-9-]*\Z")
RELAY_RE = re.compile(r"[A-Za-z0-9.:-]*\Z")
WORKERS_RE = re.compile(r"(auto|[1-9][0-9]*)\Z")
PEM_CERT = "-----BEGIN CERTIFICATE-----"
WILDCARDS = ("0.0.0.0", "::", "0", "0:0:0:0:0:0:0:0")  # noqa: S104 - to refuse them
LISTENERS = ("smtp", "smtps", "submission")
FOLDER_RE = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")  # a Maildir++ folder: no dots, no slashes
IMAP_LOGIN_RE = re.compile(r"[A-Za-z0-9._@+-]{1,255}\Z")  # Dovecot's auth_username_chars
# Directories other software and other users share (the Filesystem Hierarchy Standard's), refused
# as pyqmail_mailboxes__home_base: see check_home_base.
SHARED_DIRS = frozenset(
    """
    / /bin /boot /dev /etc /home /lib /lib32 /lib64 /libx32 /media /mnt /opt /proc /root /run
    /sbin /srv /sys /tmp /usr /usr/bin /usr/include /usr/lib /usr/libexec /usr/local /usr/sbin
    /usr/share /usr/src /var /var/backups /var/cache /var/lib /var/local /var/lock /var/log
    /var/mail /var/opt /var/run /var/spool /var/spool/mail /var/tmp /var/www
    """.split()  # noqa: SIM905 - four lines of paths, not 43 lines of quoted strings
)


def in_range(low: int, high: int | None = None, note: str = "") -> Check:
    """An integer from ``low`` to ``high`` (no upper bound when None)."""

    def check(name: str, value: Any, values: Mapping[str, Any]) -> Problems:
        del values
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"{low} or more"
            yield f"{name}: {value} is out of range: must be {bound}{note}"

    return check


def each(check: Check) -> Check:
    """Apply ``check`` to every element of a list, naming it ``name[index]``."""

    def run(name: str, value: Any, values: Mapping[str, Any]) -> Problems:
        for index, item in enumerate(value):
            yield from check(f"{name}[{index}]", item, values)

    return run


def domain(name: str, value: Any, values: Mapping[str, Any]) -> Problems:
    """A domain name (lower-cased as the control files store it), ``.`` prefix allowed."""
    del values
    if not DOMAIN_RE.match(str(value).lower().removeprefix(".")):
        yield f"{name}: {shown(value)} is not a domain name"


def dns_server(name: str, value: Any, values: Mapping[str, Any]) -> Problems:
    """A DNS server of control/dnsresolver: an IP address, optionally @port (1-65535)."""
    del values
    host, _at, port = str(value).partition("@")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        yield f"{name}: {shown(value)} is not an IP address (host or host@port)"
        return
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        yield f"{name}: {shown(value)} has no port from 1 to 65535 after the @"


def check_authservid(name: str, value: Any, values: Mapping[str, Any]) -> Problems:
    """The Authentication-Results authserv-id: a host name, or "" for pyqmail__me."""
    if value:
        yield from domain(name, value, values)


def one_line(name: str, value: Any, values: Mapping[str, Any]) -> Problems:
    """Text written as one line of a control file: a line break would add another entry."""
    del values
    if re.search(r"[\r\n\0]", str(value)):
        yield f"{name}: {shown(value)} must be one line"


def check_me(name: str, value: str, values: Mapping[str, Any]) -> Problems:
    """pyqmail__me: control/me, the certificate CN and the EHLO name."""
    del values
    if len(value) > 253 or not all(HOST_LABEL_RE.match(p) for p in value.split(".")):
        yield f"{name}: {shown(value)} is not a host name (letters, digits, '-' and dots)"


def check_listen_ip(name: str, value: str, values: Mapping[str, Any]) -> Problems:
    """pyqmail__listen_ip: one address of this host, a wildcard only when asked for."""
    if not value:
        yield (
            f"{name}: is empty ({values.get('inventory_hostname', 'the host')} has no default "
            "IPv4 address); set the address the listeners should bind to"
        )
    elif value in WILDCARDS:
        if not values.get("pyqmail__allow_wildcard"):
            yield (
                f"{name}: {value!r} listens on every address; set an address of the host, or "
                "pyqmail__allow_wildcard=true if that is really meant"
            )
    else:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            yield f"{name}: {value!r} is not an IPv4 or IPv6 address"


def check_auth_group(name: str, value: str, values: Mapping[str, Any]) -> Problems:
    """The AUTH password hashes must stay out of the delivery user's reach."""
    if value == values.get("pyqmail__group"):
        yield (
            f"{name}: {value!r} is also pyqmail__group: the delivery user would read the AUTH "
            "password hashes; name a group of the password verifiers only"
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


def check_locals(name: str, value: list[str], values: Mapping[str, Any]) -> Problems:
    """pyqmail_control__locals: at least one local domain, each a domain name."""
    if not value:
        yield f"{name}: is empty; name at least one local domain"
    yield from each(domain)(name, value, values)


def check_smtproutes(name: str, value: list[dict[str, Any]], values: Mapping[str, Any]) -> Problems:
    """pyqmail_control__smtproutes: domain ('' = all others), relay host and port."""
    for index, route in enumerate(value):
        where = f"{name}[{index}]"
        if route["domain"]:
            yield from domain(f"{where}.domain", route["domain"], values)
        if not RELAY_RE.match(route["relay"]):
            yield f"{where}.relay: {route['relay']!r} is not a host name or IP address"
        yield from in_range(1, 65535)(f"{where}.port", route["port"], values)
        yield from route_auth_problems(where, route)


def route_auth_problems(where: str, route: Mapping[str, Any]) -> Problems:
    """The credentials of one route, as pyqmail-send reads control/smtproutes-auth
    (``relay:user:password``, one line, stripped): what it would refuse at its next start, or
    read otherwise than written, is refused here. The password is never shown."""
    user, password = route.get("user") or "", route.get("password") or ""
    if not user and not password:
        return
    if user and not password:
        yield f"{where}.password: is missing; user {user!r} needs a password at the relay"
    if password and not user:
        yield f"{where}.user: is missing; a password is only sent with a user"
    if not route["relay"]:
        yield f"{where}.relay: is empty (MX lookup); credentials need a named relay host"
    if re.search(r"[:\x00-\x1f\x7f]", user):
        yield (
            f"{where}.user: {user!r} has a ':' or a control character such as a line break "
            "(smtproutes-auth is relay:user:password, one line)"
        )
    if "\n" in password or "\r" in password or "\0" in password:
        yield f"{where}.password: has a line break or NUL (smtproutes-auth is one line per relay)"
    elif password != password.strip():
        yield f"{where}.password: starts or ends with whitespace, which pyqmail-send strips"


def check_tlshosts(name: str, value: list[dict[str, Any]], values: Mapping[str, Any]) -> Problems:
    """pyqmail_control__tlshosts: an FQDN and a PEM certificate each."""
    for index, pin in enumerate(value):
        yield from domain(f"{name}[{index}].name", pin["name"], values)
        if PEM_CERT not in pin["pem"]:
            yield f"{name}[{index}].pem: is not a PEM certificate ({PEM_CERT} missing)"


def check_extra(name: str, value: Mapping[str, Any], values: Mapping[str, Any]) -> Problems:
    """pyqmail_control__extra: plain names of control files the role does not write itself."""
    managed = values.get("pyqmail_control__managed") or []
    for key in value:
        if not CONTROL_NAME_RE.match(str(key)):
            yield f"{name}.{key}: not a control file name (lower-case letters, digits and '-')"
        elif key in managed:
            yield f"{name}.{key}: written by the role itself; set its own variable instead"


def dns_list(name: str, value: Any, values: Mapping[str, Any]) -> Problems:
    """A DNS list zone (control/dnsbl, control/dnswl): a domain with a dot, no trailing dot;
    for dnsbl an optional ``=weight`` from 1 to 100 (pyqmail.checks.dnsbl)."""
    del values
    zone, eq, weight = str(value).partition("=")
    zone = zone.strip().lower()
    if (
        not DOMAIN_RE.match(zone)
        or "." not in zone
        or (eq and name.startswith("pyqmail_control__dnswl"))
    ):
        yield f"{name}: {shown(value)} is not a DNS list zone (a domain name" + (
            ")" if name.startswith("pyqmail_control__dnswl") else ", optionally =weight)"
        )
    elif eq and not (weight.isdigit() and 1 <= int(weight) <= 100):
        yield f"{name}: weight {shown(weight)} of {zone} must be from 1 to 100"


def check_greylistdelay(name: str, value: int, values: Mapping[str, Any]) -> Problems:
    """0 to 86400, and shorter than pyqmail_control__greylistlifetime when on."""
    yield from in_range(0, 86400, " (0 = off)")(name, value, values)
    lifetime = values.get("pyqmail_control__greylistlifetime")
    if 0 < value <= 86400 and isinstance(lifetime, int) and value >= lifetime:
        yield (
            f"{name}: {value} seconds is not shorter than pyqmail_control__greylistlifetime"
            f" ({lifetime}): a deferred sender would be forgotten before it may pass"
        )


def check_validrcptto(name: str, value: Any, values: Mapping[str, Any]) -> Problems:
    """One valid recipient: user@domain or @domain, one line."""
    del values
    if "@" not in value or re.search(r"\s", value):
        yield f"{name}: {value!r} is not user@domain or @domain"


def check_rcptcatchall(name: str, value: list[str], values: Mapping[str, Any]) -> Problems:
    """pyqmail_control__rcptcatchall: domain names delivered here (locals or virtualdomains);
    a catch-all for a domain that is relayed would accept what the next hop refuses."""
    local = values.get("pyqmail_control__locals") or []
    known = not any(True for _problem in check_locals("", local, values))
    virtual = virtual_keys(
        str((values.get("pyqmail_control__extra") or {}).get("virtualdomains") or "")
    )
    for index, item in enumerate(value):
        where = f"{name}[{index}]"
        problem = domain_problem(item)
        if problem:
            yield f"{where}: {problem}"
        elif known and not is_local(item, local, virtual):
            yield (
                f"{where}: {item!r} is not a local domain (pyqmail_control__locals or "
                "pyqmail_control__extra.virtualdomains)"
            )


def alias_target(name: str, value: Any, values: Mapping[str, Any]) -> Problems:
    """A forward address or a Maildir path; program deliveries are not offered."""
    del values
    if not ADDRESS_RE.match(value) and not MAILDIR_RE.match(value):
        yield f"{name}: {value!r} is neither user@domain nor a Maildir path ending in /"


def check_aliases(name: str, value: list[dict[str, Any]], values: Mapping[str, Any]) -> Problems:
    """pyqmail_aliases__aliases: local-part names, each once, with targets unless absent; root,
    postmaster and mailer-daemon may be given targets (replacing pyqmail_aliases__postmaster)
    but not removed, or the role would write and remove the same file on every run."""
    seen: dict[str, str] = {}
    for index, alias in enumerate(value):
        where = f"{name}[{index}]"
        alias_name = alias["name"]
        if not LOCAL_PART_RE.match(alias_name):
            yield f"{where}.name: {alias_name!r} is not a local part (letters, digits, . _ + -)"
        first = seen.setdefault(alias_name.lower(), where)
        if first != where:
            yield f"{where}.name: {alias_name!r} is listed twice (first at {first})"
        if alias["state"] == "absent":
            if alias_name.lower() in ("root", "postmaster", "mailer-daemon"):
                yield (
                    f"{where}.state: {alias_name!r} cannot be absent: root, postmaster and "
                    "mailer-daemon always forward, to pyqmail_aliases__postmaster or to the "
                    "targets given here"
                )
            continue
        if not alias["targets"]:
            yield f"{where}.targets: is empty; give a target, or state: absent"
        yield from each(alias_target)(f"{where}.targets", alias["targets"], values)


def check_mailboxes(name: str, value: list[dict[str, Any]], values: Mapping[str, Any]) -> Problems:
    """pyqmail_mailboxes__list: names (case-insensitive, each once), homes, AUTH logins."""
    seen: dict[str, str] = {}
    for index, box in enumerate(value):
        where = f"{name}[{index}]"
        box_name = box["name"]
        if not MAILBOX_RE.match(box_name.lower()):
            yield (
                f"{where}.name: {box_name!r} is not a mailbox name "
                "(a-z 0-9 . _ + -, at most 64, names are case-insensitive)"
            )
        first = seen.setdefault(box_name.lower(), where)
        if first != where:
            yield f"{where}.name: {box_name!r} is listed twice (first at {first})"
        if box.get("home") is not None:
            yield from check_home(f"{where}.home", box["home"], values)
        if box.get("login"):
            try:
                validate_name(box["login"])
            except AuthDBError as exc:
                yield f"{where}.login: {exc}"
        if box.get("password") is not None and box["state"] != "absent":
            try:
                validate_password(box["password"])
            except AuthDBError as exc:
                yield f"{where}.password: {exc}"  # the message never shows the password
        for number, entry in enumerate(box.get("senders") or []):
            if not sender_entry(entry):
                yield (
                    f"{where}.senders[{number}]: {entry!r} is neither an address "
                    "(user@domain) nor @domain"
                )


def check_home(where: str, home: str, values: Mapping[str, Any]) -> Problems:
    """A mailbox home lies inside pyqmail_mailboxes__home_base: the role makes it the delivery
    user's, mode 0700, so a home such as /home/alice or /var would be taken from its owner."""
    if not HOME_RE.match(home):
        yield f"{where}: {home!r} is not an absolute path without ':' or blanks"
        return
    base = posixpath.normpath(values["pyqmail_mailboxes__home_base"])
    inside = posixpath.normpath(home).startswith(base.rstrip("/") + "/")
    if not inside:
        yield (
            f"{where}: {home!r} is not inside pyqmail_mailboxes__home_base ({base}); the role "
            "makes a home the delivery user's with mode 0700, which would take an existing "
            "directory (a user's home, a system path) from its owner"
        )


def plain_path(path: str) -> str:
    """``path`` without ``.``, ``..``, doubled or trailing slashes: ``//home/`` is /home."""
    return "/" + posixpath.normpath(path).lstrip("/")


def overlap(one: str, other: str) -> bool:
    """One of the two (plain) paths is the other or lies inside it."""
    return (one + "/").startswith(other.rstrip("/") + "/") or (other + "/").startswith(
        one.rstrip("/") + "/"
    )


def check_home_base(name: str, value: str, values: Mapping[str, Any]) -> Problems:
    """pyqmail_mailboxes__home_base is a directory of the mailboxes alone.

    Why: the role makes <home_base> root's, mode 0755, and each <home_base>/<mailbox name>
    the delivery user's, mode 0700. A shared directory as the base is taken from the system
    (/tmp loses its sticky 1777, /var/mail its group mail) and a mailbox named like an entry
    in it takes that entry: alice under /home is the login user alice's home, ssh under /etc
    is sshd's configuration. pyqmail's own tree (pyqmail__root) holds the queue and control/
    (a mailbox "queue"). The module refuses a home that belongs to another user
    (pyqmail_directories foreign_owner), but root's directories pass it (the module makes a
    directory as root before it chowns it), and the controller cannot see the host: this
    check names the variable before any task runs.
    """
    if not HOME_BASE_RE.match(value):
        yield f"{name}: {value!r} is not an absolute path without ':' or blanks"
        return
    base = plain_path(value)
    if base in SHARED_DIRS:
        yield (
            f"{name}: {value!r} is a directory the system and its users share; the role would "
            "make it root's with mode 0755 and each <home_base>/<mailbox name> the delivery "
            "user's with mode 0700 (/home/alice, /etc/ssh): give a directory of the mailboxes "
            "alone, such as /var/vmail"
        )
        return
    root = values.get("pyqmail__root")
    if isinstance(root, str) and root.startswith("/") and overlap(base, plain_path(root)):
        yield (
            f"{name}: {value!r} overlaps pyqmail__root ({root}); a mailbox would take a "
            "directory of pyqmail's own (queue, control, users): give a directory of the "
            "mailboxes alone, such as /var/vmail"
        )


def sender_entry(entry: str) -> bool:
    """An entry of a mailbox's ``senders``: user@domain or @domain (pyqmail.smtpd.senders)."""
    local, at, domain_part = entry.rpartition("@")
    if not at or (local and not SENDER_LOCAL_RE.match(local)):
        return False
    return bool(DOMAIN_RE.match(domain_part.lower()))


def check_provided(name: str, value: str, values: Mapping[str, Any]) -> Problems:
    """Your own key and certificate come together (and a chain only with them)."""
    key = values["pyqmail_certificates__provided_key"]
    chain = values["pyqmail_certificates__provided_chain"]
    if bool(key) != bool(value):
        yield (
            f"{name}: set pyqmail_certificates__provided_key and {name} together, "
            "or neither to use the CA"
        )
    elif chain and not value:
        yield f"pyqmail_certificates__provided_chain: is set without {name}"


def check_ca_host(name: str, value: str, values: Mapping[str, Any]) -> Problems:
    """The CA host must be a host of the inventory (certificates are issued there)."""
    if value not in values.get("groups", {}).get("all", [value]):
        yield f"{name}: {value!r} is not a host of the inventory"


def check_ca_common_name(name: str, value: str, values: Mapping[str, Any]) -> Problems:
    """The CA's CN: 1 to 64 characters (X.509 upper bound)."""
    del values
    if not 1 <= len(value) <= 64:
        yield f"{name}: must have 1 to 64 characters, not {len(value)}"


def check_cert_names(name: str, value: list[str], values: Mapping[str, Any]) -> Problems:
    """The server certificate's names, as pyqmail_certificate checks them."""
    del values
    # cryptography is imported only here: every other check works without it.
    from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_crypto import (  # noqa: PLC0415
        CryptoError,
        check_names,
    )

    try:
        check_names(value, "server")
    except CryptoError as exc:
        yield f"{name}: {exc}"


def check_renew(name: str, value: int, values: Mapping[str, Any]) -> Problems:
    """Renewal must start before expiry, or every run would renew the certificate."""
    valid = values["pyqmail_certificates__valid_days"]
    if not 0 <= value < valid:
        yield f"{name}: {value} must be 0 or more and smaller than valid_days ({valid})"


def check_ca_renew(name: str, value: int, values: Mapping[str, Any]) -> Problems:
    """pyqmail_ca's renewal margin: below the CA's validity (or every run re-makes the CA, as
    pyqmail_ca refuses), and not below the certificates' own margin (pyqmail_certificate
    refuses to issue from a CA that expires within it, and the CA would not be renewed yet)."""
    valid = values["pyqmail_certificates__ca_valid_days"]
    leaf = values["pyqmail_certificates__renew_before_days"]
    if not 0 <= value < valid:
        yield (
            f"{name}: {value} must be 0 or more and smaller than "
            f"pyqmail_certificates__ca_valid_days ({valid}), or every run would re-make the CA"
        )
    elif value < leaf < values["pyqmail_certificates__valid_days"]:  # else: leaf's own problem
        yield (
            f"{name}: {value} must be at least pyqmail_certificates__renew_before_days ({leaf}): "
            f"certificates are not issued from a CA expiring within {leaf} days, and the CA is "
            f"renewed only {value} days before it expires"
        )


def check_pem_list(name: str, value: Any, values: Mapping[str, Any]) -> Problems:
    """A PEM certificate (for clientca.pem)."""
    del values
    if PEM_CERT not in value:
        yield f"{name}: is not a PEM certificate ({PEM_CERT} missing)"


def check_ports(name: str, value: Mapping[str, int], values: Mapping[str, Any]) -> Problems:
    """Each wanted listener has its own port in 1-65535."""
    listeners = values["pyqmail_services__listeners"]
    defaults = {"smtp": 25, "smtps": 465, "submission": 587}
    owner: dict[int, str] = {}
    for listener in LISTENERS:
        if listener not in listeners:
            continue
        port = value.get(listener, defaults[listener])
        where = f"{name}.{listener}"
        if not 1 <= port <= 65535:
            yield f"{where}: {port} is out of range: must be from 1 to 65535"
            continue
        first = owner.setdefault(port, listener)
        if first != listener:
            yield f"{where}: {port} is already the port of {first}"


def check_listeners(name: str, value: list[str], values: Mapping[str, Any]) -> Problems:
    """Each listener once."""
    del values
    for index, listener in enumerate(value):
        if listener in value[:index]:
            yield f"{name}[{index}]: {listener!r} is listed twice"


def check_workers(name: str, value: str, values: Mapping[str, Any]) -> Problems:
    """auto, or a positive number of worker processes."""
    del values
    if not WORKERS_RE.match(value):
        yield f"{name}: {value!r} is neither auto nor a positive number"


def check_softlimit(name: str, value: int, values: Mapping[str, Any]) -> Problems:
    """0 (none), or enough address space for Python and TLS."""
    del values
    if value != 0 and value < 64 * 1024 * 1024:
        yield f"{name}: {value} is too small: 0 (no limit) or at least 67108864 (64 MiB)"


def check_timeout(name: str, value: int, values: Mapping[str, Any]) -> Problems:
    """pyqmail_service must be able to see a service up for ``wait`` seconds."""
    wait = values["pyqmail_services__wait"]
    if value <= wait:
        yield f"{name}: {value} must be larger than pyqmail_services__wait ({wait})"


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


def _dovecot_on(values: Mapping[str, Any]) -> bool:
    return bool(values.get("pyqmail_dovecot__enabled"))


def check_dovecot_ports(name: str, value: Mapping[str, int], values: Mapping[str, Any]) -> Problems:
    """Dovecot's listeners: each on its own port in 1-65535, none taken by an SMTP listener
    on the same address (a wildcard on either side is the same address)."""
    if not _dovecot_on(values):
        return
    used: dict[int, str] = {}
    for listener in values["pyqmail_dovecot__listeners"]:
        port = value[listener]
        if not 1 <= port <= 65535:
            yield f"{name}.{listener}: {port} is not a port number (1-65535)"
        elif port in used and used[port] != listener:
            yield f"{name}.{listener}: {port} is also the port of {used[port]}"
        used.setdefault(port, listener)
    ip, smtp_ip = values["pyqmail_dovecot__listen_ip"], values["pyqmail__listen_ip"]
    if ip != smtp_ip and ip not in WILDCARDS and smtp_ip not in WILDCARDS:
        return
    smtp_ports = values["pyqmail_services__ports"]
    for smtp in values["pyqmail_services__listeners"]:
        port = smtp_ports.get(smtp)
        if port in used:
            yield (
                f"{name}.{used[port]}: {port} clashes with pyqmail_services__ports.{smtp} on "
                f"{ip} (pyqmail_dovecot__listen_ip); give Dovecot another port or address"
            )


def check_dovecot_ip(name: str, value: str, values: Mapping[str, Any]) -> Problems:
    """Dovecot's address: as the SMTP listeners' (one address, a wildcard only when asked)."""
    if _dovecot_on(values):
        yield from check_listen_ip(name, value, values)


def check_imap_logins(
    name: str, value: list[dict[str, Any]], values: Mapping[str, Any]
) -> Problems:
    """With Dovecot on, every login must be one Dovecot accepts (auth_username_chars)."""
    if not _dovecot_on(values):
        return
    for index, box in enumerate(value):
        login = box.get("login") or box["name"]
        if box["state"] != "absent" and not IMAP_LOGIN_RE.match(login):
            yield (
                f"{name}[{index}].login: {login!r} cannot be an IMAP/POP3 login "
                "(letters, digits and . _ @ + -, at most 255)"
            )


def check_mailbox_rows(
    name: str, value: list[dict[str, Any]], values: Mapping[str, Any]
) -> Problems:
    """pyqmail_mailboxes__list: the mailbox rules, then Dovecot's login rule when it is on."""
    yield from check_mailboxes(name, value, values)
    yield from check_imap_logins(name, value, values)


def check_folder(name: str, value: Any, values: Mapping[str, Any]) -> Problems:
    """A Maildir++ folder created in every mailbox (.Sent, .Junk, ...)."""
    del values
    if not FOLDER_RE.match(str(value)):
        yield f"{name}: {value!r} is not a folder name (letters, digits, _ and -, at most 64)"


def report_address(name: str, value: Any, values: Mapping[str, Any]) -> Problems:
    """pyqmail_dns: a DMARC/TLS-RPT report address (user@domain, mailto: allowed; "" = default)."""
    del values
    text = str(value).removeprefix("mailto:")
    if text and not ADDRESS_RE.match(text):
        yield f"{name}: {shown(value)} is not a mail address (user@domain)"


def ip_of(version: int) -> Check:
    """An IPv4 or IPv6 address (pyqmail_dns__ipv4 / pyqmail_dns__ipv6)."""

    def check(name: str, value: Any, values: Mapping[str, Any]) -> Problems:
        del values
        try:
            ok = ipaddress.ip_address(str(value)).version == version
        except ValueError:
            ok = False
        if not ok:
            yield f"{name}: {shown(value)} is not an IPv{version} address"

    return check


# One row per variable that needs more than its spec. A new role adds its rows here.
CHECKS: dict[str, Check] = {
    # pyqmail
    "pyqmail__me": check_me,
    "pyqmail__listen_ip": check_listen_ip,
    "pyqmail__auth_group": check_auth_group,
    "pyqmail__listener_env": check_listener_env,
    # pyqmail_control
    "pyqmail_control__locals": check_locals,
    "pyqmail_control__relay_domains": each(domain),
    "pyqmail_control__databytes": in_range(0, note=" (0 = unlimited)"),
    "pyqmail_control__maxrcpt": in_range(0, note=" (0 = unlimited)"),
    "pyqmail_control__maxhops": in_range(1, 10000),
    "pyqmail_control__smtpgreeting": one_line,
    "pyqmail_control__maxjunk": in_range(0, 1000000),
    "pyqmail_control__greetdelay": in_range(0, 60),
    "pyqmail_control__timeoutstress": in_range(1, 1000000),
    "pyqmail_control__stresspercent": in_range(1, 100),
    "pyqmail_control__authmsgsperhour": in_range(0, 10**6, " (0 = no limit)"),
    "pyqmail_control__authrcptsperhour": in_range(0, 10**7, " (0 = no limit)"),
    "pyqmail_control__validrcptto": each(check_validrcptto),
    "pyqmail_control__rcptcatchall": check_rcptcatchall,
    "pyqmail_control__tlsclients": each(one_line),
    "pyqmail_control__dnsbl": each(dns_list),
    "pyqmail_control__dnswl": each(dns_list),
    "pyqmail_control__dnsblthreshold": in_range(1, 1000),
    "pyqmail_control__dnsbltimeout": in_range(1, 60),
    "pyqmail_control__greylistdelay": check_greylistdelay,
    "pyqmail_control__greylistlifetime": in_range(60, 31_536_000),
    "pyqmail_control__smtproutes": check_smtproutes,
    "pyqmail_control__tlshosts": check_tlshosts,
    "pyqmail_control__concurrencyremote": in_range(1),
    "pyqmail_control__concurrencylocal": in_range(1),
    "pyqmail_control__authlockfails": in_range(0, 1000),
    "pyqmail_control__authlocktime": in_range(1, 86400),
    "pyqmail_control__authconcurrency": in_range(1, 64),
    "pyqmail_control__authservid": check_authservid,
    "pyqmail_control__authtimeout": in_range(1, 60),
    "pyqmail_control__dnsresolver": each(dns_server),
    "pyqmail_control__extra": check_extra,
    # pyqmail_rules
    "pyqmail_rules__relay_clients": each(check_address),
    "pyqmail_rules__deny": each(check_address),
    "pyqmail_rules__rules": check_rules,
    "pyqmail_rules__default_env": check_default_env,
    # pyqmail_aliases
    "pyqmail_aliases__postmaster": alias_target,
    "pyqmail_aliases__aliases": check_aliases,
    # pyqmail_mailboxes
    "pyqmail_mailboxes__list": check_mailbox_rows,
    "pyqmail_mailboxes__folders": each(check_folder),
    "pyqmail_mailboxes__login_domain": domain,
    "pyqmail_mailboxes__home_base": check_home_base,
    # pyqmail_dkim
    "pyqmail_dkim__domains": check_dkim_domains,
    "pyqmail_dkim__selector_prefix": check_dkim_prefix,
    "pyqmail_dkim__rsa_bits": check_dkim_bits,
    "pyqmail_dkim__rotate_days": check_dkim_rotation,
    "pyqmail_dkim__group": check_dkim_group,
    # pyqmail_certificates
    "pyqmail_certificates__ca_host": check_ca_host,
    "pyqmail_certificates__ca_common_name": check_ca_common_name,
    "pyqmail_certificates__ca_valid_days": in_range(1),
    "pyqmail_certificates__ca_renew_before_days": check_ca_renew,
    "pyqmail_certificates__names": check_cert_names,
    "pyqmail_certificates__valid_days": in_range(1),
    "pyqmail_certificates__renew_before_days": check_renew,
    "pyqmail_certificates__provided_cert": check_provided,
    "pyqmail_certificates__client_ca_extra": each(check_pem_list),
    # pyqmail_services
    "pyqmail_services__listeners": check_listeners,
    "pyqmail_services__ports": check_ports,
    "pyqmail_services__workers": check_workers,
    "pyqmail_services__softlimit": check_softlimit,
    "pyqmail_services__wait": in_range(0),
    "pyqmail_services__timeout": check_timeout,
    # pyqmail_dovecot (the version on the host: module_utils/pyqmail_dovecot.py)
    "pyqmail_dovecot__enabled": check_dovecot_version,
    "pyqmail_dovecot__listeners": check_listeners,
    "pyqmail_dovecot__ports": check_dovecot_ports,
    "pyqmail_dovecot__listen_ip": check_dovecot_ip,
    # at most pyqmail.tools.loginslots.MAX_SLOTS: a checker holds one descriptor per slot
    "pyqmail_dovecot__checkpassword_concurrency": in_range(0, 256, " (0 = twice the CPUs)"),
    # pyqmail_scanners (module_utils/pyqmail_scanners.py)
    "pyqmail_scanners__rspamd_listen": check_scanner_address,
    "pyqmail_scanners__clamd_listen": check_scanner_address,
    "pyqmail_scanners__thresholds": check_thresholds,
    "pyqmail_scanners__timeout": check_scan_timeout,
    "pyqmail_scanners__clamd_max_size": check_clamd_max_size,
    "pyqmail_scanners__rspamd_dns_servers": check_dns_servers,
    # pyqmail_dns
    "pyqmail_dns__mx_priority": in_range(0, 65535),
    "pyqmail_dns__backup_mx_priority": in_range(0, 65535),
    "pyqmail_dns__ttl": in_range(60, 604800),
    "pyqmail_dns__mta_sts_max_age": in_range(86400, 31557600),
    "pyqmail_dns__dmarc_rua": report_address,
    "pyqmail_dns__tlsrpt_rua": report_address,
    "pyqmail_dns__ipv4": each(ip_of(4)),
    "pyqmail_dns__ipv6": each(ip_of(6)),
}


def _owner(line: str) -> str:
    """The variable a problem line is about: the text before the first ``:``, ``[`` or ``.``."""
    return re.split(r"[:.\[]", line, maxsplit=1)[0]


def check(
    values: dict[str, Any],
    specs: Mapping[str, Mapping[str, Any]],
    context: Mapping[str, Any] | None = None,
    sources: Mapping[str, str] | None = None,
) -> list[str]:
    """Every problem of ``values`` (declared variable -> value, converted in place), one line
    each. ``context`` adds what the checks may read besides the variables (``groups``,
    ``inventory_hostname``, role vars such as ``pyqmail_control__managed``, and the action's
    ``host_run`` and ``host_root`` for what only the host can say). ``sources`` maps
    a variable to its text before templating: a variable whose text names a variable with a
    problem (the default certificate names contain pyqmail__listen_ip) is not reported as
    well, so each mistake is reported once, where it was made."""
    problems = validate(values, specs)
    bad = {_owner(line) for line in problems}
    seen = {**(context or {}), **values}
    for name, run in CHECKS.items():
        if name in values and name not in bad and values[name] is not None:
            # A check reading another variable that failed its spec stops there.
            try:
                problems.extend(run(name, values[name], seen))
            except (KeyError, TypeError):
                continue
    culprits = {_owner(line) for line in problems}
    derived = {
        name
        for name, text in (sources or {}).items()
        if any(re.search(rf"\b{re.escape(other)}\b", text) for other in culprits - {name})
    }
    return [line for line in problems if _owner(line) not in derived]
