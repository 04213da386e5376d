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

The table is here; the rows' functions live in one module per concept, each imported below:
``pyqmail_control`` (control files), ``pyqmail_clientrules`` (tcprules addresses and
environments), ``pyqmail_mailboxes`` (aliases and mailboxes), ``pyqmail_signing`` (DKIM),
``pyqmail_pki`` (the CA and the certificates), ``pyqmail_spf`` (SPF terms),
``pyqmail_listeners`` (addresses, ports and the listeners' run settings, SMTP and Dovecot),
``pyqmail_scanners`` and ``pyqmail_dovecot``;
what several of them share (the type of a check, ``in_range``, ``each``, ``domain``, ...) is
``pyqmail_checkbase``. Only the rows of the roles ``pyqmail`` and ``pyqmail_dns``, a few lines
each, stay here. Those modules never import this one.

The address, password and certificate-name rules are the ones the modules apply
(``pyqmail_rules``, ``pyqmail_authdb``, ``pyqmail_crypto``), imported by those row modules,
not copied, so the preflight refuses exactly what a module would refuse later.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
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
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_checkbase import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    ADDRESS_RE,
    Check,
    Problems,
    domain,
    each,
    in_range,
    one_line,
    safe_path,
    shown,
)
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_clientrules import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    check_address,
    check_default_env,
    check_listener_env,
    check_rules,
)
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_control import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    check_authservid,
    check_extra,
    check_greylistdelay,
    check_locals,
    check_rcptcatchall,
    check_smtproutes,
    check_tlshosts,
    check_validrcptto,
    dns_lists,
    dns_server,
)
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_dovecot import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    check_dovecot_version,
)
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_listeners import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    check_dovecot_ip,
    check_dovecot_ports,
    check_listen_ip,
    check_listeners,
    check_ports,
    check_softlimit,
    check_timeout,
    check_workers,
)
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_mailboxes import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    alias_target,
    check_aliases,
    check_folder,
    check_home_base,
    check_mailbox_rows,
)
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_pki import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    check_ca_common_name,
    check_ca_host,
    check_ca_renew,
    check_cert_names,
    check_pem_list,
    check_provided,
    check_renew,
)
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_scanners import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    check_clamd_max_size,
    check_dns_servers,
    check_rspamd_max_size,
    check_scanner_address,
    check_thresholds,
)
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_scanners import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    check_timeout as check_scan_timeout,
)
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_signing import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    check_dkim_bits,
    check_dkim_domains,
    check_dkim_group,
    check_dkim_prefix,
    check_dkim_retire,
    check_dkim_rotation,
)
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_spf import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    check_spf_extra,
)

__all__ = ["CHECKS", "check", "unknown", "validate"]

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
# The rows of the roles pyqmail and pyqmail_dns, a few lines each; the other roles' rows are in
# the modules imported above (this module's docstring names them).

HOST_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


def check_me(name: str, value: str, values: Mapping[str, Any]) -> Problems:
    """pyqmail__me: control/me, the certificate CN and the EHLO name."""
    del values
    if len(value) > 253 or not all(HOST_LABEL_RE.match(p) for p in value.split(".")):
        yield f"{name}: {shown(value)} is not a host name (letters, digits, '-' and dots)"


def check_auth_group(name: str, value: str, values: Mapping[str, Any]) -> Problems:
    """The AUTH password hashes must stay out of the delivery user's reach."""
    if value == values.get("pyqmail__group"):
        yield (
            f"{name}: {value!r} is also pyqmail__group: the delivery user would read the AUTH "
            "password hashes; name a group of the password verifiers only"
        )


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


def check_mta_sts_mode(name: str, value: Any, values: Mapping[str, Any]) -> Problems:
    """'enforce' makes senders refuse to deliver unless the MX presents a certificate they
    trust (RFC 8461 section 4): the run's own CA is trusted by no sender."""
    if value == "enforce" and not values.get("pyqmail_certificates__provided_cert"):
        yield (
            f"{name}: 'enforce' needs certificates from a public CA for every MX name and for "
            "mta-sts.<domain> (RFC 8461 section 4), but pyqmail_certificates__provided_cert is "
            "not set, so the MX presents the run's own CA, which senders do not trust and would "
            "refuse to deliver to: set pyqmail_certificates__provided_cert (and _key), or keep "
            "'testing'"
        )


# One row per variable that needs more than its spec. A new role adds its rows here.
CHECKS: dict[str, Check] = {
    # pyqmail
    "pyqmail__me": check_me,
    "pyqmail__listen_ip": check_listen_ip,
    "pyqmail__auth_group": check_auth_group,
    "pyqmail__listener_env": check_listener_env,
    # the paths the run scripts name (root's shell scripts)
    "pyqmail__root": safe_path,
    "pyqmail__venv": safe_path,
    "pyqmail__log_dir": safe_path,
    "pyqmail__rules_path": safe_path,
    "pyqmail__service_dir": safe_path,
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
    "pyqmail_control__dnsbl": dns_lists,
    "pyqmail_control__dnswl": dns_lists,
    "pyqmail_control__dnsblthreshold": in_range(1, 1000),
    "pyqmail_control__dnsbltimeout": in_range(1, 60),
    "pyqmail_control__greylistdelay": check_greylistdelay,
    "pyqmail_control__greylistlifetime": in_range(60, 31_536_000),
    "pyqmail_control__smtproutes": check_smtproutes,
    "pyqmail_control__tlshosts": check_tlshosts,
    "pyqmail_control__concurrencyremote": in_range(1),
    "pyqmail_control__concurrencydestination": in_range(1, 1000),
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
    "pyqmail_dkim__retire_days": check_dkim_retire,
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
    "pyqmail_scanners__rspamd_max_size": check_rspamd_max_size,
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
    "pyqmail_dns__send_domains": each(domain),
    "pyqmail_dns__spf_extra": check_spf_extra,
    "pyqmail_dns__mta_sts_mode": check_mta_sts_mode,
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
