"""The inventory preflight (issue 15): every check runs before the first task that changes a
host, for site.yml and for each playbook alone, and each error is one line naming the variable
and the offending element, nothing else.

Two layers:
- in-process: ``pyqmail_inventory.check`` on the roles' own specs and defaults, one bad value
  at a time (fast, many cases);
- through ansible-playbook --check (local connection): one inventory with one host per bad
  value, run with site.yml and with each playbook; every host must fail in the preflight task
  with exactly its one line, and no other task may have run for it.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pyqmail.control.table import QUEUELIFETIME
from tests.collection import module_utils
from tests.roles.playbook import REPO, ansible_env

# module_utils as the preflight action imports it on the controller (the collection's name)
check = module_utils("pyqmail_inventory").check
ROLES_DIR = REPO / "roles"
ROLES: list[str] = yaml.safe_load((ROLES_DIR / "pyqmail" / "vars" / "main.yml").read_text())[
    "pyqmail__roles"
]
PREFLIGHT_TASK = (
    "pyqmail.mail.pyqmail_preflight : "
    "Check the inventory of every pyqmail role (one line per problem)"
)
HOST_CHECK_TASK = "pyqmail.mail.pyqmail : Check the target runs Debian"
# site.yml runs the collection's playbooks/site.yml (pyqmail.mail.site): not tested twice.
PLAYBOOKS = [
    "site.yml",
    *sorted(str(p.relative_to(REPO)) for p in REPO.glob("playbooks/*.yml") if p.stem != "site"),
]

# What the templated defaults become on a host (the rest of the defaults are plain values).
TEMPLATED = {
    "pyqmail__me": "mail.example.org",
    "pyqmail__listen_ip": "192.0.2.25",
    "pyqmail_control__locals": ["mail.example.org"],
    "pyqmail_control__smtpgreeting": "mail.example.org",
    "pyqmail_certificates__ca_host": "mail.example.org",
    "pyqmail_certificates__ca_dir": "/etc/pyqmail/ca",
    "pyqmail_certificates__ca_common_name": "mail.example.org pyqmail CA",
    "pyqmail_certificates__names": ["mail.example.org", "192.0.2.25"],
    "pyqmail_certificates__fetch_dir": "/tmp/artifacts",
    "pyqmail_install__source_dir": str(REPO),
    "pyqmail_install__build_python": sys.executable,
    "pyqmail_mailboxes__login_domain": "mail.example.org",
    "pyqmail_aliases__postmaster": "admin@example.org",
    "pyqmail_dkim__domains": ["mail.example.org"],
    "pyqmail_dkim__selector_prefix": "mail-",
    "pyqmail_dkim__group": "pyqmails",
}
CONTEXT = {
    "groups": {"all": ["mail.example.org"]},
    "inventory_hostname": "mail.example.org",
    "pyqmail_control__managed": yaml.safe_load(
        (ROLES_DIR / "pyqmail_control" / "vars" / "main.yml").read_text()
    )["pyqmail_control__managed"],
}


def load_role(role: str, part: str) -> dict[str, Any]:
    path = ROLES_DIR / role / part
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


SPECS: dict[str, Any] = {}
DEFAULTS: dict[str, Any] = {}
for _role in ROLES:
    SPECS.update(load_role(_role, "meta/argument_specs.yml")["argument_specs"]["main"]["options"])
    DEFAULTS.update(load_role(_role, "defaults/main.yml"))
DEFAULTS.update(TEMPLATED)

HOME_BASE_SHARED = (
    "is a directory the system and its users share; the role would make it root's with mode "
    "0755 and each <home_base>/<mailbox name> the delivery user's with mode 0700 (/home/alice, "
    "/etc/ssh): give a directory of the mailboxes alone, such as /var/vmail"
)

# (variables set on the host, the one line the preflight must print)
BAD: dict[str, tuple[dict[str, Any], str]] = {
    "nameless-mailbox": (
        {"pyqmail_mailboxes__list": [{"password": "s3cret-pw"}]},
        "pyqmail_mailboxes__list[0]: 'name' is required",
    ),
    "negative-databytes": (
        {"pyqmail_control__databytes": "-5"},
        "pyqmail_control__databytes: -5 is out of range: must be 0 or more (0 = unlimited)",
    ),
    "bad-relay-client": (
        {"pyqmail_rules__relay_clients": ["127.0.0.1", "999.1.1.1"]},
        "pyqmail_rules__relay_clients[1]: '999.1.1.1' is not a tcprules address: '999' is not "
        "a number from 0 to 255 written as tcpserver writes it (no leading zeros) nor a range "
        "like 10-20",
    ),
    "duplicate-mailbox": (
        {"pyqmail_mailboxes__list": [{"name": "alice"}, {"name": "bob"}, {"name": "Alice"}]},
        "pyqmail_mailboxes__list[2].name: 'Alice' is listed twice "
        "(first at pyqmail_mailboxes__list[0])",
    ),
    "alias-target-program": (
        {"pyqmail_aliases__aliases": [{"name": "sales", "targets": ["|/bin/sh"]}]},
        "pyqmail_aliases__aliases[0].targets[0]: '|/bin/sh' is neither user@domain nor a "
        "Maildir path ending in /",
    ),
    "bad-listen-ip": (
        {"pyqmail__listen_ip": "300.1.1.1"},
        "pyqmail__listen_ip: '300.1.1.1' is not an IPv4 or IPv6 address",
    ),
    "bad-port": (
        {"pyqmail_services__ports": {"smtp": 70000}},
        "pyqmail_services__ports.smtp: 70000 is out of range: must be from 1 to 65535",
    ),
    "unknown-variable": (
        {"pyqmail_control__databyte": 1000},
        "pyqmail_control__databyte: no pyqmail role declares this variable (a typo?)",
    ),
    "not-a-boolean": (
        {"pyqmail__allow_wildcard": "maybe"},
        "pyqmail__allow_wildcard: 'maybe' is not a boolean",
    ),
    "unknown-key": (
        {"pyqmail_mailboxes__list": [{"name": "alice", "passwd": "x"}]},
        "pyqmail_mailboxes__list[0]: unknown key 'passwd' "
        "(known: name, home, password, login, cram_md5, senders, state)",
    ),
    "bad-choice": (
        {"pyqmail_daemontools__init": "sysv"},
        "pyqmail_daemontools__init: 'sysv' is not one of auto, systemd, detached",
    ),
    "password-with-newline": (
        {"pyqmail_mailboxes__list": [{"name": "alice", "password": "s3cret\nline"}]},
        "pyqmail_mailboxes__list[0].password: password contains NUL, CR or LF",
    ),
    "relay-client-also-denied": (
        {"pyqmail_rules__deny": ["127.0.0.1"]},
        "pyqmail_rules__relay_clients[0]: address '127.0.0.1' is already used by "
        "pyqmail_rules__deny[0]; tcpserver would use only that",
    ),
    "dkim-rotation-absurd": (
        {"pyqmail_dkim__rotate_days": 5000},
        "pyqmail_dkim__rotate_days: 5000 is out of range: 0 (no rotation) or from "
        "prepublish_days + 1 (8) to 3650",
    ),
    "same-port-twice": (
        {"pyqmail_services__ports": {"smtps": 587}},
        "pyqmail_services__ports.submission: 587 is already the port of smtps",
    ),
    "home-base-shared": (  # mailbox alice would get the login user alice's home
        {"pyqmail_mailboxes__home_base": "/home", "pyqmail_mailboxes__list": [{"name": "alice"}]},
        f"pyqmail_mailboxes__home_base: '/home' {HOME_BASE_SHARED}",
    ),
}

# Only in-process (the playbook runs above cover the ansible-side plumbing).
MORE_BAD: dict[str, tuple[dict[str, Any], str]] = {
    # Every address however written (pyqmail-smtpd's is_unspecified), the daemon's own bound.
    **{
        f"wildcard-{ip}": (
            {"pyqmail__listen_ip": ip},
            f"pyqmail__listen_ip: {ip!r} listens on every address; set an address of the host, "
            "or pyqmail__allow_wildcard=true if that is really meant",
        )
        for ip in ("::", "::0", "0000::", "0:0:0:0:0:0:0:0", "0.0.0.0")
    },
    "dovecot-wildcard": (
        {"pyqmail_dovecot__enabled": True, "pyqmail_dovecot__listen_ip": "0000::"},
        "pyqmail_dovecot__listen_ip: '0000::' listens on every address; set an address of the "
        "host, or pyqmail__allow_wildcard=true if that is really meant",
    ),
    "workers-above-256": (
        {"pyqmail_services__workers": "300"},
        "pyqmail_services__workers: '300': expected 'auto' or a number from 1 to 256",
    ),
    "dovecot-port-clash-same-address-written-otherwise": (
        {
            "pyqmail__listen_ip": "2001:db8::25",
            "pyqmail_dovecot__enabled": True,
            "pyqmail_dovecot__listen_ip": "2001:0db8:0:0::25",
            "pyqmail_dovecot__ports": {"imaps": 993, "pop3s": 995, "imap": 587, "pop3": 110},
        },
        "pyqmail_dovecot__ports.imap: 587 clashes with pyqmail_services__ports.submission on "
        "2001:0db8:0:0::25 (pyqmail_dovecot__listen_ip); give Dovecot another port or address",
    ),
    # pyqmail_control_files wrote these as Python's repr: "['a.example', 'b.example']", "True"
    "extra-list-value": (
        {"pyqmail_control__extra": {"morercpthosts": ["a.example", "b.example"]}},
        "pyqmail_control__extra.morercpthosts: is a list: a one-value file takes a string or an "
        "integer (null removes the file); write its lines as one string, such as "
        "{{ list | join('\\n') }}",
    ),
    "extra-bool-value": (
        {"pyqmail_control__extra": {"tarpitcount": True}},
        "pyqmail_control__extra.tarpitcount: is a bool: a one-value file takes a string or an "
        "integer (null removes the file); quote the text the file needs, such as '1' or '0'",
    ),
    "home-base-shared-spelled-otherwise": (
        {"pyqmail_mailboxes__home_base": "//usr/../etc/"},
        f"pyqmail_mailboxes__home_base: '//usr/../etc/' {HOME_BASE_SHARED}",
    ),
    "home-base-root": (
        {"pyqmail_mailboxes__home_base": "/"},
        f"pyqmail_mailboxes__home_base: '/' {HOME_BASE_SHARED}",
    ),
    "home-base-mail-spool": (
        {"pyqmail_mailboxes__home_base": "/var/mail/"},
        f"pyqmail_mailboxes__home_base: '/var/mail/' {HOME_BASE_SHARED}",
    ),
    "home-base-qmail-root": (
        {"pyqmail_mailboxes__home_base": "/var/qmail"},
        "pyqmail_mailboxes__home_base: '/var/qmail' overlaps pyqmail__root (/var/qmail); a "
        "mailbox would take a directory of pyqmail's own (queue, control, users): give a "
        "directory of the mailboxes alone, such as /var/vmail",
    ),
    "home-base-inside-qmail-root": (
        {"pyqmail_mailboxes__home_base": "/var/qmail/queue"},
        "pyqmail_mailboxes__home_base: '/var/qmail/queue' overlaps pyqmail__root (/var/qmail); "
        "a mailbox would take a directory of pyqmail's own (queue, control, users): give a "
        "directory of the mailboxes alone, such as /var/vmail",
    ),
    "home-base-around-qmail-root": (
        {"pyqmail__root": "/srv/mail/qmail", "pyqmail_mailboxes__home_base": "/srv/mail"},
        "pyqmail_mailboxes__home_base: '/srv/mail' overlaps pyqmail__root (/srv/mail/qmail); "
        "a mailbox would take a directory of pyqmail's own (queue, control, users): give a "
        "directory of the mailboxes alone, such as /var/vmail",
    ),
    "home-base-colon": (
        {"pyqmail_mailboxes__home_base": "/var/v:mail"},
        "pyqmail_mailboxes__home_base: '/var/v:mail' is not an absolute path without ':' or blanks",
    ),
    "wildcard": (
        {"pyqmail__listen_ip": "0.0.0.0"},
        "pyqmail__listen_ip: '0.0.0.0' listens on every address; set an address of the host, "
        "or pyqmail__allow_wildcard=true if that is really meant",
    ),
    "auth-group": (
        {"pyqmail__auth_group": "pyqmail"},
        "pyqmail__auth_group: 'pyqmail' is also pyqmail__group: the delivery user would read "
        "the AUTH password hashes; name a group of the password verifiers only",
    ),
    "host-name": (
        {"pyqmail__me": "mail_1.example.org"},
        "pyqmail__me: 'mail_1.example.org' is not a host name (letters, digits, '-' and dots)",
    ),
    "dmarc-action": (
        {"pyqmail_control__dmarcreject": "bounce"},
        "pyqmail_control__dmarcreject: 'bounce' is not one of reject, quarantine, none",
    ),
    "authtimeout": (
        {"pyqmail_control__authtimeout": 0},
        "pyqmail_control__authtimeout: 0 is out of range: must be from 1 to 60",
    ),
    "dnsresolver": (
        {"pyqmail_control__dnsresolver": ["127.0.0.1@5353", "ns1.example.org"]},
        "pyqmail_control__dnsresolver[1]: 'ns1.example.org' is not an IP address (host or "
        "host@port)",
    ),
    "dnsresolver-port": (
        {"pyqmail_control__dnsresolver": ["::1@70000"]},
        "pyqmail_control__dnsresolver[0]: '::1@70000' has no port from 1 to 65535 after the @",
    ),
    "authservid": (
        {"pyqmail_control__authservid": "mx one"},
        "pyqmail_control__authservid: 'mx one' is not a domain name",
    ),
    "greetdelay": (
        {"pyqmail_control__greetdelay": 61},
        "pyqmail_control__greetdelay: 61 is out of range: must be from 0 to 60",
    ),
    "dnsbl-not-a-domain": (
        {"pyqmail_control__dnsbl": ["zen.spamhaus.org", "not a zone"]},
        "pyqmail_control__dnsbl[1]: not a DNS list zone (a domain name): 'not a zone'",
    ),
    "dnsbl-weight": (
        {"pyqmail_control__dnsbl": ["bl.example=0"]},
        "pyqmail_control__dnsbl[0]: weight of bl.example must be 1 to 100: '0'",
    ),
    "dnswl-weight": (
        {"pyqmail_control__dnswl": ["wl.example=2"]},
        "pyqmail_control__dnswl[0]: wl.example: an allow list takes a filter but no weight:"
        " 'wl.example=2'",
    ),
    "greylist-delay-over-lifetime": (
        {"pyqmail_control__greylistdelay": 3600, "pyqmail_control__greylistlifetime": 600},
        "pyqmail_control__greylistdelay: 3600 seconds is not shorter than"
        " pyqmail_control__greylistlifetime (600): a deferred sender would be forgotten before"
        " it may pass",
    ),
    "not-an-int": (
        {"pyqmail_control__maxrcpt": "lots"},
        "pyqmail_control__maxrcpt: 'lots' is not an integer",
    ),
    "local-domain": (
        {"pyqmail_control__locals": ["example.org", "exa mple.org"]},
        "pyqmail_control__locals[1]: 'exa mple.org' is not a domain name",
    ),
    "extra-managed": (
        {"pyqmail_control__extra": {"databytes": "5"}},
        "pyqmail_control__extra.databytes: written by the role itself; set its own variable "
        "instead",
    ),
    **{
        f"smtproute-relay-{relay}": (
            {"pyqmail_control__smtproutes": [{"domain": "", "relay": relay}]},
            f"pyqmail_control__smtproutes[0].relay: {relay!r} {problem}",
        )
        for relay, problem in (
            (
                "smarthost.example.net.",
                "ends with a dot: write the host name without it (smarthost.example.net)",
            ),
            (
                "999.1.1.1",
                "is not a host name (letters, digits and '-' in dot-separated labels) "
                "nor an IP address",
            ),
            (
                "mx..example",
                "is not a host name (letters, digits and '-' in dot-separated "
                "labels) nor an IP address",
            ),
            (
                "a:b",
                "is not a host name (letters, digits and '-' in dot-separated labels) nor "
                "an IP address",
            ),
        )
    },
    "smtproute-port": (
        {"pyqmail_control__smtproutes": [{"domain": "", "relay": "mx.example.org", "port": 0}]},
        "pyqmail_control__smtproutes[0].port: 0 is out of range: must be from 1 to 65535",
    ),
    "alias-postmaster-absent": (
        {"pyqmail_aliases__aliases": [{"name": "Postmaster", "state": "absent"}]},
        "pyqmail_aliases__aliases[0].state: 'Postmaster' cannot be absent: root, postmaster and "
        "mailer-daemon always forward, to pyqmail_aliases__postmaster or to the targets given "
        "here",
    ),
    "smtproute-user-no-password": (
        {"pyqmail_control__smtproutes": [{"domain": "", "relay": "mx.example.org", "user": "u"}]},
        "pyqmail_control__smtproutes[0].password: is missing; user 'u' needs a password at "
        "the relay",
    ),
    "smtproute-password-no-user": (
        {
            "pyqmail_control__smtproutes": [
                {"domain": "", "relay": "mx.example.org", "password": "s3cret-pw"}
            ]
        },
        "pyqmail_control__smtproutes[0].user: is missing; a password is only sent with a user",
    ),
    "smtproute-auth-empty-relay": (
        {
            "pyqmail_control__smtproutes": [
                {"domain": "", "relay": "", "user": "u", "password": "s3cret-pw"}
            ]
        },
        "pyqmail_control__smtproutes[0].relay: is empty (MX lookup); credentials need a named "
        "relay host",
    ),
    "smtproute-user-colon": (
        {
            "pyqmail_control__smtproutes": [
                {"domain": "", "relay": "mx.example.org", "user": "a:b", "password": "s3cret-pw"}
            ]
        },
        "pyqmail_control__smtproutes[0].user: 'a:b' has a ':' or a control character such as a "
        "line break (smtproutes-auth is relay:user:password, one line)",
    ),
    "smtproute-user-newline": (
        {
            "pyqmail_control__smtproutes": [
                {"domain": "", "relay": "mx.example.org", "user": "a\nb", "password": "s3cret-pw"}
            ]
        },
        "pyqmail_control__smtproutes[0].user: 'a\\nb' has a ':' or a control character such as "
        "a line break (smtproutes-auth is relay:user:password, one line)",
    ),
    "smtproute-password-newline": (
        {
            "pyqmail_control__smtproutes": [
                {"domain": "", "relay": "mx.example.org", "user": "u", "password": "s3cret\npw"}
            ]
        },
        "pyqmail_control__smtproutes[0].password: has a line break or NUL (smtproutes-auth is "
        "one line per relay)",
    ),
    "smtproute-password-spaces": (
        {
            "pyqmail_control__smtproutes": [
                {"domain": "", "relay": "mx.example.org", "user": "u", "password": "s3cret-pw "}
            ]
        },
        "pyqmail_control__smtproutes[0].password: starts or ends with whitespace, which "
        "pyqmail-send strips",
    ),
    "rule-env-bool": (
        {"pyqmail_rules__rules": [{"address": "10.", "env": {"RELAYCLIENT": True}}]},
        "pyqmail_rules__rules[0].env.RELAYCLIENT: True is not a string; give one, e.g. "
        'RELAYCLIENT: "1"',
    ),
    "listener-env-name": (
        {"pyqmail__listener_env": {"smtp": {"1BAD": "1"}}},
        "pyqmail__listener_env.smtp.1BAD: bad variable name '1BAD': letters, digits and '_', "
        "not starting with a digit",
    ),
    "alias-twice": (
        {
            "pyqmail_aliases__aliases": [
                {"name": "abuse", "targets": ["a@example.org"]},
                {"name": "Abuse", "targets": ["b@example.org"]},
            ]
        },
        "pyqmail_aliases__aliases[1].name: 'Abuse' is listed twice "
        "(first at pyqmail_aliases__aliases[0])",
    ),
    "alias-postmaster-no-target": (
        {"pyqmail_aliases__aliases": [{"name": "Postmaster", "targets": []}]},
        "pyqmail_aliases__aliases[0].targets: is empty, which would discard the mail of "
        "'Postmaster'; give a target (root, postmaster and mailer-daemon must reach someone)",
    ),
    "mailbox-senders": (
        {"pyqmail_mailboxes__list": [{"name": "alice", "senders": ["@example.com", "bob"]}]},
        "pyqmail_mailboxes__list[0].senders[1]: 'bob' is neither an address (user@domain) "
        "nor @domain",
    ),
    "mailbox-home": (
        {"pyqmail_mailboxes__list": [{"name": "alice", "home": "var/vmail/alice"}]},
        "pyqmail_mailboxes__list[0].home: 'var/vmail/alice' is not an absolute path without "
        "':' or blanks",
    ),
    "mailbox-home-outside": (
        {"pyqmail_mailboxes__list": [{"name": "alice", "home": "/home/alice"}]},
        "pyqmail_mailboxes__list[0].home: '/home/alice' is not inside "
        "pyqmail_mailboxes__home_base (/var/vmail); the role makes a home the delivery user's "
        "with mode 0700, which would take an existing directory (a user's home, a system path) "
        "from its owner",
    ),
    "mailbox-home-dotdot": (
        {"pyqmail_mailboxes__list": [{"name": "alice", "home": "/var/vmail/../../var"}]},
        "pyqmail_mailboxes__list[0].home: '/var/vmail/../../var' is not inside "
        "pyqmail_mailboxes__home_base (/var/vmail); the role makes a home the delivery user's "
        "with mode 0700, which would take an existing directory (a user's home, a system path) "
        "from its owner",
    ),
    "ca-valid-short": (
        {"pyqmail_certificates__ca_valid_days": 60},
        "pyqmail_certificates__ca_renew_before_days: 90 must be 0 or more and smaller than "
        "pyqmail_certificates__ca_valid_days (60), or every run would re-make the CA",
    ),
    "ca-renew-below-certificates": (
        {"pyqmail_certificates__renew_before_days": 120},
        "pyqmail_certificates__ca_renew_before_days: 90 must be at least "
        "pyqmail_certificates__renew_before_days (120): certificates are not issued from a CA "
        "expiring within 120 days, and the CA is renewed only 90 days before it expires",
    ),
    "provided-key-alone": (
        {"pyqmail_certificates__provided_key": "/etc/ssl/private/mail.key"},
        "pyqmail_certificates__provided_cert: set pyqmail_certificates__provided_key and "
        "pyqmail_certificates__provided_cert together, or neither to use the CA",
    ),
    "ca-host": (
        {"pyqmail_certificates__ca_host": "ca.example.org"},
        "pyqmail_certificates__ca_host: 'ca.example.org' is not a host of the inventory",
    ),
    "cert-names": (
        {"pyqmail_certificates__names": ["mail.example.org", "mail.example.org"]},
        "pyqmail_certificates__names: names lists 'mail.example.org' twice",
    ),
    "renew": (
        {"pyqmail_certificates__renew_before_days": 400},
        "pyqmail_certificates__renew_before_days: 400 must be 0 or more and smaller than "
        "valid_days (397)",
    ),
    "workers": (
        {"pyqmail_services__workers": "0"},
        "pyqmail_services__workers: '0': expected 'auto' or a number from 1 to 256",
    ),
    "timeout": (
        {"pyqmail_services__timeout": 2},
        "pyqmail_services__timeout: 2 must be larger than pyqmail_services__wait (2)",
    ),
    "dkim-domain": (
        {"pyqmail_dkim__domains": ["mail.example.org", "exa_mple.org"]},
        "pyqmail_dkim__domains[1]: 'exa_mple.org' is not a DNS domain name (lower-case labels "
        "of letters, digits and '-', at least two, separated by dots)",
    ),
    "dkim-not-local": (
        {"pyqmail_dkim__domains": ["mail.example.org", "bank.example"]},
        "pyqmail_dkim__domains[1]: 'bank.example' is not a local domain "
        "(pyqmail_control__locals or pyqmail_control__extra.virtualdomains); a host signs only "
        "its own domains",
    ),
    "dkim-twice": (
        {"pyqmail_dkim__domains": ["mail.example.org", "mail.example.org"]},
        "pyqmail_dkim__domains[1]: 'mail.example.org' is listed twice "
        "(first at pyqmail_dkim__domains[0])",
    ),
    "dkim-prefix": (
        {"pyqmail_dkim__selector_prefix": "dkim.2026"},
        "pyqmail_dkim__selector_prefix: 'dkim.2026' is not a selector prefix: 1 to 30 "
        "characters, a lower-case letter first, then letters, digits or '-' (the selector must "
        "be one DNS label)",
    ),
    "dkim-bits": (
        {"pyqmail_dkim__rsa_bits": 1024},
        "pyqmail_dkim__rsa_bits: 1024 is out of range: a multiple of 8 from 2048 to 4096",
    ),
    "dkim-rotation-short": (
        {"pyqmail_dkim__rotate_days": 7},
        "pyqmail_dkim__rotate_days: 7 is out of range: 0 (no rotation) or from "
        "prepublish_days + 1 (8) to 3650",
    ),
    "dkim-prepublish": (
        {"pyqmail_dkim__prepublish_days": 0},
        "pyqmail_dkim__prepublish_days: 0 is out of range: must be from 1 to 365",
    ),
    "dkim-retire-shorter-than-the-queue": (
        {
            "pyqmail_dkim__rotate_days": 30,
            "pyqmail_dkim__retire_days": 10,
            "pyqmail_control__extra": {"queuelifetime": "1209600\n"},
        },
        "pyqmail_dkim__retire_days: 10 days (864000 seconds) is shorter than queuelifetime "
        "(1209600 seconds, pyqmail_control__extra.queuelifetime or pyqmail-send's default): a "
        "message signed just before a key retires and retried later would leave after the "
        "key's DNS record is removed; set it to 14 days or more",
    ),
    "dkim-retire-shorter-than-the-default-queue": (
        {"pyqmail_dkim__rotate_days": 30, "pyqmail_dkim__retire_days": 6},
        "pyqmail_dkim__retire_days: 6 days (518400 seconds) is shorter than queuelifetime "
        "(604800 seconds, pyqmail_control__extra.queuelifetime or pyqmail-send's default): a "
        "message signed just before a key retires and retried later would leave after the "
        "key's DNS record is removed; set it to 7 days or more",
    ),
    "dkim-group": (
        {"pyqmail_dkim__group": "pyqmail"},
        "pyqmail_dkim__group: 'pyqmail' is also pyqmail__group: other daemons would read the "
        "DKIM keys; name a group of pyqmail-send's manager alone",
    ),
    "dnsbl-filter-octet": (  # the daemon's own parser (pyqmail.dnslistspec): the same words
        {
            "pyqmail_control__dnsbl": [
                "zen.example=127.0.0.[2..11]*3",
                "bl.example=127.0.0.[2..300]",
            ]
        },
        "pyqmail_control__dnsbl[1]: filter of bl.example, octet 4: '300' is not a number from"
        " 0 to 255",
    ),
    "dnsbl-twice": (
        {"pyqmail_control__dnsbl": ["bl.example=127.0.0.2", "bl.example=127.0.0.2*2"]},
        "pyqmail_control__dnsbl[1]: bl.example=127.0.0.2 is listed twice",
    ),
    "dnswl-filter-range": (
        {"pyqmail_control__dnswl": ["list.dnswl.example=127.0.[2..15].[3..1]"]},
        "pyqmail_control__dnswl[0]: filter of list.dnswl.example, octet 4: range '3..1' is empty"
        " (3 is above 1)",
    ),
    "null": (
        {"pyqmail_rules__deny": None},
        "pyqmail_rules__deny: is null; give a list (or leave it out for the default)",
    ),
}


def problems_of(overrides: dict[str, Any]) -> list[str]:
    values = copy.deepcopy(DEFAULTS)
    values.update(copy.deepcopy(overrides))
    declared = {k: v for k, v in values.items() if k in SPECS}
    return list(check(declared, SPECS, CONTEXT))


def test_the_defaults_pass() -> None:
    assert problems_of({}) == []


def test_dns_list_filters_and_weights_pass() -> None:
    """Postfix's postscreen syntax and the older zone=weight, as pyqmail-smtpd reads them."""
    lists = {
        "pyqmail_control__dnsbl": [
            "zen.spamhaus.org=127.0.0.[2..11]*3",
            "zen.spamhaus.org=127.0.0.[10;11]",
            "bl.example=2",
            "b.barracudacentral.org*2",
        ],
        "pyqmail_control__dnswl": ["list.dnswl.org=127.0.[0..255].[1..3]", "swl.example"],
    }
    assert problems_of(lists) == []


