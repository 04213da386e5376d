# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters for what the roles used to compute in Jinja programs inside set_fact.

Why filters: a loop of ``{%- set _ = out.append(...) -%}`` cannot be unit-tested, and a bad
inventory value surfaces as a Jinja type error far from the variable that holds it. Each
filter here takes the inventory variables it needs as arguments and raises
AnsibleFilterError naming the variable and the element (``pyqmail_rules__relay_clients[1]``)
when one has the wrong shape. Found by site.yml and playbooks/ through ansible.cfg
(``filter_plugins``), by molecule through ANSIBLE_FILTER_PLUGINS in .config/molecule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ansible.errors import AnsibleFilterError

LISTENER_KINDS = ("smtp", "smtps", "submission")
DOVECOT_KINDS = ("imaps", "imap", "pop3s", "pop3")
MAILDIR_SUBDIRS = ("", "/cur", "/new", "/tmp")  # noqa: S108 - a Maildir's tmp/, not /tmp
# Daemon names of pyqmail__reload_routes -> the handler that reloads them.
RELOAD_HANDLERS = {"smtpd": "pyqmail reload listeners", "send": "pyqmail reload send"}


def _list(value: Any, variable: str) -> list[Any]:
    """``value`` as a list, or an error naming the inventory variable."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise AnsibleFilterError(f"{variable} must be a list, got {type(value).__name__}")
    return list(value)


def _mapping(value: Any, variable: str) -> Mapping[str, Any]:
    """``value`` as a mapping (None counts as empty), or an error naming the variable."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise AnsibleFilterError(f"{variable} must be a mapping, got {type(value).__name__}")
    return value


def _string(value: Any, where: str) -> str:
    """``value`` when it is a string, or an error naming the element."""
    if not isinstance(value, str):
        shown = "null" if value is None else repr(value)
        raise AnsibleFilterError(f"{where} must be a string, got {shown}")
    return value


def services_wanted(
    listeners: Any,
    kinds: Mapping[str, Mapping[str, Any]],
    port_map: Mapping[str, Any],
    listener_env: Any,
    rules_path: str,
) -> list[dict[str, Any]]:
    """The supervised services to run: one per wanted listener (in smtp, smtps, submission
    order), each with its port and the rules cdb it reads (its own when it has its own
    environment in pyqmail__listener_env), then qmail-send."""
    wanted = _list(listeners, "pyqmail_services__listeners")
    for index, kind in enumerate(wanted):
        if kind not in LISTENER_KINDS:
            raise AnsibleFilterError(
                f"pyqmail_services__listeners[{index}] is {kind!r}; "
                f"choose from {', '.join(LISTENER_KINDS)}"
            )
    env = _mapping(listener_env, "pyqmail__listener_env")
    out: list[dict[str, Any]] = []
    for kind in LISTENER_KINDS:
        if kind not in wanted:
            continue
        own_rules = len(env.get(kind) or {}) > 0
        out.append(
            {
                "name": kinds[kind]["service"],
                "kind": kind,
                "port": port_map[kind],
                "rules": f"{rules_path}{'-' + kind if own_rules else ''}.cdb",
            }
        )
    out.append({"name": "qmail-send", "kind": "send", "port": 0})
    return out


def services_svstat_argv(
    wanted: Any,
    service_dir: str,
    dovecot: Mapping[str, Any] | None = None,
    scanners: Mapping[str, Any] | None = None,
) -> list[str]:
    """``svstat`` with each wanted service and its log service (and Dovecot's and the
    scanners' when they run: every supervised service of the host)."""
    argv = ["svstat"]
    for service in _list(wanted, "pyqmail_services__wanted"):
        path = f"{service_dir}/{service['name']}"
        argv += [path, f"{path}/log"]
    if dovecot:
        argv += [dovecot["service"], f"{dovecot['service']}/log"]
    for path in (scanners or {}).get("services") or []:
        argv += [path, f"{path}/log"]
    return argv


