"""Who a process runs as: resolve a user named on the command line, and become it for good.

A daemon started as root resolves every identity it will need first (``resolve``, which
reads ``/etc/passwd`` and ``/etc/group``), then each of its processes drops to its own one
(``become``): uid, primary gid and supplementary groups, and ``setuid(0)`` must fail
afterwards. A user is named by name (its groups come from the group database, as
``initgroups`` does) or as ``uid:gid`` (groups: that gid only), which needs no entry in the
user database (the privilege tests use such ids, so as not to add users to the host).

``pyqmail-send`` runs three identities: the queue manager (``--user``), the remote delivery
child (``--remote-user``) and the local delivery child (``--local-user``); see
``pyqmail.send.spawn``.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass


class PrivilegeError(Exception):
    """A user cannot be resolved or become; the message names the option and the user."""


@dataclass(frozen=True)
class Identity:
    """A process identity: uid, primary gid, supplementary groups, and how it was named."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def current(cls) -> Identity:
        """The identity this process has now (nothing to drop)."""
        return cls(str(os.geteuid()), os.geteuid(), os.getegid(), tuple(os.getgroups()))


def resolve(spec: str, option: str) -> Identity:
    """``name`` or ``uid:gid`` -> Identity; PrivilegeError naming ``option`` if unknown."""
    uid_text, colon, gid_text = spec.partition(":")
    if colon:
        if not (uid_text.isdigit() and gid_text.isdigit()):
            raise PrivilegeError(f"{option} {spec}: expected a user name or uid:gid")
        return Identity(spec, int(uid_text), int(gid_text), (int(gid_text),))
    try:
        pw = pwd.getpwnam(spec)
    except KeyError:
        raise PrivilegeError(f"{option} {spec}: no such user") from None
    return Identity(spec, pw.pw_uid, pw.pw_gid, tuple(os.getgrouplist(spec, pw.pw_gid)))


def drop(user: str | None, *, allow_root: bool, refusal: str) -> Identity | None:
    """A daemon's ``--user``: as root, become ``user`` for good (refused with ``refusal``
    when None, and when it is root unless ``allow_root``); otherwise ``user``, when given,
    must be who we are.
    Returns who we became (None: nothing named). Groups: the user's groups from the group
    database (``initgroups``), for pyqmail-smtpd and pyqmail-send alike."""
    if user is None:
        if os.geteuid() == 0:
            raise PrivilegeError(refusal)
        return None
    who = resolve(user, "--user")
    if who.uid == 0 and not allow_root:
        raise PrivilegeError(f"--user {user} is root; name an unprivileged user")
    become(who)
    return who


def become(who: Identity) -> None:
    """As root: become ``who`` for good (groups, gid, uid; root stays root). Otherwise the
    process must already run as ``who``'s uid."""
    if os.geteuid() != 0:
        if os.geteuid() != who.uid:
            raise PrivilegeError(f"becoming {who.name} needs root; running as uid {os.geteuid()}")
        return
    if who.uid == 0:
        return
    os.setgroups(list(who.groups))
    os.setgid(who.gid)
    os.setuid(who.uid)
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise PrivilegeError(f"privileges could not be dropped to {who.name} (setuid(0) works)")