def test_homes_inside_the_base_and_consistent_ca_margins_pass() -> None:
    boxes = [{"name": "a", "home": "/var/vmail/a"}, {"name": "b", "home": "/var/vmail/x/../b/"}]
    assert problems_of({"pyqmail_mailboxes__list": boxes}) == []
    assert problems_of({"pyqmail_mailboxes__list": [{"name": "a", "home": "/srv/m/a"}],
                        "pyqmail_mailboxes__home_base": "/srv/m/"}) == []  # fmt: skip
    for base in ("/home/vmail", "/srv/mail", "/var/qmailbox", "/var/lib/vmail"):
        assert problems_of({"pyqmail_mailboxes__home_base": base}) == [], base
    margins = {
        "pyqmail_certificates__ca_valid_days": 60,
        "pyqmail_certificates__ca_renew_before_days": 30,
        "pyqmail_certificates__valid_days": 30,
        "pyqmail_certificates__renew_before_days": 10,
    }
    assert problems_of(margins) == []


def test_an_alias_with_empty_targets_passes_it_is_a_discard_address() -> None:
    aliases = [{"name": "void", "targets": []}]
    assert problems_of({"pyqmail_aliases__aliases": aliases}) == []


def test_an_alias_without_a_targets_key_is_refused_not_discarded() -> None:
    aliases = [{"name": "noreply"}, {"name": "gone", "state": "absent"}]
    assert problems_of({"pyqmail_aliases__aliases": aliases}) == [
        "pyqmail_aliases__aliases[0].targets: missing; give the targets ([] for a discard "
        "address, on purpose) or state: absent"
    ]


