"""SMTP AUTH user database: ``/var/qmail/control/smtpusers`` (its tool: ``pyqmail.tools.users``).

Standard library only: the same file is imported by the daemon and, through the
``module_utils/pyqmail_authdb.py`` symlink, by the ``pyqmail_smtp_user`` Ansible module.

File format, one user per line; ``#`` comment lines and blank lines are kept as they are::

    NAME:HASH
    NAME:HASH:cram=BASE64SECRET

NAME is 1-255 characters without ``:``, whitespace or control characters (usually an
email address) and does not start with ``#``. HASH is passlib's scrypt string,
``$scrypt$ln=14,r=8,p=1$<salt>$<key>`` (salt and 32-byte key in standard base64 without
padding), so existing passlib tooling can read and write it. Hashes are computed with
``hashlib.scrypt`` and compared with ``hmac.compare_digest``.

CRAM-MD5 trade-off: CRAM-MD5 needs the server to hold the password itself (the HMAC-MD5
key), so a ``cram=`` field is a password-equivalent secret. Anyone who reads the file can
log in as that user, unlike with the scrypt hash. It is therefore off by default and only
written for users added with ``--cram-md5`` (Ansible: ``cram_md5: true``); keep the file
mode 0640 root:pyqmaila, the group of the password verifiers (pyqmail-smtpd's user, not
pyqmail-send's). Over TLS, PLAIN/LOGIN with the scrypt hash is the better choice.

Unknown users cost the same as a wrong password: :meth:`AuthDB.verify` runs scrypt on a
dummy hash with the default parameters, so response time does not reveal which names exist.

The tool (``pyqmail-users``) rewrites the file atomically with :func:`atomic_write`
(temporary file in the same directory, fsync, rename, fsync of the directory) keeping the old
file's mode and owner; a file it creates gets mode 0640 and group ``pyqmaila`` when that group
exists (else ``pyqmail``, a host set up before the group of the password verifiers existed).
Each writer (the tool, the Ansible module) reads, changes and replaces the file under
:func:`change_locked`, so an admin's change and a playbook's at the same time both stay.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import re
import secrets
import stat
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

__all__ = [
    "DEFAULT_PATH",
    "AuthDB",
    "AuthDBError",
    "ScryptParams",
    "User",
    "add_kicks",
    "atomic_write",
    "drop_kicks",
    "format_line",
    "hash_password",
    "kicks_path",
    "needs_rehash",
    "parse_hash",
    "parse_line",
    "read_kicks",
    "validate_name",
    "validate_password",
    "verify_password",
]

DEFAULT_PATH = "/var/qmail/control/smtpusers"
# The group of a file the CLI creates: the first that exists (the verifiers', then the
# daemons' group of hosts set up before the verifiers had their own).
DAEMON_GROUPS = ("pyqmaila", "pyqmail")

# Cost parameters for new hashes: N = 2**14, r = 8 is 16 MiB and about 60 ms per check.
DEFAULT_LN = 14
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32  # passlib's scrypt checksum size
MAX_NAME = 255
MAX_PASSWORD = 1024
# A hash line may not make the daemon spend more than this on one check (ln=16,r=8 = 64 MiB).
MAX_SCRYPT_MEMORY = 256 * 1024 * 1024

_HASH_RE = re.compile(
    r"\$scrypt\$ln=(?P<ln>[1-9][0-9]?),r=(?P<r>[1-9][0-9]{0,2}),p=(?P<p>[1-9][0-9]{0,2})"
    r"\$(?P<salt>[A-Za-z0-9+/]+)\$(?P<key>[A-Za-z0-9+/]+)"
)
_SCHEME_RE = re.compile(r"\$([A-Za-z0-9_-]+)\$")
CRAM_PREFIX = "cram="
KICKS_SUFFIX = ".kick"  # control/smtpusers.kick: the logins whose IMAP/POP3 sessions must end
_KICKS_HEADER = "# logins whose IMAP/POP3 sessions must still end (pyqmail-users kick)\n"


class AuthDBError(ValueError):
    """A malformed user line, hash, name or password; names the file and line when known."""

    def __init__(self, message: str, path: str | None = None, lineno: int | None = None) -> None:
        self.message = message
        self.path = path
        self.lineno = lineno
        where = ""
        if path is not None:
            where = f"{path}:{lineno}: " if lineno is not None else f"{path}: "
        super().__init__(where + message)


@dataclass(frozen=True)
class ScryptParams:
    """The parsed parts of one ``$scrypt$`` string."""

    ln: int
    r: int
    p: int
    salt: bytes
    key: bytes

    @property
    def maxmem(self) -> int:
        # OpenSSL needs 128*r*(N+2) for V plus 128*r*p for B; leave room for the rest.
        return 128 * self.r * ((1 << self.ln) + 2 + self.p) + 1024 * 1024


@dataclass(frozen=True)
class User:
    """One line of the database. ``cram`` is the CRAM-MD5 secret (the password), or None."""

    name: str
    hash: str
    cram: str | None = None


def _b64encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii").rstrip("=")


def _b64decode(text: str, what: str) -> bytes:
    """Standard base64 without padding, canonical only (re-encoding gives the same text)."""
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AuthDBError(f"{what} is not valid base64") from exc
    if _b64encode(raw) != text:
        raise AuthDBError(f"{what} is not canonical base64")
    return raw


def validate_name(name: str) -> str:
    """Return ``name`` if it may be a user name, else raise AuthDBError saying why."""
    if not name:
        raise AuthDBError("user name is empty")
    if len(name) > MAX_NAME:
        raise AuthDBError(f"user name is longer than {MAX_NAME} characters")
    if name.startswith("#"):
        raise AuthDBError(f"user name {name!r} starts with '#' (that would be a comment)")
    for ch in name:
        if ch == ":":
            raise AuthDBError(f"user name {name!r} contains ':'")
        if ch.isspace():
            raise AuthDBError(f"user name {name!r} contains whitespace")
        if not ch.isprintable():
            raise AuthDBError(f"user name {name!r} contains a control character")
    return name


def validate_password(password: str) -> str:
    """Return ``password`` if usable for SMTP AUTH (PLAIN separates fields with NUL)."""
    if not password:
        raise AuthDBError("password is empty")
    if len(password) > MAX_PASSWORD:
        raise AuthDBError(f"password is longer than {MAX_PASSWORD} characters")
    if any(ch in password for ch in "\0\r\n"):
        raise AuthDBError("password contains NUL, CR or LF")
    return password


def parse_hash(encoded: str) -> ScryptParams:
    """Parse a passlib ``$scrypt$`` string; raise AuthDBError naming what is wrong."""
    match = _HASH_RE.fullmatch(encoded)
    if match is None:
        scheme = _SCHEME_RE.match(encoded)
        if scheme is not None and scheme.group(1) != "scrypt":
            raise AuthDBError(f"unknown hash scheme {scheme.group(1)!r} (only scrypt)")
        raise AuthDBError("hash is not of the form $scrypt$ln=N,r=R,p=P$<salt base64>$<key base64>")
    params = ScryptParams(
        ln=int(match["ln"]),
        r=int(match["r"]),
        p=int(match["p"]),
        salt=_b64decode(match["salt"], "hash salt"),
        key=_b64decode(match["key"], "hash key"),
    )
    if len(params.salt) < 8:
        raise AuthDBError(f"hash salt is {len(params.salt)} bytes, at least 8 needed")
    if len(params.key) != KEY_BYTES:
        raise AuthDBError(f"hash key is {len(params.key)} bytes, expected {KEY_BYTES}")
    if params.maxmem > MAX_SCRYPT_MEMORY or params.p > 16:
        raise AuthDBError(
            f"hash cost ln={params.ln},r={params.r},p={params.p} is above the limit "
            f"({MAX_SCRYPT_MEMORY >> 20} MiB, p <= 16)"
        )
    return params


def _derive(password: str | bytes, params: ScryptParams, dklen: int) -> bytes:
    secret = password.encode("utf-8") if isinstance(password, str) else password
    return hashlib.scrypt(
        secret,
        salt=params.salt,
        n=1 << params.ln,
        r=params.r,
        p=params.p,
        maxmem=params.maxmem,
        dklen=dklen,
    )


def hash_password(
    password: str, *, ln: int = DEFAULT_LN, r: int = DEFAULT_R, p: int = DEFAULT_P
) -> str:
    """Hash ``password`` with a fresh random salt into passlib's scrypt string."""
    validate_password(password)
    salt = secrets.token_bytes(SALT_BYTES)
    params = ScryptParams(ln=ln, r=r, p=p, salt=salt, key=b"")
    key = _derive(password, params, KEY_BYTES)
    encoded = f"$scrypt$ln={ln},r={r},p={p}${_b64encode(salt)}${_b64encode(key)}"
    parse_hash(encoded)  # refuse parameters this module would not read back
    return encoded