def services_summary(wanted: Any, facts: Mapping[str, Any]) -> list[str]:
    """The lines of the run summary: listeners, Dovecot, mail client settings, scanners,
    svstat, CA, the DNS records to publish.

    ``facts``: kinds (pyqmail_services__kinds), host, me, listen_ip, dovecot (its summary or
    {}), scanners (pyqmail_scanners__summary: its ``lines`` say which scanner listens where;
    None when the scanners' play did not run, and the summary says nothing of them), svstat
    (the registered result), config_dir, fetched (the CA copy on the controller, or ""), dns
    (pyqmail_dns__summary: path and lines of the zone, or {}), sendmail (``sendmail_summary``'s
    lines, or []) and version (what ``pyqmail-smtpd --version`` printed on the host, or "": the
    version of the daemon and of the collection pyqmail.mail).
    """
    services = _list(wanted, "pyqmail_services__wanted")
    kinds, me, dc = facts["kinds"], facts["me"], facts.get("dovecot") or {}
    version = str(facts.get("version") or "").strip().replace("pyqmail-smtpd ", "pyqmail ", 1)
    host = f"host: {facts['host']} (me: {me}{', ' + version if version else ''})"
    out = [host, f"listen address: {facts['listen_ip']}"]
    out += [
        f"  port {s['port']}: {s['name']} ({kinds[s['kind']]['label']})"
        for s in services
        if s["port"]
    ]
    if dc:
        out.append(f"IMAP/POP3 listen address: {dc['listen']}")
        out.extend(dc["ports"])
    out.append(
        f"mail client settings (server {me}; user name = the mailbox login;"
        ' password = its SMTP AUTH password, "normal password" over TLS):'
    )
    outgoing = [
        f"SMTP {s['port']} {'STARTTLS' if s['kind'] == 'submission' else 'SSL/TLS'}"
        for s in services
        if s["kind"] in ("submission", "smtps")
    ]
    out.append("  outgoing: " + (", ".join(outgoing) or "none (no submission or smtps listener)"))
    incoming = ", ".join(dc.get("incoming") or [])
    out.append("  incoming: " + (incoming or "none (pyqmail_dovecot__enabled is false)"))
    if dc.get("autoconfig"):
        out.append(f"  Thunderbird autoconfig: {dc['autoconfig']} on the controller")
    if facts.get("scanners") is not None:
        scanning = facts["scanners"].get("lines") or []
        out.append("scanning before the 250:" if scanning else "scanning before the 250: none")
        out += [f"  {line}" for line in scanning]
    out.append("services (svstat):")
    result = facts.get("svstat") or {}
    lines = list(result.get("stdout_lines") or []) + list(result.get("stderr_lines") or [])
    out += [f"  {line}" for line in lines]
    out.append(f"CA certificate for mail clients: {facts['config_dir']}/ca.pem on the host")
    if facts.get("fetched"):
        out.append(f"  and {facts['fetched']} on the controller")
    dns = facts.get("dns") or {}
    if dns:
        where = "on the controller" if dns.get("written", True) else "not written in check mode"
        out.append(f"DNS records to publish ({dns['path']} {where}; check them with")
        out.append(f"  pyqmail-dns check {dns['path']}):")
        out += [f"  {line}" for line in dns["lines"]]
    if facts.get("sendmail"):
        out.append("the host's own mail (cron, system programs):")
        out += [f"  {line}" for line in facts["sendmail"]]
    return out


def rules_collect(deny: Any, relay_clients: Any, rules: Any, default_env: Any) -> list[Any]:
    """The tcprules list of pyqmail_rules: deny first, then relay clients (RELAYCLIENT set),
    then the hand-written rules, then the default environment as the catch-all rule."""
    out: list[Any] = []
    for index, address in enumerate(_list(deny, "pyqmail_rules__deny")):
        out.append({"address": _string(address, f"pyqmail_rules__deny[{index}]"), "action": "deny"})
    for index, address in enumerate(_list(relay_clients, "pyqmail_rules__relay_clients")):
        out.append(
            {
                "address": _string(address, f"pyqmail_rules__relay_clients[{index}]"),
                "action": "allow",
                "env": {"RELAYCLIENT": ""},
            }
        )
    for index, rule in enumerate(_list(rules, "pyqmail_rules__rules")):
        if not isinstance(rule, Mapping):
            raise AnsibleFilterError(
                f"pyqmail_rules__rules[{index}] must be a mapping with address and action, "
                f"got {rule!r}"
            )
        out.append(rule)
    env = _mapping(default_env, "pyqmail_rules__default_env")
    if env:
        out.append({"address": "", "action": "allow", "env": dict(env)})
    return out


def rules_for_listener(all_rules: Any, env: Any, listener: str = "") -> list[dict[str, Any]]:
    """The rules of a listener with its own environment: ``env`` under every allow rule
    (a rule's own env wins) and a catch-all allow with ``env`` when there is none."""
    variable = f"pyqmail__listener_env.{listener}" if listener else "pyqmail__listener_env"
    extra = dict(_mapping(env, variable))
    out: list[dict[str, Any]] = []
    for rule in _list(all_rules, "pyqmail_rules__all"):
        if rule.get("action") == "allow":
            out.append({**rule, "env": {**extra, **(rule.get("env") or {})}})
        else:
            out.append(rule)
    if not any(rule.get("address") == "" for rule in all_rules):
        out.append({"address": "", "action": "allow", "env": extra})
    return out