def test_dkim_domains_may_be_virtual_and_are_unchecked_when_off() -> None:
    virtual = {"pyqmail_control__extra": {"virtualdomains": "shop.example:alice\n.example.net:bob"}}
    assert (
        problems_of({**virtual, "pyqmail_dkim__domains": ["shop.example", "a.example.net"]}) == []
    )
    off = {"pyqmail_dkim__enabled": False, "pyqmail_dkim__domains": ["bank.example"]}
    assert problems_of(off) == []


def test_dkim_retire_days_as_long_as_the_queue_or_rotation_off_pass() -> None:
    """retire_days * 86400 >= queuelifetime passes (the defaults: 10 days, 7); with rotation
    off no key that signed ever retires, so the queue's lifetime does not matter."""
    long_queue = {"pyqmail_control__extra": {"queuelifetime": "1209600"}}
    rotating = {"pyqmail_dkim__rotate_days": 30}
    assert problems_of({**rotating, "pyqmail_dkim__retire_days": 14, **long_queue}) == []
    assert problems_of({**rotating, "pyqmail_dkim__retire_days": 7}) == []
    assert problems_of({"pyqmail_dkim__retire_days": 1, **long_queue}) == []
    off = {"pyqmail_dkim__enabled": False, **rotating, "pyqmail_dkim__retire_days": 1}
    assert problems_of(off) == []