def verify_password(password: str | bytes, encoded: str) -> bool:
    """True if ``password`` matches ``encoded``; constant-time comparison of the keys."""
    params = parse_hash(encoded)
    candidate = _derive(password, params, len(params.key))
    return hmac.compare_digest(candidate, params.key)


def needs_rehash(encoded: str) -> bool:
    """True if ``encoded`` was made with other cost parameters or a shorter salt than now."""
    params = parse_hash(encoded)
    return (params.ln, params.r, params.p) != (DEFAULT_LN, DEFAULT_R, DEFAULT_P) or len(
        params.salt
    ) < SALT_BYTES


# Verifying against this costs exactly what a real default-cost hash costs; no password
# matches it (the key is not the output of scrypt for any input anyone can find).
_DUMMY_HASH = (
    f"$scrypt$ln={DEFAULT_LN},r={DEFAULT_R},p={DEFAULT_P}"
    f"${_b64encode(b'pyqmail-dummy-sa')}${_b64encode(bytes(KEY_BYTES))}"
)


def parse_line(line: str) -> User | None:
    """Parse one line (without its newline): a User, or None for a blank or comment line."""
    if not line.strip() or line.startswith("#"):
        return None
    if line != line.strip():
        raise AuthDBError("line has leading or trailing whitespace")
    fields = line.split(":")
    if len(fields) not in (2, 3):
        raise AuthDBError(
            f"expected NAME:HASH or NAME:HASH:cram=SECRET, got {len(fields)} ':'-separated fields"
        )
    name = validate_name(fields[0])
    encoded = fields[1]
    try:
        parse_hash(encoded)
    except AuthDBError as exc:
        raise AuthDBError(f"user {name!r}: {exc.message}") from None
    cram: str | None = None
    if len(fields) == 3:
        extra = fields[2]
        if not extra.startswith(CRAM_PREFIX):
            raise AuthDBError(f"user {name!r}: third field must be cram=BASE64, got {extra!r}")
        try:
            secret = base64.b64decode(extra[len(CRAM_PREFIX) :], validate=True).decode("utf-8")
        except (binascii.Error, ValueError) as exc:
            raise AuthDBError(f"user {name!r}: cram= secret is not valid base64 UTF-8") from exc
        try:
            cram = validate_password(secret)
        except AuthDBError as exc:
            raise AuthDBError(f"user {name!r}: cram= secret: {exc.message}") from None
    return User(name=name, hash=encoded, cram=cram)


