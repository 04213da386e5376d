"""``control/dkimkeys``: the keys that sign now, one line each, and loading their files.

Format (written by the pyqmail_dkim role; ``#`` comments and blank lines ignored)::

    domain:selector:algorithm:keyfile
    example.org:s2026a-rsa:rsa-sha256:/var/qmail/control/dkim/example.org/s2026a-rsa.key
    example.org:s2026a-ed:ed25519-sha256:/var/qmail/control/dkim/example.org/s2026a-ed.key

``algorithm`` is ``rsa-sha256`` or ``ed25519-sha256``; ``keyfile`` an absolute path to an
unencrypted PKCS#8 (or PKCS#1) PEM private key of the matching type. The domains of the file
are the signing domains; every key of a domain signs (one DKIM-Signature each). A missing
file means no signing.

The file itself is public (0644): ``parse`` only checks its syntax, so pyqmail-send's
``--check`` and the manager report a bad line before anything else. The key files are
0640 root:pyqmails: ``load`` runs in pyqmail-send's manager only (never in a delivery child,
never in pyqmail-smtpd or pyqmail-sendmail), and the loaded keys stay in that process
(``pyqmail.control.send.Control``, which is sent to the children, holds none). A key file
that others may read, or its group or a user other than root and the reader may write, is
refused (``_unsafe``; OpenDKIM's ``RequireSafeKeys``). Every error is a ``ControlError``
naming the file and line.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from pyqmail.control import parsers, table
from pyqmail.control.reader import ControlError, Line

ALGORITHMS: Final = ("rsa-sha256", "ed25519-sha256")
MIN_RSA_BITS: Final = 1024  # RFC 8301 3.2: verifiers must not accept less
MAX_KEY_FILE: Final = 64 * 1024

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True)
class KeyLine:
    """One line of ``control/dkimkeys``, checked but not loaded."""

    domain: str
    selector: str
    algorithm: str
    keyfile: Path
    where: str  # file:line, for messages


@dataclass(frozen=True)
class Key:
    """A loaded signing key: what ``pyqmail.dkim.sign`` needs to make one signature."""

    domain: str
    selector: str
    algorithm: str
    private: PrivateKey


def _selector(text: str) -> bool:
    """RFC 6376 3.1: a selector is one or more DNS labels separated by dots."""
    return parsers.is_domain(text)


def parse_line(line: Line) -> KeyLine:
    """One ``domain:selector:algorithm:keyfile`` line; ControlError naming what is wrong."""
    fields = line.text.strip().split(":", 3)
    if len(fields) != 4:
        raise ControlError(
            f"{line.where}: expected domain:selector:algorithm:keyfile, got {line.text!r}"
        )
    domain, selector, algorithm, keyfile = (f.strip() for f in fields)
    if not parsers.is_domain(domain):
        raise ControlError(f"{line.where}: not a valid lower-case domain name: {domain!r}")
    if not _selector(selector):
        raise ControlError(f"{line.where}: not a valid selector (DNS labels): {selector!r}")
    if algorithm not in ALGORITHMS:
        raise ControlError(
            f"{line.where}: unknown algorithm {algorithm!r}: expected rsa-sha256 or ed25519-sha256"
        )
    path = Path(keyfile)
    if not path.is_absolute():
        raise ControlError(f"{line.where}: key file must be an absolute path, got {keyfile!r}")
    return KeyLine(domain, selector, algorithm, path, line.where)


def parse(lines: list[Line]) -> list[KeyLine]:
    """Every line checked; a domain and selector named twice is an error too."""
    entries: list[KeyLine] = []
    seen: dict[tuple[str, str], str] = {}
    for line in lines:
        entry = parse_line(line)
        key = (entry.domain, entry.selector)
        if key in seen:
            raise ControlError(
                f"{line.where}: selector {entry.selector} of {entry.domain} is already "
                f"listed at {seen[key]}"
            )
        seen[key] = line.where
        entries.append(entry)
    return entries


def read_lines(control: Path) -> list[KeyLine]:
    """``control/dkimkeys`` checked (through ``pyqmail.control.table``); [] when absent."""
    return parse(table.DKIMKEYS.read(control))


def _kind(private: object) -> str:
    if isinstance(private, rsa.RSAPrivateKey):
        return "an RSA key"
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return "an Ed25519 key"
    return f"a key of another type ({type(private).__name__})"


def _unsafe(st: os.stat_result) -> str:
    """Why a key file with these permissions must not sign ("" when it may), as OpenDKIM's
    ``RequireSafeKeys``: a key others can read is no longer this host's alone, and one others
    can write may have been replaced (mail signed with an attacker's key verifies as ours). The
    role's files (0640 root:<the signer's group>) pass; checked on the opened file (fstat), so
    the file read is the file checked."""
    mode = stat.S_IMODE(st.st_mode)
    shown = f"mode {mode:04o}, owner uid {st.st_uid}"
    if mode & 0o007:
        return f"{shown}: other users may use it (chmod o= it; the role writes 0640)"
    if mode & 0o020:
        return f"{shown}: its group may replace it (chmod g-w it; the role writes 0640)"
    if st.st_uid not in {0, os.geteuid()}:  # its owner may chmod and rewrite it, whatever the mode
        return (
            f"{shown}: it belongs to a user other than root and this process (uid "
            f"{os.geteuid()}), who may replace it (chown root it; the role writes "
            "root:<group> 0640)"
        )
    return ""


def load_key(entry: KeyLine) -> Key:
    """The private key of one line, checked against its algorithm."""
    where, path = entry.where, entry.keyfile
    try:
        with path.open("rb") as stream:
            unsafe = _unsafe(os.fstat(stream.fileno()))
            pem = b"" if unsafe else stream.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise ControlError(f"{where}: cannot read key file {path}: {exc.strerror}") from None
    if unsafe:
        raise ControlError(f"{where}: key file {path} is unsafe: {unsafe}")
    if len(pem) > MAX_KEY_FILE:
        raise ControlError(f"{where}: key file {path} is larger than {MAX_KEY_FILE} bytes")
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ControlError(
            f"{where}: key file {path} is not an unencrypted PEM private key ({exc})"
        ) from None
    want = rsa.RSAPrivateKey if entry.algorithm == "rsa-sha256" else ed25519.Ed25519PrivateKey
    if not isinstance(private, want):
        raise ControlError(
            f"{where}: key file {path} holds {_kind(private)}, which cannot sign {entry.algorithm}"
        )
    if isinstance(private, rsa.RSAPrivateKey) and private.key_size < MIN_RSA_BITS:
        raise ControlError(
            f"{where}: key file {path}: RSA key of {private.key_size} bits; at least "
            f"{MIN_RSA_BITS} are needed (RFC 8301)"
        )
    return Key(entry.domain, entry.selector, entry.algorithm, private)


def load(control: Path) -> dict[str, list[Key]]:
    """Signing domain -> its keys, in file order; {} when the file is absent (no signing)."""
    keys: dict[str, list[Key]] = {}
    for entry in read_lines(control):
        keys.setdefault(entry.domain, []).append(load_key(entry))
    return keys