def test_the_queuelifetime_default_is_pyqmail_sends() -> None:
    assert QUEUELIFETIME.value == module_utils("pyqmail_signing").QUEUELIFETIME_DEFAULT


RSPAMD_ON = {"pyqmail_scanners__rspamd_enabled": True}
CLAMD_ON = {"pyqmail_scanners__clamav_enabled": True}


def unlimited(variable: str, limit: int, scanner: str) -> str:
    return (
        f"{variable}: pyqmail_control__databytes is 0 (no limit), so the listeners would take "
        f"messages larger than {limit} bytes, which {scanner} cannot scan, and accept them "
        f"unscanned: set pyqmail_control__databytes to at most {limit}"
    )


RSPAMD_UNLIMITED = unlimited("pyqmail_scanners__rspamd_max_size", 52428800, "rspamd")
CLAMD_UNLIMITED = unlimited("pyqmail_scanners__clamd_max_size", 104857600, "clamd")


@pytest.mark.parametrize(
    ("scanners", "databytes", "expected"),
    [
        (RSPAMD_ON, 0, [RSPAMD_UNLIMITED]),
        (CLAMD_ON, 0, [CLAMD_UNLIMITED]),
        ({**RSPAMD_ON, **CLAMD_ON}, 0, [CLAMD_UNLIMITED, RSPAMD_UNLIMITED]),
        (
            {**RSPAMD_ON, **CLAMD_ON},
            60_000_000,  # within clamd's 100 MiB, above rspamd's 50 MiB
            [
                "pyqmail_scanners__rspamd_max_size: 52428800 is smaller than "
                "pyqmail_control__databytes (60000000): the listeners would take messages "
                "rspamd cannot scan, and accept them unscanned"
            ],
        ),
        ({**RSPAMD_ON, **CLAMD_ON}, 52428800, []),  # at both limits
        ({}, 0, []),  # no scanner: 0 is qmail's no limit
    ],
)
def test_databytes_0_with_a_scanner_is_refused(
    scanners: dict[str, Any], databytes: int, expected: list[str]
) -> None:
    """The review: databytes 0 (a documented 'no limit') skipped the scanners' size checks,
    so a message padded past clamd's 100 MiB was accepted with no virus scan at all."""
    problems = problems_of({**scanners, "pyqmail_control__databytes": databytes})
    assert sorted(problems) == sorted(expected)