def mailbox_dirs(folders: Any) -> list[str]:
    """Directories of a mailbox relative to its home: the Maildir and each Maildir++ folder,
    each with cur/, new/ and tmp/."""
    out = [""] + [f"/Maildir{sub}" for sub in MAILDIR_SUBDIRS]
    for index, folder in enumerate(_list(folders, "pyqmail_mailboxes__folders")):
        name = _string(folder, f"pyqmail_mailboxes__folders[{index}]")
        out.extend(f"/Maildir/.{name}{sub}" for sub in MAILDIR_SUBDIRS)
    return out


def _present(items: list[Any]) -> list[Mapping[str, Any]]:
    """The entries of a role's list that are not ``state: absent``."""
    return [item for item in items if (item or {}).get("state", "present") != "absent"]


def _alias_owners(
    aliases: list[Mapping[str, Any]], boxes: Mapping[str, str], locals_: set[str]
) -> dict[str, set[str]]:
    """Alias name -> the mailboxes it delivers to, through forwards to a local address (a
    mailbox, or another alias: followed to the end) or a mailbox's Maildir path."""
    targets: dict[str, list[str]] = {}
    for index, alias in enumerate(aliases):
        name = _string(alias.get("name"), f"pyqmail_aliases__aliases[{index}].name").lower()
        where = f"pyqmail_aliases__aliases[{index}].targets"
        targets[name] = [_string(t, where) for t in _list(alias.get("targets") or [], where)]
    maildirs = {home.rstrip("/") + "/Maildir/": name for name, home in boxes.items()}

    def resolve(name: str, seen: frozenset[str]) -> set[str]:
        owners: set[str] = set()
        for target in targets.get(name, []):
            local, _at, domain = target.lower().rpartition("@")
            if target in maildirs:
                owners.add(maildirs[target])
            elif domain in locals_ and local in boxes:
                owners.add(local)
            elif domain in locals_ and local in targets and local not in seen:
                owners |= resolve(local, seen | {local})
        return owners

    return {name: resolve(name, frozenset({name})) for name in targets if name not in boxes}


def senders_map(  # noqa: PLR0917 - the inventory variables the map is made of
    mailboxes: Any,
    login_domain: str,
    home_base: str,
    locals_: Any,
    aliases: Any,
    postmaster: Any = None,
) -> list[str]:
    """users/senders, one ``login: address ...`` line per AUTH login (a mailbox with a
    password): its mailbox address in every local domain, every alias that delivers to it
    in every local domain (root, postmaster and mailer-daemon when pyqmail_aliases__postmaster
    is its address), then its own ``senders`` entries (``@domain`` = anyone there)."""
    domains = [d.lower() for d in _list(locals_, "pyqmail_control__locals")]
    boxes_list = _present(_list(mailboxes, "pyqmail_mailboxes__list"))
    boxes: dict[str, str] = {}
    for box in boxes_list:
        name = str(box["name"]).lower()
        boxes[name] = str(box.get("home") or f"{home_base}/{name}")
    # the role writes .qmail-root, -postmaster and -mailer-daemon first; a listed alias of
    # the same name replaces that file, and its entry here replaces theirs
    special = ("root", "postmaster", "mailer-daemon")
    alias_list = [{"name": n, "targets": [postmaster]} for n in special] if postmaster else []
    alias_list += _present(_list(aliases or [], "pyqmail_aliases__aliases"))
    owners = _alias_owners(alias_list, boxes, set(domains))
    lines = []
    for index, box in enumerate(boxes_list):
        if box.get("password") is None:
            continue
        name = str(box["name"]).lower()
        login = box.get("login") or f"{name}@{login_domain}"
        parts = [name, *sorted(alias for alias, who in owners.items() if name in who)]
        owned = [f"{part}@{domain}" for part in parts for domain in domains]
        where = f"pyqmail_mailboxes__list[{index}].senders"
        extra = [_string(e, where).lower() for e in _list(box.get("senders") or [], where)]
        lines.append(f"{login}: {' '.join(dict.fromkeys(owned + extra))}")
    return lines


def sendmail_state(dpkg: Any, stats: Any, target: str) -> list[dict[str, Any]]:
    """Per sendmail path, from ``dpkg-query --search`` and ``stat`` (registered loops):
    ``package`` that owns it ('' = none), ``ours`` (our link to ``target``), ``free`` (ours,
    or absent and no package's: the role may link it)."""
    out = []
    for found, seen in zip(
        _list(dpkg, "dpkg-query results"), _list(stats, "stat results"), strict=True
    ):
        owners = [
            line.split(": ", 1)[0]
            for line in found.get("stdout_lines") or []
            if found.get("rc") == 0 and ": " in line and not line.startswith("diversion ")
        ]
        stat = seen.get("stat") or {}
        ours = bool(stat.get("islnk")) and stat.get("lnk_source") == target
        package = owners[0] if owners else ""
        exists = bool(stat.get("exists"))
        out.append(
            {
                "path": found["item"],
                "package": package,
                "exists": exists,
                "ours": ours,
                "free": not package and (ours or not exists),
            }
        )
    return out


