"""The "port 25 with every check on" row: its DNS, its message, and Postfix's checking peers.

What both servers check, for every message, against one knotd (``tests/dnsserver.py``, the
server the tests use) serving:

- ``sender.example``: SPF ``v=spf1 ip4:127.0.0.7 -all``, the DKIM key ``bench._domainkey``
  (RSA-2048) and DMARC ``p=reject``; ``client.test``: SPF for the HELO name
  ``loadgen.client.test`` (bench/loadgen.py's); ``bl.example``: a DNS blocklist (RFC 5782)
  listing only its test entry 127.0.0.2.
- The load generator connects from 127.0.0.7 (not a relay client of either server), sends
  ``MAIL FROM:<alice@sender.example>`` and one DKIM-signed (dkimpy, rsa-sha256, relaxed/relaxed)
  message of 4,096 bytes, From ``alice@sender.example``. (Not under ``test.``: OpenDKIM's
  libunbound answers that special-use name itself.)

pyqmail: control ``authchecks`` 1, ``dnsbl`` bl.example, ``dnsresolver`` the knotd. Postfix:
``reject_rbl_client bl.example`` and ``check_policy_service`` policyd-spf (Debian's
postfix-policyd-spf-python, a ``spawn`` service of the private master) in
``smtpd_recipient_restrictions``, then the milters OpenDKIM (verifying) and OpenDMARC.

Postfix's resolver (libc), policyd-spf's (dnspython from /etc/resolv.conf) and OpenDMARC's
(libresolv) can only ask port 53 of the addresses in /etc/resolv.conf, which is the
machine's and must not change. So knotd listens on port 53 of a free loopback address
(127.0.53.x), and each of those peers runs in a private mount namespace (``unshare --mount``)
in which a bind mount puts a resolv.conf naming that address over /etc/resolv.conf; pyqmail is
told the same address by ``control/dnsresolver``. Nothing outside those namespaces sees it.

``verify_*`` prove after the runs that both really checked: every message pyqmail queued carries
``spf=pass``, ``dkim=pass`` and ``dmarc=pass`` in its Authentication-Results; the ones Postfix
held carry policyd-spf's ``Received-SPF: Pass`` and OpenDKIM's and OpenDMARC's passes; and a
client on the blocklist (127.0.0.2) is refused by both (the list is really asked).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import smtplib
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bench.certs import CertFiles
from bench.dkim_peer import OPENDKIM, DkimKey, _free_port
from bench.loadgen import make_message
from bench.servers import PostfixServer, PyqmailServer, Server
from tests.dnsserver import DnsServer

SENDER_DOMAIN = "sender.example"
SENDER = f"alice@{SENDER_DOMAIN}"
HELO_DOMAIN = "client.test"  # the load generator says EHLO loadgen.client.test
BLOCKLIST = "bl.example"
CLIENT_IP = "127.0.0.7"  # SPF allows it; on no list; not in either server's relay set
LISTED_IP = "127.0.0.2"  # RFC 5782's test entry: on the list
SELECTOR = "bench"
AUTHSERV_ID = "mx.bench.test"
MESSAGE_SIZE = 4096
OPENDMARC = "/usr/sbin/opendmarc"
POLICYD_SPF = "/usr/bin/policyd-spf"
UNSHARE = "/usr/bin/unshare"


class ChecksPeerError(Exception):
    """The checks row could not be set up, or a server did not really check."""


def dns_host() -> str:
    """A loopback address whose port 53 is free for UDP and TCP (knotd binds it)."""
    for last in range(1, 255):
        host = f"127.0.53.{last}"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind((host, 53))
            except OSError:
                continue
        with socket.socket() as tcp:
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((host, 53))
            except OSError:
                continue
        return host
    raise ChecksPeerError("no address of 127.0.53.0/24 has port 53 free")


def make_key(directory: Path) -> DkimKey:
    """The sender domain's RSA-2048 signing key (PKCS#8 PEM, 0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{SELECTOR}.key"
    pem = rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return DkimKey(SENDER_DOMAIN, SELECTOR, "rsa-sha256", path)


def _txt(value: str) -> str:
    """A TXT record's text as quoted strings of at most 255 characters (RFC 1035)."""
    return " ".join(f'"{value[i : i + 250]}"' for i in range(0, len(value), 250))