# An undeclared variable (a typo) is only seen through the inventory: the playbook runs.
DECLARED_CASES = [c for c, (v, _) in {**BAD, **MORE_BAD}.items() if set(v) <= set(SPECS)]


def test_relays_of_every_form_pass() -> None:
    for relay in ("", "smarthost.example.net", "Relay-1.Example.NET", "localhost", "192.0.2.1",
                  "2001:db8::1"):  # fmt: skip
        route = {"domain": "", "relay": relay}
        assert problems_of({"pyqmail_control__smtproutes": [route]}) == [], relay


def test_the_workers_the_daemon_takes_pass() -> None:
    for workers in ("auto", "1", "256"):
        assert problems_of({"pyqmail_services__workers": workers}) == [], workers


@pytest.mark.parametrize("case", DECLARED_CASES)
def test_one_bad_value_is_one_line(case: str) -> None:
    overrides, expected = {**BAD, **MORE_BAD}[case]
    assert problems_of(overrides) == [expected]


@pytest.mark.parametrize(
    ("entry", "good"),
    [
        ("alice@example.net", True),
        ("@example.com", True),
        ("First.Last+tag@Example.COM", True),
        ("bob", False),
        ("b@c@example.com", False),
        ("@exa mple.com", False),
        ("x@", False),
        ("@", False),
        ("<x@example.com>", False),
        ("x@example.com,y@example.com", False),
    ],
)
def test_a_senders_entry_is_an_address_or_at_domain(entry: str, good: bool) -> None:
    problems = problems_of({"pyqmail_mailboxes__list": [{"name": "a", "senders": [entry]}]})
    assert problems == (
        []
        if good
        else [
            f"pyqmail_mailboxes__list[0].senders[0]: {entry!r} is neither an address "
            "(user@domain) nor @domain"
        ]
    )


