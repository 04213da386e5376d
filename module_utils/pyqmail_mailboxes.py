"""The preflight checks of the local recipients: aliases and mailboxes (rows of CHECKS in
``pyqmail_inventory``: the roles ``pyqmail_aliases`` and ``pyqmail_mailboxes``).

Why its own module: the roles turn these names into files and directories the delivery user
owns, so what a name may be, where a home may lie (and which directory may hold the homes),
whom a mailbox may send as, which login Dovecot accepts and which folders every mailbox gets
are one concept. The login and password rules are ``pyqmail_authdb``'s (the module
``pyqmail_smtp_user``'s), imported, not copied, so the preflight refuses exactly what the
module would refuse later.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from typing import Any

try:
    from pyqmail.authdb import AuthDBError, validate_name, validate_password
except ImportError:  # pragma: no cover - the controller without the pyqmail package
    from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_authdb import (  # type: ignore[import-untyped,import-not-found,no-redef,unused-ignore]
        AuthDBError,
        validate_name,
        validate_password,
    )

from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_checkbase import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    ADDRESS_RE,
    DOMAIN_RE,
    Problems,
    each,
)
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_listeners import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    dovecot_on,
)

LOCAL_PART_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*\Z")
MAILBOX_RE = re.compile(r"[a-z0-9][a-z0-9._+-]{0,63}\Z")
SENDER_LOCAL_RE = re.compile(r"[^@\s:|&#/\\\"<>(),;]{1,64}\Z")
MAILDIR_RE = re.compile(r"/\S*/\Z")
HOME_RE = re.compile(r"/[^:\s]+\Z")
HOME_BASE_RE = re.compile(r"/[^:\s]*\Z")  # "/" too: check_home_base names it
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


def alias_target(name: str, value: Any, values: Mapping[str, Any]) -> Problems:
    """A forward address or a Maildir path; program deliveries are not offered."""
    del values
    if not ADDRESS_RE.match(value) and not MAILDIR_RE.match(value):
        yield f"{name}: {value!r} is neither user@domain nor a Maildir path ending in /"


def check_aliases(name: str, value: list[dict[str, Any]], values: Mapping[str, Any]) -> Problems:
    """pyqmail_aliases__aliases: local-part names, each once; root, postmaster and
    mailer-daemon may be given targets (replacing pyqmail_aliases__postmaster) but not
    removed, or the role would write and remove the same file on every run, nor left without
    targets (their mail must reach someone: RFC 5321 4.5.1). An empty list of targets is
    otherwise a discard address (a .qmail of its marker comment only: dot-qmail(5) delivers
    nowhere), the way to take mail for noreply@ and keep none; it must be given as such: a
    forgotten (or misspelt) ``targets`` key is refused, not taken for a discard."""
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
        if alias.get("targets") is None:
            yield (
                f"{where}.targets: missing; give the targets ([] for a discard address, "
                "on purpose) or state: absent"
            )
            continue
        if not alias["targets"] and alias_name.lower() in ("root", "postmaster", "mailer-daemon"):
            yield (
                f"{where}.targets: is empty, which would discard the mail of {alias_name!r}; "
                "give a target (root, postmaster and mailer-daemon must reach someone)"
            )
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


def check_imap_logins(
    name: str, value: list[dict[str, Any]], values: Mapping[str, Any]
) -> Problems:
    """With Dovecot on, every login must be one Dovecot accepts (auth_username_chars)."""
    if not dovecot_on(values):
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