def zones(key: DkimKey) -> dict[str, str]:
    """The zones knotd serves for the row."""
    return {
        SENDER_DOMAIN: (
            f"@ TXT {_txt(f'v=spf1 ip4:{CLIENT_IP} -all')}\n"
            f"{SELECTOR}._domainkey TXT {_txt(key.txt_record())}\n"
            f'_dmarc TXT "v=DMARC1; p=reject"\n'
        ),
        HELO_DOMAIN: f"loadgen TXT {_txt(f'v=spf1 ip4:{CLIENT_IP} -all')}\n",
        BLOCKLIST: '2.0.0.127 A 127.0.0.2\n2.0.0.127 TXT "listed: the RFC 5782 test entry"\n',
    }


def signed_message(key: DkimKey) -> bytes:
    """A message of exactly MESSAGE_SIZE bytes, DKIM-Signature included."""

    def sign(size: int) -> bytes:
        msg = make_message(size, sender=SENDER, recipient="user@bench.test")
        sig: bytes = dkim.sign(
            msg,
            SELECTOR.encode(),
            SENDER_DOMAIN.encode(),
            key.path.read_bytes(),
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
            linesep=b"\r\n",
        )
        return sig + msg

    first = sign(MESSAGE_SIZE)
    out = sign(MESSAGE_SIZE - (len(first) - MESSAGE_SIZE))
    if b"\r\n." in out:
        raise ChecksPeerError("the signed message has a line starting with a dot")
    return out


def resolv_conf(path: Path, host: str) -> Path:
    """A resolv.conf naming only the knotd (port 53 of ``host``)."""
    path.write_text(f"nameserver {host}\noptions timeout:2 attempts:1\n")
    path.chmod(0o644)
    return path


def in_namespace(argv: list[str], resolv: Path) -> list[str]:
    """``argv`` in a private mount namespace whose /etc/resolv.conf is ``resolv``; the
    shell execs the program, so the PID stays the one Popen returns."""
    script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
    unshare = [UNSHARE, "--mount", "--propagation", "private", "--"]
    return [*unshare, "sh", "-c", script, str(resolv), *argv]


