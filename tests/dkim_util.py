"""DKIM test helpers: real keys, the records to publish, and two verifiers no one here wrote.

``KeyPair``/``make_keys`` write PKCS#8 PEM key files as the pyqmail_dkim role does and give
the TXT record each selector publishes. ``zone`` turns them into a zone text for
``tests.dnsserver.DnsServer`` (real knotd). The verifiers then fetch the keys from that
server:

- ``dkimpy_verify``: dkimpy (python3-dkim) ``DKIM.verify`` for one signature; its DNS
  lookup is dnspython pointed at the test server (dkimpy's own ``dnsfunc`` hook: the CLI
  ``dkimverify`` can only use /etc/resolv.conf).
- ``opendkim_verify``: ``opendkim -t`` (OpenDKIM's test mode: the milter's own
  verification code and configuration, without an MTA). OpenDKIM's resolver is libunbound
  (``opendkim -V``: USE_UNBOUND); ``Nameservers`` only takes addresses (port 53, which a
  test server must not take), so ``ResolverConfiguration`` points it at an unbound
  configuration with a ``stub-zone`` for each domain at the server's address@port: real
  DNS queries over loopback to knotd. ``TestPublicKeys``/``TestDNSData`` would bypass DNS
  altogether, so they are not used. ``opendkim -t`` reports the first signature of a
  message only, so each signature is checked in a message of its own
  (``one_signature``).
"""

from __future__ import annotations

import base64
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import dkim
import dns.resolver
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

OPENDKIM = "/usr/sbin/opendkim"


@dataclass(frozen=True)
class KeyPair:
    domain: str
    selector: str
    algorithm: str
    path: Path
    txt: str  # the published record, e.g. "v=DKIM1; k=rsa; p=..."

    @property
    def line(self) -> str:
        """The control/dkimkeys line."""
        return f"{self.domain}:{self.selector}:{self.algorithm}:{self.path}"


def private_pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def txt_record(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode()


def make_key(directory: Path, domain: str, selector: str, algorithm: str) -> KeyPair:
    """A new key of ``algorithm`` in ``directory/<selector>.key`` (0640)."""
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == "rsa-sha256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{selector}.key"
    path.write_bytes(private_pem(key))
    path.chmod(0o640)
    return KeyPair(domain, selector, algorithm, path, txt_record(key))


def make_keys(directory: Path, domain: str, tag: str = "a") -> list[KeyPair]:
    """The two keys a signing domain has: RSA-2048 and Ed25519."""
    return [
        make_key(directory, domain, f"s{tag}-rsa", "rsa-sha256"),
        make_key(directory, domain, f"s{tag}-ed", "ed25519-sha256"),
    ]


def zone(keys: list[KeyPair]) -> str:
    """Zone text (relative owners) publishing ``keys`` of one domain, TXT split in 255s."""
    lines = []
    for k in keys:
        strings = " ".join(f'"{k.txt[i : i + 255]}"' for i in range(0, len(k.txt), 255))
        lines.append(f"{k.selector}._domainkey 300 IN TXT {strings}")
    return "\n".join(lines) + "\n"


def signatures(message: bytes) -> list[bytes]:
    """The DKIM-Signature fields at the top of ``message``, each with its CRLF."""
    head = message.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    return [m.group(0) for m in re.finditer(rb"(?im)^DKIM-Signature:.*\r\n(?:[ \t].*\r\n)*", head)]


def one_signature(message: bytes, index: int) -> bytes:
    """``message`` with only its ``index``-th DKIM-Signature field."""
    sigs = signatures(message)
    rest = message
    for sig in sigs:
        rest = rest.replace(sig, b"", 1)
    return sigs[index] + rest


def dkimpy_verify(message: bytes, index: int, host: str, port: int) -> bool:
    """dkimpy's verdict on signature ``index``, its key fetched from the test server."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [host]
    resolver.port = port

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        del timeout
        try:
            answer = resolver.resolve(name.decode(), "TXT")
        except dns.resolver.NXDOMAIN:
            return b""
        return b"".join(b"".join(r.strings) for r in answer)

    try:
        return bool(dkim.DKIM(message).verify(idx=index, dnsfunc=dnsfunc))
    except dkim.ValidationError:  # e.g. "body hash mismatch": dkimpy raises some failures
        return False


def opendkim_verify(message: bytes, domains: list[str], host: str, port: int, workdir: Path) -> str:
    """``opendkim -t``'s report line on the first signature of ``message`` ("... verification
    (s=..., d=..., ...) succeeded" or "... failed: ...")."""
    workdir.mkdir(parents=True, exist_ok=True)
    unbound = workdir / "unbound.conf"
    stubs = "".join(f'stub-zone:\n    name: "{d}"\n    stub-addr: {host}@{port}\n' for d in domains)
    # unbound answers special-use names (test., invalid., RFC 6761) itself unless told not to
    tlds = "".join(f'    local-zone: "{d.rsplit(".", 1)[-1]}." nodefault\n' for d in domains)
    unbound.write_text(
        'server:\n    do-not-query-localhost: no\n    module-config: "iterator"\n' + tlds + stubs
    )
    conf = workdir / "opendkim.conf"
    conf.write_text(f"Mode v\nSyslog no\nDNSTimeout 5\nResolverConfiguration {unbound}\n")
    path = workdir / "message.eml"
    # as SMTP carries it: DATA ends every message with CRLF (opendkim -t reads a file whose
    # last line has none as unsigned)
    path.write_bytes(message if message.endswith(b"\r\n") else message + b"\r\n")
    result = subprocess.run(
        [OPENDKIM, "-x", str(conf), "-t", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return (result.stdout + result.stderr).strip()
