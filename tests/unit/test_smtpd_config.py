"""pyqmail.control.smtpd (control files), pyqmail.tls (contexts) and smtpd's pure helpers."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from pyqmail import tls
from pyqmail.authdb import AuthDB
from pyqmail.control import smtpd as config
from pyqmail.queue.store import MAX_MESSAGE
from pyqmail.smtpd import cli as smtpd
from pyqmail.smtpd.policy import build_policy
from tests.conftest import PKI


@pytest.fixture
def root(tmp_path: Path, pki: PKI) -> Path:
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "me").write_text("mx.test\n")  # required (pyqmail.control.table)
    pki.ca.write_servercert(tmp_path / "control" / "servercert.pem", pki.server)
    return tmp_path


def write(root: Path, name: str, data: str | bytes) -> None:
    path = root / "control" / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def test_defaults_when_files_are_absent(root: Path) -> None:
    (root / "control" / "servercert.pem").unlink()
    cfg = config.load(root)
    assert config.is_domain(cfg.me)
    assert cfg.greeting == cfg.me
    assert cfg.rcpthosts == frozenset()  # no open relay, unlike qmail
    assert cfg.locals == frozenset({cfg.me})
    assert (cfg.databytes, cfg.maxrcpt, cfg.timeoutsmtpd) == (0, 0, 300)
    assert (cfg.maxconnip, cfg.maxconn, cfg.timeouttls, cfg.timeoutterm) == (50, 1000, 30, 10)
    assert (cfg.maxerrors, cfg.timeoutdata, cfg.commitdelay) == (10, 3600, 10)
    assert (cfg.authlockfails, cfg.authlocktime, cfg.authconcurrency) == (10, 600, 2)
    assert cfg.server_tls is None and cfg.authdb is None and cfg.validrcptto is None
    check = cfg.valid_recipient()  # rcptcheck is on by default (pyqmail.checks.recipients)
    assert check is not None and cfg.recipients is not None
    assert check("anyone@mx.test") == ""  # ... but this root has no local addressing yet


def test_values_are_read(root: Path) -> None:
    write(root, "me", "MX.Example.ORG\n")
    write(root, "smtpgreeting", "mx.example.org ESMTP at your service  \n")
    write(root, "rcpthosts", "# ours\nexample.org\n\n.example.net\n")
    write(root, "databytes", "1048576\n")
    write(root, "maxrcpt", "100\n")
    write(root, "commitdelay", "0\n")
    write(root, "tlsclients", "Relay.Test\nuser@example.org\n")
    write(root, "validrcptto", "joe@example.org\n@a.example.net\n")
    cfg = config.load(root)
    assert cfg.me == "mx.example.org"
    assert cfg.greeting == "mx.example.org ESMTP at your service"
    assert cfg.rcpthosts == {"example.org", ".example.net"}
    assert (cfg.databytes, cfg.maxrcpt, cfg.commitdelay) == (1048576, 100, 0)
    assert cfg.tlsclients == {"relay.test", "user@example.org"}
    assert isinstance(cfg.server_tls, ssl.SSLContext)
    check = cfg.valid_recipient()
    assert check is not None
    assert check("Joe@Example.org") == ""  # "": accepted; otherwise the refusal's reason
    assert check("jane@example.org") == "not-in-validrcptto"
    assert check("anyone@a.example.net") == ""
    assert check("anyone@b.example.net") == "not-in-validrcptto"
    assert check("someone@elsewhere.test") == "", "relayed mail is not validrcptto's business"


@pytest.mark.parametrize(
    ("domain", "ok"),
    [
        ("example.org", True),
        ("EXAMPLE.org", True),
        ("a.example.net", True),
        ("a.b.example.net", True),
        ("example.net", False),
        ("xexample.org", False),
        ("example.org.evil", False),
        ("", False),
    ],
)
def test_rcpthosts_matching_is_qmails(root: Path, domain: str, ok: bool) -> None:
    write(root, "rcpthosts", "example.org\n.example.net\n")
    assert config.load(root).rcpthost(domain) is ok


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("databytes", "ten\n", "databytes:1: not a non-negative integer: 'ten'"),
        ("databytes", "-1\n", "databytes:1: not a non-negative integer"),
        ("databytes", "1\n2\n", "databytes:2: only one line expected"),
        ("databytes", "\n", "databytes: file is empty"),
        ("maxconnip", "0\n", "maxconnip:1: 0 is out of range (min 1)"),
        ("maxerrors", "0\n", "maxerrors:1: 0 is out of range (min 1)"),
        ("commitdelay", "1001\n", "commitdelay:1: 1001 is out of range (min 0, max 1000)"),
        ("commitdelay", "2.5\n", "commitdelay:1: not a non-negative integer: '2.5'"),
        ("authlocktime", "0\n", "authlocktime:1: 0 is out of range (min 1, max 86400)"),
        ("authlockfails", "1001\n", "authlockfails:1: 1001 is out of range (min 0, max 1000)"),
        ("authconcurrency", "65\n", "authconcurrency:1: 65 is out of range (min 1, max 64)"),
        ("rcpthosts", "good.test\nbad_domain.test\n", "rcpthosts:2: not a valid domain name"),
        ("rcpthosts", "a.test\r\n", "rcpthosts:1: carriage return"),
        ("rcpthosts", "a.test\n\x00\n", "rcpthosts:2: NUL byte"),
        ("rcpthosts", b"a.test\n\xff\n", "rcpthosts:2: not valid UTF-8"),
        ("rcpthosts", "-bad.test\n", "rcpthosts:1: not a valid domain name"),
        ("locals", ".wild.test\n", "locals:1: not a valid domain name"),
        ("me", "host name\n", "me:1: not a valid host name"),
        ("smtpgreeting", "hello\x07\n", "smtpgreeting: contains control characters"),
        ("validrcptto", "nodomain\n", "validrcptto:1: expected user@domain or @domain"),
        ("validrcptto", "a@bad..test\n", "validrcptto:1: expected user@domain or @domain"),
        ("tlsclients", "two words\n", "tlsclients:1: not a certificate identity"),
        ("smtpusers", "user:not-a-hash\n", "smtpusers"),
        ("clientca.pem", "no pem here\n", "clientca.pem: no CA certificate in it"),
    ],
)
def test_malformed_files_name_file_and_line(
    root: Path, name: str, data: str | bytes, message: str
) -> None:
    write(root, name, data)
    with pytest.raises(config.ConfigError) as err:
        config.load(root)
    assert message in str(err.value)
    assert str(root / "control") in str(err.value)


def test_missing_control_dir(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="control directory does not exist"):
        config.load(tmp_path)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("cert,key,ca", "servercert.pem:1: certificate before the private key"),
        ("cert,ca", "no private key"),
        ("key", "no certificate after the private key"),
        ("key,key,cert", "more than one private key"),
        ("otherkey,cert,ca", "the private key does not match the certificate"),
    ],
)
def test_servercert_layout(root: Path, pki: PKI, layout: str, message: str) -> None:
    parts = {
        "key": pki.server.key_pem,
        "otherkey": pki.client.key_pem,
        "cert": pki.server.cert_pem,
        "ca": pki.ca.cert_pem,
    }
    write(root, "servercert.pem", b"".join(parts[p] for p in layout.split(",")))
    with pytest.raises(config.ConfigError) as err:
        config.load(root)
    assert message in str(err.value)


def test_encrypted_key_is_refused_without_prompting(root: Path, pki: PKI) -> None:
    from cryptography.hazmat.primitives import serialization

    enc = pki.server.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    write(root, "servercert.pem", enc + pki.server.cert_pem)
    with pytest.raises(config.ConfigError, match="encrypted"):
        config.load(root)


def test_server_context_is_mozilla_intermediate(root: Path, pki: PKI) -> None:
    write(root, "clientca.pem", pki.ca.cert_pem)
    ctx = config.load(root).server_tls
    assert ctx is not None
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert ctx.options & tls.OP_PRIORITIZE_CHACHA
    assert ctx.verify_mode == ssl.CERT_OPTIONAL
    suites = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert suites, "no TLS 1.2 suites at all"
    for name in suites:
        assert name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name), name


def test_client_context_options(pki: PKI, tmp_path: Path) -> None:
    both = tmp_path / "clientcert.pem"
    both.write_bytes(pki.client.key_pem + pki.client.cert_pem)
    ctx = tls.client_context(cafile=pki.ca_file, certfile=both)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    loose = tls.client_context(verify=False)
    assert loose.verify_mode == ssl.CERT_NONE and not loose.check_hostname
    with pytest.raises(tls.TLSConfigError, match="cannot read"):
        tls.client_context(certfile=tmp_path / "missing.pem")


@pytest.mark.parametrize(
    ("peercert", "listed", "relay"),
    [
        ({"subject": ((("commonName", "relay.test"),),)}, {"relay.test"}, "relay.test"),
        ({"subject": ((("emailAddress", "Ops@X.test"),),)}, {"ops@x.test"}, "ops@x.test"),
        ({"subjectAltName": (("DNS", "a.test"),)}, {"a.test"}, "a.test"),
        ({"subjectAltName": (("email", "b@x.test"),)}, {"b@x.test"}, "b@x.test"),
        ({"subject": ((("commonName", "relay.test"),),)}, {"other.test"}, None),
        ({}, {"relay.test"}, None),  # not verified: Python gives an empty dict
        (None, {"relay.test"}, None),  # no certificate
    ],
)
def test_client_cert_relay_decision(
    peercert: dict[str, object] | None, listed: set[str], relay: str | None
) -> None:
    session = tls.Session("TLSv1.3", "TLS_AES_128_GCM_SHA256", 128, tls.cert_identities(peercert))
    assert tls.client_cert_relay(session, listed) == relay


# --- smtpd helpers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "wildcard", "result"),
    [
        ("127.0.0.1:25", False, ("127.0.0.1", 25)),
        ("[::1]:587", False, ("::1", 587)),
        ("0.0.0.0:25", True, ("0.0.0.0", 25)),
        ("0.0.0.0:25", False, "refusing to listen on every address"),
        ("[::]:25", False, "refusing to listen on every address"),
        ("::1:25", False, ("::1", 25)),
        ("mail.test:25", False, "is not an IP address"),
        ("127.0.0.1:", False, "port must be a number"),
        ("127.0.0.1:65536", False, "port must be a number"),
        ("127.0.0.1", False, "expected IP:PORT"),
    ],
)
def test_parse_listen(text: str, wildcard: bool, result: tuple[str, int] | str) -> None:
    if isinstance(result, tuple):
        assert smtpd.parse_listen(text, wildcard) == result
    else:
        with pytest.raises(smtpd.UsageError, match=result):
            smtpd.parse_listen(text, wildcard)


@pytest.mark.parametrize(
    ("mode", "env", "expect"),
    [
        ("smtp", {}, {"auth": False, "force_tls": False, "relay": False, "auth_required": False}),
        ("smtp", {"SMTPAUTH": "1"}, {"auth": True}),
        ("smtp", {"FORCETLS": "1"}, {"force_tls": True}),
        ("smtp", {"RELAYCLIENT": ""}, {"relay": True}),
        ("smtp", {"BARELF": "1", "DATABYTES": "500", "MAXRCPT": "7"}, {"bare_lf": True}),
        ("smtps", {}, {"auth": True, "tls_active": True, "starttls": False}),
        ("smtps", {"SMTPAUTH": "0"}, {"auth": False}),
        ("submission", {}, {"auth": True, "force_tls": True, "auth_required": True}),
        ("submission", {"FORCETLS": "0"}, {"force_tls": False}),
        ("submission", {"RELAYCLIENT": ""}, {"auth_required": False, "relay": True}),
        # 0 (unlimited) and more than the queue holds: the queue's limit (552 past it)
        ("smtp", {"DATABYTES": "lots"}, {"databytes": MAX_MESSAGE}),
        ("smtp", {"DATABYTES": "0"}, {"databytes": MAX_MESSAGE}),
        ("smtp", {"DATABYTES": str(4 * 1024**3)}, {"databytes": MAX_MESSAGE}),
        ("smtp", {"DATABYTES": "500"}, {"databytes": 500}),
    ],
)
def test_build_policy(
    root: Path, mode: str, env: dict[str, str], expect: dict[str, object]
) -> None:
    (root / "control" / "smtpusers").write_text("")
    cfg = config.load(root)
    cfg = config.Config(**{**cfg.__dict__, "authdb": AuthDB()})
    policy = build_policy(cfg, mode, "192.0.2.1", env)
    got = {
        "auth": bool(policy.auth_mechanisms),
        "force_tls": policy.force_tls,
        "relay": policy.relay_client,
        "auth_required": policy.auth_required,
        "bare_lf": policy.bare_lf,
        "tls_active": policy.tls_active,
        "starttls": policy.starttls_available,
        "databytes": policy.databytes,
    }
    for key, value in expect.items():
        assert got[key] == value, (key, got)
    if "MAXRCPT" in env:
        assert (policy.databytes, policy.maxrcpt) == (500, 7)
