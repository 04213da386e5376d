"""DKIM for the outbound benchmark row: the signing keys, and OpenDKIM as Postfix's milter.

Both servers sign with the same two keys the same way: one RSA-2048 (``rsa-sha256``) and
one Ed25519 (``ed25519-sha256``, RFC 8463) signature per message, relaxed/relaxed, the same
header fields (pyqmail's ``pyqmail.dkim.sign.SIGNED``), From over-signed. The keys are
made here with ``cryptography`` (PKCS#8 PEM, unencrypted: what ``control/dkimkeys`` names
and what OpenDKIM's KeyTable reads); ``txt_record`` gives the DNS TXT value each would publish, so
the benchmark can verify a delivered message against them.

``OpenDkim`` runs Debian's ``opendkim`` (2.11) privately: its own configuration, KeyTable,
SigningTable (``refile``, ``*@<domain>``) and PID file in the benchmark's directory, in the
foreground (``-f``) on a free port of 127.0.0.1, stopped by its PID. Signing needs no DNS.
The system's /etc/opendkim.conf is not read. OpenDKIM 2.11 has one ``SignatureAlgorithm``
per instance (given an Ed25519 key in an RSA instance it fails, "EVP_PKEY_get1_RSA()
failed"), so signing with both key types takes two instances, one per key, which Postfix
runs one after the other as two milters: the usual OpenDKIM set-up for dual signing.
"""

from __future__ import annotations

import base64
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from pyqmail.dkim.sign import SIGNED

OPENDKIM = "/usr/sbin/opendkim"
RSA_ALGORITHM = "rsa-sha256"
ED25519_ALGORITHM = "ed25519-sha256"


class DkimPeerError(Exception):
    """OpenDKIM could not be set up or did not come up."""


@dataclass(frozen=True)
class DkimKey:
    """One signing key: where it signs (domain, selector), how, and its PEM file."""

    domain: str
    selector: str
    algorithm: str
    path: Path

    def dkimkeys_line(self, path: Path | None = None) -> str:
        """The ``control/dkimkeys`` line (``domain:selector:algorithm:keyfile``)."""
        return f"{self.domain}:{self.selector}:{self.algorithm}:{path or self.path}"

    def txt_record(self) -> str:
        """The DKIM TXT record the domain publishes for this key (RFC 6376 §3.6.1; for
        Ed25519 the raw 32-byte key, RFC 8463 §4)."""
        key = serialization.load_pem_private_key(self.path.read_bytes(), password=None)
        if isinstance(key, ed25519.Ed25519PrivateKey):
            raw = key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
            return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def make_keys(directory: Path, domain: str) -> list[DkimKey]:
    """An RSA-2048 and an Ed25519 key for ``domain`` in ``directory`` (0600 files)."""
    directory.mkdir(parents=True, exist_ok=True)
    made = []
    for selector, algorithm, key in (
        ("bench-rsa", RSA_ALGORITHM, rsa.generate_private_key(65537, 2048)),
        ("bench-ed", ED25519_ALGORITHM, ed25519.Ed25519PrivateKey.generate()),
    ):
        path = directory / f"{selector}.key"
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        made.append(DkimKey(domain, selector, algorithm, path))
    return made


def copy_keys(keys: list[DkimKey], directory: Path, user: str | None) -> list[DkimKey]:
    """The same keys copied into ``directory``, 0600 and owned by ``user`` (when root):
    each signer reads its own copy, as only the signing process may."""
    directory.mkdir(parents=True, exist_ok=True)
    owner = pwd.getpwnam(user) if user is not None and os.geteuid() == 0 else None
    out = []
    for key in keys:
        path = directory / key.path.name
        shutil.copyfile(key.path, path)
        path.chmod(0o600)
        if owner is not None:
            os.chown(path, owner.pw_uid, owner.pw_gid)
        out.append(DkimKey(key.domain, key.selector, key.algorithm, path))
    if owner is not None:
        os.chown(directory, owner.pw_uid, owner.pw_gid)
    directory.chmod(0o700)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OpenDkim:
    """A private opendkim milter signing with ``key`` for mail from ``*@<domain>``."""

    def __init__(self, directory: Path, key: DkimKey) -> None:
        self.dir = directory
        self.key = key
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / "opendkim.log"
        # Root: opendkim drops to the package's own user (UserID), which must own its keys.
        self.user = "opendkim" if os.geteuid() == 0 else None

    @property
    def milter(self) -> str:
        """What Postfix's ``smtpd_milters`` names."""
        return f"inet:127.0.0.1:{self.port}"

    def config(self) -> str:
        (key,) = copy_keys([self.key], self.dir / "keys", self.user)
        name = f"{key.selector}._domainkey.{key.domain}"
        (self.dir / "keytable").write_text(f"{name} {key.domain}:{key.selector}:{key.path}\n")
        (self.dir / "signingtable").write_text(f"*@{key.domain} {name}\n")
        lines = [
            "Syslog no",
            "Mode s",
            f"Socket inet:{self.port}@127.0.0.1",
            f"PidFile {self.dir / 'opendkim.pid'}",
            f"SignatureAlgorithm {key.algorithm}",
            "Canonicalization relaxed/relaxed",
            f"KeyTable file:{self.dir / 'keytable'}",
            f"SigningTable refile:{self.dir / 'signingtable'}",
            # The fields pyqmail signs (OpenDKIM's default leaves out Message-ID,
            # MIME-Version and the Content-* fields): the same work on both sides.
            f"SignHeaders {','.join(SIGNED)}",
            "OversignHeaders From",
            "InternalHosts 127.0.0.1",
            "UMask 002",
            # The keys are 0600 and the opendkim user's, but the benchmark's directory is
            # under /tmp, which others may write: OpenDKIM would refuse them as unsafe.
            "RequireSafeKeys no",
        ]
        if self.user is not None:
            lines.append(f"UserID {self.user}")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 20) -> None:
        if not Path(OPENDKIM).exists():
            raise DkimPeerError(f"{OPENDKIM} not found: install Debian's opendkim package")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        conf = self.dir / "opendkim.conf"
        conf.write_text(self.config())
        if self.user is not None:
            owner = pwd.getpwnam(self.user)
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [OPENDKIM, "-f", "-x", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise DkimPeerError(
                    f"opendkim exited with status {self.proc.returncode}: "
                    f"{self.log.read_text(errors='replace')[-800:]}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise DkimPeerError(f"opendkim did not listen on {self.milter}; log {self.log}")
            time.sleep(0.05)

    def stop(self, timeout: float = 1) -> None:
        """TERM, then KILL after ``timeout``: opendkim takes about 5 s to exit on TERM
        (libmilter waits for its threads), and once Postfix has stopped nothing is in
        flight, so waiting longer only slows the benchmark down."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
