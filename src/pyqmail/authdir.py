"""``<root>/auth``: the directory every password verifier shares, and who may enter it.

Two programs check pyqmail's passwords: pyqmail-smtpd (SMTP AUTH, as ``pyqmaild``) and
``pyqmail-checkpassword`` (IMAP and POP3, run by Dovecot's auth process as ``dovecot``).
What they share lives here: the login locks (``pyqmail.authlock``) and the checker's slots
(``pyqmail.tools.loginslots``). They have one group in common, the group of the password
hashes (``control/smtpusers``, ``pyqmail__auth_group``, ``pyqmaila``): pyqmail-smtpd's user
is a member, Dovecot's auth process gets it as ``extra_groups``. So the directory is
``root:pyqmaila 2770``: both may create and replace files in it, the set-group-id bit gives
every new file that group whoever creates it, and nobody else may even look in (the locks
say which names were guessed). Files in it are ``0660``.

The ``pyqmail_install`` role creates it, before it installs a new daemon (whose restart
and whose checker need it). pyqmail-smtpd started as root creates it too, the same way,
before it drops privileges (an installation by hand); a verifier not running as root cannot
(``<root>`` is root's) and says so (``problem``).
This module imports nothing heavy: the checker calls it before its slot is taken.
"""

from __future__ import annotations

import grp  # the standard library's C module: cheap; imported before any privilege drop
import os

AUTH_DIR = "auth"
HASHES_FILE = "control/smtpusers"  # its group is the verifiers' group
DIR_MODE = 0o2770
FILE_MODE = 0o660


def verifiers_group(root: str | os.PathLike[str]) -> int:
    """The group of the password hashes (our own group when there are none yet)."""
    try:
        return os.stat(os.path.join(root, HASHES_FILE)).st_gid
    except OSError:
        return os.getegid()


def make_dir(root: str | os.PathLike[str]) -> str:
    """``<root>/auth`` as the role makes it, if missing; returns its path. The group and mode
    are set after ``mkdir``: the umask would take the group's bits, and mkdir ignores the
    set-group-id bit. OSError when it cannot be made (the caller names it)."""
    path = os.path.join(root, AUTH_DIR)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return path
    os.chown(path, -1, verifiers_group(root))
    os.chmod(path, DIR_MODE)
    return path


def open_file(path: str, flags: int) -> int:
    """Open ``path`` with ``flags``, creating it ``0660`` whatever the umask when missing
    (a file another verifier must open too). Returns the descriptor (close-on-exec)."""
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except FileNotFoundError:
        pass
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:  # another verifier created it just now
        return os.open(path, flags | os.O_CLOEXEC)
    try:
        os.fchmod(fd, FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def problem(root: str | os.PathLike[str]) -> str:
    """What a verifier that cannot use the directory logs, naming what it must be."""
    path = os.path.join(root, AUTH_DIR)
    if not os.path.isdir(path):
        return (
            f"{path} does not exist: the pyqmail_install role makes it, as does pyqmail-smtpd "
            "started as root (root, the group of control/smtpusers, mode 2770)"
        )
    gid = verifiers_group(root)
    return (
        f"{path} must be group {_group_name(gid)} (that of {HASHES_FILE}), mode 2770, and "
        f"uid {os.getuid()} a member of it"
    )


def _group_name(gid: int) -> str:
    """``pyqmaila (gid 998)``, or ``gid 998`` for a number no group has."""
    try:
        return f"{grp.getgrgid(gid).gr_name} (gid {gid})"
    except KeyError:
        return f"gid {gid}"