def format_line(user: User) -> str:
    """The file line (without newline) for ``user``; the inverse of :func:`parse_line`."""
    validate_name(user.name)
    parse_hash(user.hash)
    line = f"{user.name}:{user.hash}"
    if user.cram is not None:
        secret = validate_password(user.cram).encode("utf-8")
        line += f":{CRAM_PREFIX}{base64.b64encode(secret).decode('ascii')}"
    return line


class AuthDB:
    """The parsed file. Keeps comments and order so that rewriting it changes only users."""

    def __init__(self, users: Sequence[User] = (), *, path: str | None = None) -> None:
        self.path = path
        self._lines: list[str | User] = []
        self._users: dict[str, User] = {}
        for user in users:
            self.set(user)

    @classmethod
    def parse(cls, text: str, path: str = "<string>") -> AuthDB:
        """Parse file contents; every malformed line raises AuthDBError with path and line."""
        db = cls(path=path)
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        for lineno, line in enumerate(lines, start=1):
            try:
                user = parse_line(line)
            except AuthDBError as exc:
                raise AuthDBError(exc.message, path, lineno) from None
            if user is None:
                db._lines.append(line)
                continue
            if user.name in db._users:
                raise AuthDBError(f"duplicate user {user.name!r}", path, lineno)
            db._users[user.name] = user
            db._lines.append(user)
        return db

    @classmethod
    def load(cls, path: str) -> AuthDB:
        """Read and parse ``path``; AuthDBError names the file (and line) on any problem."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise AuthDBError(f"cannot read: {exc.strerror}", path) from exc
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            lineno = data.count(b"\n", 0, exc.start) + 1
            raise AuthDBError("not valid UTF-8", path, lineno) from exc
        return cls.parse(text, path)

    def __contains__(self, name: object) -> bool:
        return name in self._users

    def __len__(self) -> int:
        return len(self._users)

    def __iter__(self) -> Iterator[User]:
        return iter(self._users.values())

    def get(self, name: str) -> User | None:
        return self._users.get(name)

    def verify(self, name: str, password: str | bytes) -> bool:
        """True if ``name`` exists and ``password`` matches; unknown names cost the same."""
        user = self._users.get(name)
        if user is None:
            verify_password(password, _DUMMY_HASH)
            return False
        return verify_password(password, user.hash)

    def cram_secret(self, name: str) -> str | None:
        """The CRAM-MD5 secret of ``name``, or None (unknown user or CRAM-MD5 not enabled)."""
        user = self._users.get(name)
        return None if user is None else user.cram

    def set(self, user: User) -> None:
        """Add ``user``, or replace the user of that name in place."""
        format_line(user)  # validates every field
        if user.name in self._users:
            index = self._lines.index(self._users[user.name])
            self._lines[index] = user
        else:
            self._lines.append(user)
        self._users[user.name] = user

    def remove(self, name: str) -> bool:
        """Remove ``name``; False if there was no such user."""
        user = self._users.pop(name, None)
        if user is None:
            return False
        self._lines.remove(user)
        return True

    def dump(self) -> str:
        """The file contents, comments and blank lines kept where they were."""
        out = [item if isinstance(item, str) else format_line(item) for item in self._lines]
        return "".join(line + "\n" for line in out)


def atomic_write(
    path: str, data: bytes, *, default_mode: int = 0o640, default_gid: int | None = None
) -> None:
    """Replace ``path`` with ``data``: temp file in the same directory, fsync, rename, fsync dir.

    An existing file's mode and owner carry over; a new file gets ``default_mode`` and, when
    given, the group ``default_gid``. The temp file has them before it is renamed, so the
    hashes are never readable by more than the final mode allows.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    import tempfile  # noqa: PLC0415 - only writers need it; pyqmail-checkpassword starts per login

    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), stat.S_IMODE(st.st_mode) if st else default_mode)
            if st is not None and (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                os.fchown(f.fileno(), st.st_uid, st.st_gid)
            elif st is None and default_gid is not None:
                os.fchown(f.fileno(), -1, default_gid)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# The logins whose open IMAP/POP3 sessions must still end after a change of this file (a new
# hash, a removed user): recorded by whoever changes it (pyqmail-users, the pyqmail_smtp_user
# module) before the change, and emptied by pyqmail-users kick once Dovecot confirms
# (``pyqmail.tools.dovecotkick``). Here, beside the file, because the module and the tool
# both write it.


def kicks_path(path: str) -> str:
    """Where the logins whose sessions must still end are kept: beside ``path``
    (``control/smtpusers.kick``), created root's alone (0600: it names logins)."""
    return path + KICKS_SUFFIX


@contextlib.contextmanager
def change_locked(path: str) -> Iterator[None]:
    """Each change of the file ``path`` (read, then replace) under an exclusive lock of
    ``path.lock``: the module, pyqmail-users and a role's kick may change the user file or
    the kick file at once, and an update made between another's read and its write would be
    lost (a ``del`` beside an ``add`` was undone: the deleted login could log in again).
    Readers (the verifiers) take no lock: each replace is one atomic rename."""
    import fcntl  # noqa: PLC0415 - writers only; pyqmail-checkpassword starts per login

    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_kicks(path: str) -> list[str]:
    """The logins recorded in the file ``path``, a line each, in order (a login recorded
    again since a round began is there twice; none without the file). A line that is no valid
    login (an edit by hand, bytes that are not UTF-8) is left out: it would reach doveadm
    as something else, and is dropped at the file's next change."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    logins = []
    for raw in data.split(b"\n"):
        try:
            line = raw.decode("utf-8")
            if line and not line.startswith("#"):
                logins.append(validate_name(line))
        except (UnicodeDecodeError, AuthDBError):
            continue
    return logins


def add_kicks(path: str, logins: Iterable[str], *, again: bool = True) -> None:
    """Record ``logins`` in the file ``path``, durably; AuthDBError for a login that could
    not be one line of it (a newline would make two logins of one).

    ``again`` (a writer before its change): a login already there is recorded once more, a
    line of its own. A round of kicks under way read the file before this change and takes
    out only the lines it read (``drop_kicks``): this one stays for the next round, whose
    kick comes after the change. Without ``again`` (a round putting back the logins it could
    not end), only a login not there yet is added."""
    wanted = [validate_name(login) for login in dict.fromkeys(logins)]
    if not wanted:
        return
    with change_locked(path):
        known = read_kicks(path)
        new = wanted if again else [login for login in wanted if login not in known]
        if new:
            _write_kicks(path, known + new)


def drop_kicks(path: str, done: Iterable[str]) -> None:
    """Take the lines ``done`` (logins whose sessions a round confirmed gone, each as many
    times as that round read it) out of the file ``path``. What another writer recorded
    meanwhile stays, once per login (the next round ends it after every such change); the
    file goes when nothing is left."""
    read = Counter(done)
    with change_locked(path):
        left = []
        for login in read_kicks(path):
            if read[login] > 0:
                read[login] -= 1
            else:
                left.append(login)
        _write_kicks(path, list(dict.fromkeys(left)))


def _write_kicks(path: str, logins: list[str]) -> None:
    """The file ``path`` with exactly ``logins``, replaced atomically; none: the file goes,
    and its removal is made durable too (under ``change_locked``)."""
    if logins:
        text = _KICKS_HEADER + "".join(login + "\n" for login in logins)
        atomic_write(path, text.encode("utf-8"), default_mode=0o600)
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