def test_all_problems_at_once_and_no_password() -> None:
    problems = problems_of(
        {
            "pyqmail_control__databytes": -1,
            "pyqmail_rules__relay_clients": ["10.1.2"],
            "pyqmail_mailboxes__list": [{"name": "a", "password": "pw\n"}],
            "pyqmail_aliases__aliases": [{"name": "x", "target": ["a@example.org"]}],
        }
    )
    assert len(problems) == 4, problems
    assert [p.split(":", 1)[0] for p in problems] == [
        "pyqmail_aliases__aliases[0]",
        "pyqmail_control__databytes",
        "pyqmail_rules__relay_clients[0]",
        "pyqmail_mailboxes__list[0].password",
    ]
    assert not any("pw" in p.split(":", 1)[1] for p in problems)


# --- through ansible-playbook ---------------------------------------------------------------


def run_playbook(playbook: str, inventory: Path, *extra: str) -> dict[str, Any]:
    env = ansible_env()
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("ansible-playbook")),
            "-i",
            str(inventory),
            "--check",
            "--forks",
            "20",
            *extra,
            playbook,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    try:
        out: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise AssertionError(
            f"no JSON from ansible-playbook:\n{proc.stdout}\n{proc.stderr}"
        ) from exc
    return out


def tasks_per_host(out: dict[str, Any]) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """host -> [(task name, result)] in the order they ran, over every play."""
    ran: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for play in out["plays"]:
        for task in play["tasks"]:
            for host, result in task["hosts"].items():
                ran.setdefault(host, []).append((task["task"]["name"], result))
    return ran


