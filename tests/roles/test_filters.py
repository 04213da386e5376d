"""filter_plugins/pyqmail.py: what the roles compute, with the roles' own vars as inputs.

The last tests run the filters through Ansible itself from the repository root, by their fully
qualified names (pyqmail.mail.*, ansible.cfg's collections_path), the way the roles use them.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from ansible.errors import AnsibleFilterError

from pyqmail.smtpd.senders import load_map

REPO = Path(__file__).resolve().parents[2]
FILTERS = REPO / "filter_plugins" / "pyqmail.py"
_SPEC = importlib.util.spec_from_file_location("pyqmail_filters", FILTERS)
assert _SPEC is not None and _SPEC.loader is not None
filters: Any = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(filters)


def role_vars(role: str, kind: str = "vars") -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "roles" / role / kind / "main.yml").read_text())
    return data


KINDS = role_vars("pyqmail_services")["pyqmail_services__kinds"]
PORTS = {"smtp": 25, "smtps": 465, "submission": 587}
ROUTES = role_vars("pyqmail")["pyqmail__reload_routes"]
LISTENERS, SEND = "pyqmail reload listeners", "pyqmail reload send"


def test_services_wanted_in_fixed_order_with_own_rules() -> None:
    wanted = filters.services_wanted(
        ["submission", "smtp"], KINDS, PORTS, {"submission": {"X": "1"}, "smtp": {}}, "/etc/tcp/x"
    )
    assert wanted == [
        {"name": "qmail-smtpd", "kind": "smtp", "port": 25, "rules": "/etc/tcp/x.cdb"},
        {
            "name": "qmail-smtpd-tls",
            "kind": "submission",
            "port": 587,
            "rules": "/etc/tcp/x-submission.cdb",
        },
        {"name": "qmail-send", "kind": "send", "port": 0},
    ]


def test_services_wanted_defaults_and_none_env() -> None:
    defaults = role_vars("pyqmail_services", "defaults")
    wanted = filters.services_wanted(
        defaults["pyqmail_services__listeners"], KINDS, PORTS, None, "/etc/tcp/smtp"
    )
    assert [s["name"] for s in wanted] == [
        "qmail-smtpd",
        "qmail-smtpd-ssl",
        "qmail-smtpd-tls",
        "qmail-send",
    ]


@pytest.mark.parametrize(
    ("listeners", "env", "message"),
    [
        (["smtp", "imap"], {}, "pyqmail_services__listeners[1] is 'imap'; choose from smtp"),
        ("smtp", {}, "pyqmail_services__listeners must be a list, got str"),
        (["smtp"], ["x"], "pyqmail__listener_env must be a mapping, got list"),
    ],
)
def test_services_wanted_bad_input(listeners: Any, env: Any, message: str) -> None:
    with pytest.raises(AnsibleFilterError, match=message.replace("[", r"\[").replace("]", r"\]")):
        filters.services_wanted(listeners, KINDS, PORTS, env, "/etc/tcp/smtp")


def test_rules_collect_order_and_default_env() -> None:
    rules = filters.rules_collect(
        ["10.9."],
        ["127.", "::1"],
        [{"address": "10.", "action": "allow", "env": {"DATABYTES": "5"}}],
        {"GREETDELAY": "2"},
    )
    assert rules == [
        {"address": "10.9.", "action": "deny"},
        {"address": "127.", "action": "allow", "env": {"RELAYCLIENT": ""}},
        {"address": "::1", "action": "allow", "env": {"RELAYCLIENT": ""}},
        {"address": "10.", "action": "allow", "env": {"DATABYTES": "5"}},
        {"address": "", "action": "allow", "env": {"GREETDELAY": "2"}},
    ]
    assert filters.rules_collect([], [], [], {}) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([], ["127.", 10], [], {}), "pyqmail_rules__relay_clients[1] must be a string, got 10"),
        (([None], [], [], {}), "pyqmail_rules__deny[0] must be a string, got null"),
        (([], [], ["127.:allow"], {}), "pyqmail_rules__rules[0] must be a mapping"),
        (([], [], [], "X=1"), "pyqmail_rules__default_env must be a mapping, got str"),
        (("127.", [], [], {}), "pyqmail_rules__deny must be a list, got str"),
    ],
)
def test_rules_collect_bad_input_names_the_variable(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(AnsibleFilterError) as info:
        filters.rules_collect(*args)
    assert message in str(info.value)


def test_rules_for_listener_merges_env_and_adds_catch_all() -> None:
    rules = filters.rules_collect(["10.9."], ["127."], [], {})
    out = filters.rules_for_listener(rules, {"AUTHREQUIRED": "1"}, "submission")
    assert out == [
        {"address": "10.9.", "action": "deny"},
        {"address": "127.", "action": "allow", "env": {"AUTHREQUIRED": "1", "RELAYCLIENT": ""}},
        {"address": "", "action": "allow", "env": {"AUTHREQUIRED": "1"}},
    ]
    # a rule's own env wins; an existing catch-all gets the env and no second one is added
    rules = [{"address": "", "action": "allow", "env": {"AUTHREQUIRED": "0"}}]
    assert filters.rules_for_listener(rules, {"AUTHREQUIRED": "1", "X": "y"}) == [
        {"address": "", "action": "allow", "env": {"AUTHREQUIRED": "0", "X": "y"}}
    ]
    with pytest.raises(AnsibleFilterError, match=r"pyqmail__listener_env\.smtps must be a mapping"):
        filters.rules_for_listener(rules, ["AUTHREQUIRED"], "smtps")


def test_mailbox_dirs() -> None:
    base = ["", "/Maildir", "/Maildir/cur", "/Maildir/new", "/Maildir/tmp"]
    assert filters.mailbox_dirs([]) == base
    defaults = role_vars("pyqmail_mailboxes", "defaults")["pyqmail_mailboxes__folders"]
    dirs = filters.mailbox_dirs(defaults)
    assert dirs[:5] == base
    assert len(dirs) == 5 + 4 * len(defaults)
    assert filters.mailbox_dirs(["Sent"])[5:] == [
        "/Maildir/.Sent",
        "/Maildir/.Sent/cur",
        "/Maildir/.Sent/new",
        "/Maildir/.Sent/tmp",
    ]
    with pytest.raises(AnsibleFilterError, match=r"pyqmail_mailboxes__folders\[1\] must be a str"):
        filters.mailbox_dirs(["Sent", 7])


def test_reload_handlers_follow_the_routes_table() -> None:
    assert filters.reload_handlers(["queuelifetime"], ROUTES) == [SEND]
    assert filters.reload_handlers(["maxconn", "rcpthosts"], ROUTES) == [LISTENERS]
    assert filters.reload_handlers(["me"], ROUTES) == [LISTENERS, SEND]
    assert filters.reload_handlers(["maxconn", "queuelifetime"], ROUTES) == [LISTENERS, SEND]
    assert filters.reload_handlers(["unknownfile"], ROUTES) == [LISTENERS, SEND]
    assert filters.reload_handlers("maxconn", ROUTES) == [LISTENERS]
    assert filters.reload_handlers([], ROUTES) == []
    assert filters.reload_handlers(["quiet"], {"quiet": []}) == []
    with pytest.raises(AnsibleFilterError, match=r"reload_routes\.x\[0\] is 'imapd'"):
        filters.reload_handlers(["x"], {"x": ["imapd"]})


def test_changed_items_of_a_registered_loop() -> None:
    registered = {
        "changed": True,
        "results": [
            {"changed": True, "item": {"key": "maxconn", "value": 3}},
            {"changed": False, "item": {"key": "queuelifetime", "value": 9}},
            {"changed": False, "skipped": True, "item": {"key": "x"}},
        ],
    }
    assert filters.changed_items(registered) == ["maxconn"]
    assert filters.changed_items({"skipped": True, "results": []}) == []


def ansible_debug(expression: str, extra: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """Evaluate ``expression`` with ``ansible localhost -m debug`` from the repository root."""
    return subprocess.run(
        [str(Path(sys.executable).with_name("ansible")), "localhost", "-c", "local",
         "-i", "localhost,", "-m", "ansible.builtin.debug", "-a", f"msg={{{{ {expression} }}}}",
         "-e", json.dumps(extra), "-e", f"ansible_python_interpreter={sys.executable}"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_ansible_finds_the_filters_through_ansible_cfg() -> None:
    """By their fully qualified names: the checkout is the collection pyqmail.mail."""
    proc = ansible_debug(
        "folders | pyqmail.mail.pyqmail_mailbox_dirs | length", {"folders": ["Sent"]}
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '"msg": 9' in proc.stdout or "msg: 9" in proc.stdout, proc.stdout


def test_bad_inventory_value_fails_with_the_variable_name() -> None:
    proc = ansible_debug(
        "[] | pyqmail.mail.pyqmail_rules_collect(relay, [], {})", {"relay": ["127.", ["10."]]}
    )
    assert proc.returncode != 0
    message = "pyqmail_rules__relay_clients[1] must be a string, got ['10.']"
    assert message in proc.stdout + proc.stderr


def test_dovecot_summary_with_the_roles_kinds() -> None:
    kinds = role_vars("pyqmail_dovecot")["pyqmail_dovecot__kinds"]
    ports = {"imaps": 993, "imap": 143, "pop3s": 995, "pop3": 110}
    summary = filters.dovecot_summary(["pop3s", "imaps", "imap"], kinds, ports)
    assert summary == {
        "ports": [
            "  port 993: dovecot (IMAP, implicit TLS)",
            "  port 143: dovecot (IMAP, STARTTLS required before login (LOGINDISABLED))",
            "  port 995: dovecot (POP3, implicit TLS)",
        ],
        "incoming": ["IMAP 993 SSL/TLS", "IMAP 143 STARTTLS", "POP3 995 SSL/TLS"],
    }
    assert filters.dovecot_summary([], kinds, ports) == {"ports": [], "incoming": []}
    with pytest.raises(AnsibleFilterError, match=r"pyqmail_dovecot__listeners\[0\] is 'smtp'"):
        filters.dovecot_summary(["smtp"], kinds, ports)


def test_services_svstat_argv_and_summary() -> None:
    wanted = filters.services_wanted(["smtp", "submission"], KINDS, PORTS, {}, "/etc/tcp/smtp")
    dovecot = {
        "service": "/etc/service/dovecot",
        "listen": "127.0.0.1",
        "ports": ["  port 993: dovecot (IMAP, implicit TLS)"],
        "incoming": ["IMAP 993 SSL/TLS"],
        "autoconfig": "",
    }
    assert filters.services_svstat_argv(wanted, "/etc/service", {}) == [
        "svstat",
        "/etc/service/qmail-smtpd",
        "/etc/service/qmail-smtpd/log",
        "/etc/service/qmail-smtpd-tls",
        "/etc/service/qmail-smtpd-tls/log",
        "/etc/service/qmail-send",
        "/etc/service/qmail-send/log",
    ]
    assert filters.services_svstat_argv(wanted, "/s", dovecot)[-2:] == [
        "/etc/service/dovecot",
        "/etc/service/dovecot/log",
    ]
    scanners = {
        "services": ["/etc/service/rspamd", "/etc/service/clamd"],
        "lines": ["rspamd (spam) at 127.0.0.1:11333", "clamd (viruses) at /run/clamd.ctl"],
    }
    assert filters.services_svstat_argv(wanted, "/s", dovecot, scanners)[-6:] == [
        "/etc/service/dovecot",
        "/etc/service/dovecot/log",
        "/etc/service/rspamd",
        "/etc/service/rspamd/log",
        "/etc/service/clamd",
        "/etc/service/clamd/log",
    ]
    assert filters.services_svstat_argv(wanted, "/s", {}, {"services": [], "lines": []}) == (
        filters.services_svstat_argv(wanted, "/s")
    )
    facts = {
        "kinds": KINDS,
        "host": "mx1",
        "me": "mx1.example.org",
        "listen_ip": "192.0.2.25",
        "dovecot": {},
        "svstat": {"stdout_lines": ["/etc/service/qmail-smtpd: up (pid 7) 9 seconds"]},
        "config_dir": "/etc/pyqmail",
        "fetched": "",
    }
    lines = filters.services_summary(wanted, {**facts, "version": "pyqmail-smtpd 1.2.3\n"})
    assert lines[:4] == [
        "host: mx1 (me: mx1.example.org, pyqmail 1.2.3)",
        "listen address: 192.0.2.25",
        "  port 25: qmail-smtpd (SMTP, STARTTLS offered, no AUTH)",
        "  port 587: qmail-smtpd-tls (submission, STARTTLS then AUTH)",
    ]
    assert "  outgoing: SMTP 587 STARTTLS" in lines
    assert "  incoming: none (pyqmail_dovecot__enabled is false)" in lines
    assert not any(line.startswith("scanning") for line in lines)  # scanners' play not run
    idle = filters.services_summary(wanted, {**facts, "scanners": {"services": [], "lines": []}})
    assert "scanning before the 250: none" in idle
    scanned = filters.services_summary(wanted, {**facts, "scanners": scanners})
    at = scanned.index("scanning before the 250:")
    assert scanned[at + 1 : at + 3] == [
        "  rspamd (spam) at 127.0.0.1:11333",
        "  clamd (viruses) at /run/clamd.ctl",
    ]
    assert lines[-2:] == [
        "  /etc/service/qmail-smtpd: up (pid 7) 9 seconds",
        "CA certificate for mail clients: /etc/pyqmail/ca.pem on the host",
    ]
    lines = filters.services_summary(
        wanted[-1:], {**facts, "dovecot": dovecot, "fetched": "/ctl/ca.pem", "svstat": None}
    )
    assert "IMAP/POP3 listen address: 127.0.0.1" in lines
    assert lines[0] == "host: mx1 (me: mx1.example.org)"  # no version: pyqmail-smtpd missing
    assert "  outgoing: none (no submission or smtps listener)" in lines
    assert "  incoming: IMAP 993 SSL/TLS" in lines
    assert lines[-1] == "  and /ctl/ca.pem on the controller"


SENDER_BOXES = [
    {"name": "alice", "password": "a-pw-1234"},
    {"name": "Bob", "password": "b-pw-1234", "login": "bob", "senders": ["@Example.COM"]},
    {"name": "carol", "password": "c-pw-1234", "home": "/srv/mail/carol"},
    {"name": "nopass"},  # no AUTH login: not in the map
    {"name": "gone", "password": "g-pw-1234", "state": "absent"},
]
SENDER_ALIASES = [
    {"name": "sales", "targets": ["alice@example.org", "bob@example.net"]},  # both deliver
    {"name": "team", "targets": ["sales@example.org"]},  # through another alias
    {"name": "archive", "targets": ["/srv/mail/carol/Maildir/"]},  # carol's Maildir
    {"name": "outside", "targets": ["alice@elsewhere.example"]},  # not a local address
    {"name": "loop1", "targets": ["loop2@example.org"]},
    {"name": "loop2", "targets": ["loop1@example.org"]},
    {"name": "alice", "targets": ["bob@example.org"]},  # a mailbox wins over an alias
    {"name": "old", "targets": ["alice@example.org"], "state": "absent"},
]


def test_senders_map_from_mailboxes_aliases_and_senders() -> None:
    lines = filters.senders_map(
        SENDER_BOXES,
        "example.org",
        "/var/vmail",
        ["example.org", "Example.NET"],
        SENDER_ALIASES,
        "carol@example.org",
    )
    assert lines == [
        "alice@example.org: alice@example.org alice@example.net sales@example.org"
        " sales@example.net team@example.org team@example.net",
        "bob: bob@example.org bob@example.net sales@example.org sales@example.net"
        " team@example.org team@example.net @example.com",
        "carol@example.org: carol@example.org carol@example.net archive@example.org"
        " archive@example.net mailer-daemon@example.org mailer-daemon@example.net"
        " postmaster@example.org postmaster@example.net root@example.org root@example.net",
    ]


def test_senders_map_bad_input_names_the_variable() -> None:
    with pytest.raises(AnsibleFilterError, match=r"pyqmail_mailboxes__list\[0\]\.senders"):
        filters.senders_map([{"name": "a", "password": "x", "senders": "@x.org"}], "x.org",
                            "/v", ["x.org"], [])  # fmt: skip


def test_the_role_template_writes_a_map_the_daemon_loads(tmp_path: Path) -> None:
    """The pyqmail_mailboxes template, rendered by Ansible, read by pyqmail-smtpd's loader."""
    dest = tmp_path / "senders"
    extra = {
        "pyqmail_mailboxes__present": SENDER_BOXES[:4],
        "pyqmail_mailboxes__login_domain": "example.org",
        "pyqmail_mailboxes__home_base": "/var/vmail",
        "pyqmail_control__locals": ["example.org"],
        "pyqmail_aliases__aliases": SENDER_ALIASES,
        "pyqmail__me": "mx.example.org",
    }
    template = REPO / "roles/pyqmail_mailboxes/templates/var/qmail/users/senders.j2"
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("ansible")), "localhost", "-c", "local",
         "-i", "localhost,", "-m", "ansible.builtin.template", "-a", f"src={template} dest={dest}",
         "-e", json.dumps(extra), "-e", f"ansible_python_interpreter={sys.executable}"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    senders = load_map(dest)
    assert senders is not None
    assert senders.owns("alice@example.org", "Sales@Example.org")
    assert senders.owns("bob", "anyone@example.com")
    assert not senders.owns("alice@example.org", "bob@example.org")
    assert not senders.owns("carol@example.org", "root@example.org")  # no postmaster given