def sendmail_summary(state: Any, enabled: Any, target: str) -> list[str]:
    """The summary's lines about the host's own mail: where each sendmail path leads, and a
    WARNING for a path another MTA package (or someone else) owns."""
    out = []
    for entry in _list(state, "pyqmail_install__sendmail_state"):
        path, package = entry["path"], entry["package"]
        if package:
            out.append(
                f"WARNING: {path} belongs to the package {package}: cron and system mail"
                f" go through {package}, not pyqmail (remove it to send them through pyqmail)"
            )
        elif not enabled:
            out.append(f"{path}: not managed (pyqmail_install__sendmail is false)")
        elif entry["free"]:
            out.append(f"{path} -> {target} (pyqmail-sendmail)")
        else:
            out.append(
                f"WARNING: {path} exists, belongs to no package and is not pyqmail's:"
                " left alone; cron and system mail do not go through pyqmail"
            )
    return out


def dovecot_summary(
    listeners: Any, kinds: Mapping[str, Mapping[str, Any]], port_map: Mapping[str, Any]
) -> dict[str, list[str]]:
    """The Dovecot lines of the run summary: ``ports`` (one per listener, with its label) and
    ``incoming`` (the mail client settings), in imaps, imap, pop3s, pop3 order."""
    wanted = _list(listeners, "pyqmail_dovecot__listeners")
    for index, name in enumerate(wanted):
        if name not in DOVECOT_KINDS:
            raise AnsibleFilterError(
                f"pyqmail_dovecot__listeners[{index}] is {name!r}; "
                f"choose from {', '.join(DOVECOT_KINDS)}"
            )
    ports: list[str] = []
    incoming: list[str] = []
    for name in DOVECOT_KINDS:
        if name not in wanted:
            continue
        port, kind = port_map[name], kinds[name]
        ports.append(f"  port {port}: dovecot ({kind['label']})")
        security = "SSL/TLS" if name.endswith("s") else "STARTTLS"
        incoming.append(f"{str(kind['protocol']).upper()} {port} {security}")
    return {"ports": ports, "incoming": incoming}


def reload_handlers(names: Any, routes: Any) -> list[str]:
    """Handlers to notify for changed control files ``names``: the daemons each file's route
    in pyqmail__reload_routes lists; a name without a route (an extra control file the
    table does not know) reloads both daemons."""
    table = _mapping(routes, "pyqmail__reload_routes")
    daemons: set[str] = set()
    for name in [names] if isinstance(names, str) else _list(names, "control file names"):
        route = table.get(name, list(RELOAD_HANDLERS))
        for index, daemon in enumerate(_list(route, f"pyqmail__reload_routes.{name}")):
            if daemon not in RELOAD_HANDLERS:
                raise AnsibleFilterError(
                    f"pyqmail__reload_routes.{name}[{index}] is {daemon!r}; "
                    f"choose from {', '.join(RELOAD_HANDLERS)}"
                )
            daemons.add(daemon)
    return [handler for daemon, handler in RELOAD_HANDLERS.items() if daemon in daemons]


def changed_items(results: Any, key: str = "key") -> list[str]:
    """The ``item[key]`` of each changed result of a registered loop (skipped ones have none)."""
    registered = _mapping(results, "registered loop result")
    return [
        result["item"][key]
        for result in registered.get("results", [])
        if result.get("changed") and not result.get("skipped")
    ]


class FilterModule:
    """pyqmail's filters (called as pyqmail_<name> in the roles)."""

    def filters(self) -> dict[str, Callable[..., Any]]:
        return {
            "pyqmail_services_wanted": services_wanted,
            "pyqmail_services_svstat_argv": services_svstat_argv,
            "pyqmail_services_summary": services_summary,
            "pyqmail_rules_collect": rules_collect,
            "pyqmail_rules_for_listener": rules_for_listener,
            "pyqmail_mailbox_dirs": mailbox_dirs,
            "pyqmail_senders_map": senders_map,
            "pyqmail_sendmail_state": sendmail_state,
            "pyqmail_sendmail_summary": sendmail_summary,
            "pyqmail_dovecot_summary": dovecot_summary,
            "pyqmail_reload_handlers": reload_handlers,
            "pyqmail_changed_items": changed_items,
        }