def write_inventory(path: Path, hosts: dict[str, dict[str, Any]]) -> Path:
    inventory = {
        "all": {
            "children": {
                "mailservers": {
                    "vars": {
                        "ansible_connection": "local",
                        "ansible_python_interpreter": sys.executable,
                        "pyqmail__listen_ip": "127.0.0.1",
                        "pyqmail_aliases__postmaster": "admin@example.org",
                    },
                    "hosts": hosts,
                }
            }
        }
    }
    path.write_text(yaml.safe_dump(inventory))
    return path


# Each playbook alone gets the cases issue 15 names; site.yml gets every case of BAD.
CORE = [
    "nameless-mailbox",
    "negative-databytes",
    "bad-relay-client",
    "duplicate-mailbox",
    "alias-target-program",
    "bad-listen-ip",
    "bad-port",
    "unknown-variable",
]


@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_playbook_fails_in_the_preflight_with_one_line(playbook: str, tmp_path: Path) -> None:
    cases = {c: BAD[c] for c in (BAD if playbook == "site.yml" else CORE)}
    inventory = write_inventory(tmp_path / "hosts.yml", {c: v for c, (v, _) in cases.items()})
    ran = tasks_per_host(run_playbook(playbook, inventory))
    for host, (_, expected) in cases.items():
        names = [name for name, _ in ran[host]]
        # Gathering facts only reads; the preflight is the first task, and the last one.
        assert names == ["Gathering Facts", PREFLIGHT_TASK], (host, names)
        result = ran[host][-1][1]
        assert result.get("failed"), (host, result)
        assert result["msg"] == expected, host
        assert "s3cret" not in json.dumps(result), host