class Milter:
    """A private milter (opendkim or opendmarc) in the foreground on a free port."""

    program = ""
    user = ""
    conf_flag = "-x"

    def __init__(self, directory: Path, resolv: Path) -> None:
        self.dir = directory
        self.resolv = resolv
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / "milter.log"
        self.root = os.geteuid() == 0

    @property
    def milter(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def config(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 20) -> None:
        """Write the configuration, start the milter, wait until it listens."""
        if not Path(self.program).exists():
            raise ChecksPeerError(f"{self.program} not found: run scripts/install-system-deps")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        lines = self.config()
        if self.root:
            lines.append(f"UserID {self.user}")
            owner = pwd.getpwnam(self.user)
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        conf = self.dir / "milter.conf"
        conf.write_text("\n".join(lines) + "\n")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                in_namespace([self.program, "-f", self.conf_flag, str(conf)], self.resolv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                text = self.log.read_text(errors="replace")[-800:]
                raise ChecksPeerError(f"{self.program} exited ({self.proc.returncode}): {text}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ChecksPeerError(f"{self.program} did not listen on {self.milter}")
            time.sleep(0.05)

    def stop(self, timeout: float = 1) -> None:
        """TERM, then KILL its process group (libmilter is slow to exit on TERM)."""
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


class OpenDkimVerifier(Milter):
    """OpenDKIM verifying every signature (mode v) and adding Authentication-Results."""

    program = OPENDKIM
    user = "opendkim"

    def config(self) -> list[str]:
        return [
            "Syslog no",
            "Mode v",
            f"Socket inet:{self.port}@127.0.0.1",
            f"PidFile {self.dir / 'opendkim.pid'}",
            f"AuthservID {AUTHSERV_ID}",
            "InternalHosts 127.0.0.1",
            "DNSTimeout 5",
            f"Nameservers {self.resolv.read_text().split()[1]}",  # the knotd (libunbound)
            "UMask 002",
        ]


class OpenDmarc(Milter):
    """OpenDMARC taking OpenDKIM's results and policyd-spf's Received-SPF."""

    program = OPENDMARC
    user = "opendmarc"
    conf_flag = "-c"

    def config(self) -> list[str]:
        return [
            "Syslog false",
            f"Socket inet:{self.port}@127.0.0.1",
            f"PidFile {self.dir / 'opendmarc.pid'}",
            f"AuthservID {AUTHSERV_ID}",
            f"TrustedAuthservIDs {AUTHSERV_ID}",
            "IgnoreHosts /dev/null",  # default: 127.0.0.1 is ignored, the generator's too
            "RejectFailures true",
            "SPFIgnoreResults false",
            "SPFSelfValidate false",
            "FailureReports false",
            "HistoryFile /dev/null",
            "UMask 002",
        ]


def policyd_spf_conf(path: Path) -> Path:
    """policyd-spf's configuration: Debian's, but loopback clients are checked too."""
    path.write_text(
        "debugLevel = 0\n"
        "TestOnly = 1\n"
        "HELO_reject = Fail\n"
        "Mail_From_reject = Fail\n"
        "PermError_reject = False\n"
        "TempError_Defer = False\n"
        "skip_addresses = 192.0.2.255/32\n"  # the default skips 127.0.0.0/8
        "Header_Type = SPF\n"
    )
    path.chmod(0o644)
    return path


def main_cf_extra(milters: list[Milter]) -> str:
    """What the checking Postfix adds to the benchmark's main.cf."""
    return f"""\
mynetworks = 127.0.0.1/32
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination,
    reject_rbl_client {BLOCKLIST}, check_policy_service unix:private/policyd-spf
policyd-spf_time_limit = 3600
smtpd_milters = {", ".join(m.milter for m in milters)}
non_smtpd_milters =
milter_default_action = tempfail
"""


def master_cf_extra(conf: Path) -> str:
    return f"policyd-spf unix - n n - 0 spawn user=policyd-spf argv={POLICYD_SPF} {conf}\n"


def _listed_probe(port: int) -> str:
    """MAIL and RCPT from the listed client: the first refusal, or '' if none."""
    with smtplib.SMTP("127.0.0.1", port, source_address=(LISTED_IP, 0), timeout=20) as s:
        s.ehlo(f"loadgen.{HELO_DOMAIN}")
        code, text = s.mail(SENDER)
        if code >= 400:
            return f"{code} {text.decode(errors='replace')}"
        code, text = s.rcpt("user@bench.test")
        if code >= 400:
            return f"{code} {text.decode(errors='replace')}"
        s.rset()
    return ""


def verify_blocklist(name: str, port: int) -> None:
    """The listed client is refused with 554 naming the list: the list is really asked."""
    refusal = _listed_probe(port)
    if not refusal.startswith("554") or BLOCKLIST not in refusal:
        raise ChecksPeerError(f"{name}: a client on {BLOCKLIST} was not refused: {refusal!r}")


def verify_headers(name: str, heads: list[bytes], wanted: list[bytes]) -> None:
    """Every header section has every ``wanted`` piece (lower case), else a loud error."""
    if not heads:
        raise ChecksPeerError(f"{name}: no queued message to verify")
    for head in heads:
        low = head.lower()
        missing = [w for w in wanted if w not in low]
        if missing:
            shown = head.decode(errors="replace")[:1500]
            raise ChecksPeerError(f"{name}: a queued message lacks {missing}:\n{shown}")


def pyqmail_heads(queue_root: Path, limit: int = 50) -> list[bytes]:
    """The header sections of up to ``limit`` messages in pyqmail's queue."""
    from pyqmail.queue.store import Queue

    queue = Queue(queue_root)
    heads: list[bytes] = []
    for name in queue.ids("new"):
        for stored in queue.load("new", name):
            heads.append(stored.body.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0])
            if len(heads) >= limit:
                return heads
    return heads


def postfix_heads(etc: Path, spool: Path, limit: int = 20) -> list[bytes]:
    """The header sections (with milter-added ones) of up to ``limit`` held messages."""
    heads = []
    for path in sorted((spool / "hold").iterdir())[:limit]:
        out = subprocess.run(
            ["/usr/sbin/postcat", "-c", str(etc), "-h", str(path)],
            capture_output=True,
            check=False,
            timeout=30,
        )
        heads.append(out.stdout)
    return heads


PYQMAIL_WANTED = [
    f"authentication-results: {AUTHSERV_ID};".encode(),
    b"spf=pass",
    b"dkim=pass",
    b"dmarc=pass",
]
POSTFIX_WANTED = [b"received-spf: pass", b"dkim=pass", b"dmarc=pass"]


class ChecksPostfix(PostfixServer):
    """The benchmark's private Postfix with the blocklist, policyd-spf and both milters,
    its master (and so policyd-spf) in the knotd's resolv.conf namespace."""

    def __init__(self, base: Path, certs: CertFiles, resolv: Path, milters: list[Milter]) -> None:
        super().__init__(base, certs, tag="-checks")
        self.resolv = resolv
        self.milters = milters

    def main_cf(self, spool: Path, data: Path) -> str:
        base = super().main_cf(spool, data).replace("mynetworks = 127.0.0.0/8\n", "")
        return base + main_cf_extra(self.milters)

    def master_cf(self) -> str:
        return super().master_cf() + master_cf_extra(
            policyd_spf_conf(self.dir / "policyd-spf.conf")
        )

    def command(self) -> list[str]:
        return in_namespace(super().command(), self.resolv)

    @property
    def pids(self) -> list[int]:
        """The master's tree (smtpd, cleanup, policyd-spf...) and the two milters: their
        CPU and memory count as Postfix's."""
        return [self.pid, *(m.proc.pid for m in self.milters if m.proc is not None)]

    def verify(self) -> None:
        """Loudly, unless every held message carries the three passes and the list refuses."""
        heads = postfix_heads(self.dir / "etc", self.dir / "spool")
        verify_headers(self.name, heads, POSTFIX_WANTED)
        verify_blocklist(self.name, self.port)


class ChecksWorld:
    """Everything the row needs, started together and stopped in reverse: knotd, the
    signed message, OpenDKIM and OpenDMARC, and the two checking servers."""

    def __init__(self, base: Path, certs: CertFiles, pyqmail_kwargs: dict[str, Any]) -> None:
        self.dir = base / "checks"
        self.certs = certs
        self.pyqmail_kwargs = pyqmail_kwargs
        self.dns: DnsServer | None = None
        self.milters: list[Milter] = []
        self.servers: dict[str, Server] = {}
        self.message_file = self.dir / "message.eml"

    def start(self, names: list[str]) -> dict[str, Server]:
        """knotd, the message, and a checking server for each of ``names`` (pyqmail,
        postfix; others have no checks)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        key = make_key(self.dir / "key")
        self.message_file.write_bytes(signed_message(key))
        # Port 53 only for Postfix's side (libc asks nothing else); it needs root anyway.
        port = 53 if "postfix" in names else 0
        self.dns = DnsServer(zones(key), host=dns_host() if port else "127.0.0.1", port=port)
        self.dns.__enter__()
        resolv = resolv_conf(self.dir / "resolv.conf", self.dns.host)
        if "pyqmail" in names:
            control = {
                "authchecks": "1",
                "authservid": AUTHSERV_ID,
                "dnsresolver": f"{self.dns.host}@{self.dns.port}",
                "dnsbl": BLOCKLIST,
            }
            server: Server = PyqmailServer(
                self.dir, self.certs, tag="-checks", control=control, **self.pyqmail_kwargs
            )
            server.start()
            self.servers["pyqmail"] = server
        if "postfix" in names:
            self.milters = [
                OpenDkimVerifier(self.dir / "opendkim", resolv),
                OpenDmarc(self.dir / "opendmarc", resolv),
            ]
            for milter in self.milters:
                milter.start()
            server = ChecksPostfix(self.dir, self.certs, resolv, self.milters)
            server.start()
            self.servers["postfix"] = server
        return self.servers

    @property
    def dns_address(self) -> str:
        return "" if self.dns is None else f"{self.dns.host}@{self.dns.port}"

    def loadgen_args(self) -> list[str]:
        """The generator's arguments for this row."""
        return ["--source", CLIENT_IP, "--sender", SENDER, "--message-file", str(self.message_file)]

    def verify(self) -> None:
        """Both servers really checked (see the module's docstring), else ChecksPeerError."""
        for name, server in self.servers.items():
            if name == "pyqmail":
                assert isinstance(server, PyqmailServer)
                verify_headers(name, pyqmail_heads(server.root / "queue"), PYQMAIL_WANTED)
                verify_blocklist(name, server.port)
            elif isinstance(server, ChecksPostfix):
                server.verify()

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()
        for milter in self.milters:
            milter.stop()
        if self.dns is not None:
            self.dns.stop()