def test_good_inventories_pass_the_preflight_and_the_role_specs(tmp_path: Path) -> None:
    """The embedded and the example inventory pass; with --tags matching nothing only the
    tasks tagged always run: facts, the preflight and each role's own argument validation."""
    for inventory in (REPO / "inventory" / "hosts.yml", REPO / "inventory" / "example"):
        out = run_playbook(
            "site.yml",
            inventory,
            "--tags",
            "pyqmail-none",
            "-e",
            json.dumps(
                {
                    "ansible_connection": "local",
                    "ansible_python_interpreter": sys.executable,
                    "pyqmail_certificates__fetch_dir": str(tmp_path),
                }
            ),
        )
        for host, tasks in tasks_per_host(out).items():
            failed = [(name, r.get("msg")) for name, r in tasks if r.get("failed")]
            assert not failed, (inventory, host, failed)
            # The role pyqmail's host checks (tasks/host.yml) run once per run, not per play.
            assert [name for name, _ in tasks].count(HOST_CHECK_TASK) == 1, (inventory, host)
        # In every play (each role depends on it; done once, skipped after), before any
        # other task of a pyqmail role.
        for play in out["plays"]:
            names = [task["task"]["name"] for task in play["tasks"]]
            roles = [name for name in names if name.startswith("pyqmail.mail.")]
            assert roles[0] == PREFLIGHT_TASK, (inventory, play["play"]["name"], names)


def test_a_mistake_is_reported_once_where_it_was_made() -> None:
    """The default certificate names contain pyqmail__listen_ip: a bad listen address is one
    line, not a second one about a certificate name nobody wrote."""
    raw = load_role("pyqmail_certificates", "defaults/main.yml")["pyqmail_certificates__names"]
    values = copy.deepcopy(DEFAULTS)
    values.update(
        {
            "pyqmail__listen_ip": "300.1.1.1",
            "pyqmail_certificates__names": ["mail.example.org", "300.1.1.1"],
        }
    )
    declared = {k: v for k, v in values.items() if k in SPECS}
    alone = "pyqmail__listen_ip: '300.1.1.1' is not an IPv4 or IPv6 address"
    assert len(check(copy.deepcopy(declared), SPECS, CONTEXT)) == 2
    sources = {"pyqmail_certificates__names": str(raw)}
    assert check(declared, SPECS, CONTEXT, sources) == [alone]
