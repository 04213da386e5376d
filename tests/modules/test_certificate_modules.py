"""pyqmail_ca and pyqmail_certificate: in-process (set_module_args) and through ansible-playbook.

What is produced is checked with the real ``openssl verify`` and by Python's ``ssl`` loading
servercert.pem as certfile and keyfile - as the daemon does - in a real TLS handshake on
127.0.0.1.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from tests.collection import fqcn, module_utils
from tests.modules.utils import AnsibleExitJson, AnsibleFailJson, run_module, set_module_args

crypto: Any = module_utils("pyqmail_crypto")
cert_module: Any = importlib.import_module("pyqmail_certificate")
ca_module: Any = importlib.import_module("pyqmail_ca")

DAY = dt.timedelta(days=1)


def call(module: Any, args: dict[str, Any], *, check: bool = False) -> dict[str, Any]:
    """Run a module in-process with --diff; return its result (failed ones included)."""
    full = {**args, "_ansible_check_mode": check, "_ansible_diff": True}
    with set_module_args(full):
        try:
            module.main()
        except AnsibleExitJson as exc:
            return exc.result
        except AnsibleFailJson as exc:
            return exc.result
    raise AssertionError("the module neither exited nor failed")


def ok(result: dict[str, Any]) -> dict[str, Any]:
    assert not result.get("failed"), result.get("msg")
    assert_no_key_material(result)
    return result


def assert_no_key_material(result: dict[str, Any]) -> None:
    text = json.dumps(result)
    assert "PRIVATE KEY" not in text
    assert "ca_key_pem" not in text


def labels(path: Path) -> list[str]:
    return [label for label, _ in crypto.split_pem(path.read_bytes())]


def key_block(path: Path) -> bytes:
    return crypto.split_pem(path.read_bytes())[0][1]


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def openssl_verify(purpose: str, cafile: Path, target: Path, *, untrusted: bool = False) -> str:
    cmd = ["openssl", "verify", "-purpose", purpose, "-CAfile", str(cafile)]
    if untrusted:
        cmd += ["-untrusted", str(target)]
    proc = subprocess.run([*cmd, str(target)], capture_output=True, text=True, check=False)
    return (proc.stdout + proc.stderr).strip()


def tls_handshake(servercert: Path, cafile: Path, hostname: str) -> str:
    """Serve servercert.pem on 127.0.0.1 as the daemon will; return what the client verified."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    server_ctx.load_cert_chain(certfile=str(servercert), keyfile=str(servercert))
    client_ctx = ssl.create_default_context(cafile=str(cafile))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"220 ok\r\n")
        except (OSError, ssl.SSLError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname=hostname) as tls,
        ):
            greeting = tls.recv(100)
            peer = tls.getpeercert()
    finally:
        thread.join(10)
        listener.close()
    assert not errors, errors
    assert greeting == b"220 ok\r\n"
    assert peer is not None
    return str(dict(x[0] for x in peer["subject"])["commonName"])


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    path = tmp_path / "ca"
    ok(call(ca_module, {"path": str(path), "common_name": "module test CA", "key_type": "ec256"}))
    return path


# --- the user's own files, as an ACME client leaves them ----------------------------------------


@dataclass
class AcmeFiles:
    root: Path
    key: Path
    cert: Path
    chain: Path
    fullchain: Path
    other_key: Path
    expired_cert: Path


def _ca_cert(name: str, key: Any, issuer: x509.Certificate | None, issuer_key: Any) -> Any:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = crypto.utcnow()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - DAY)
        .not_valid_after(now + 300 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )


@pytest.fixture(scope="module")
def acme(tmp_path_factory: pytest.TempPathFactory) -> AcmeFiles:
    d = tmp_path_factory.mktemp("acme")
    root_key = crypto.generate_key("ec384")
    root = _ca_cert("Test Root X1", root_key, None, root_key)
    inter_key = crypto.generate_key("rsa2048")
    inter = _ca_cert("Test R3", inter_key, root, root_key)
    key = crypto.generate_key("ec256")
    names = ("localhost", "mx.test", "127.0.0.1")
    leaf = crypto.issue(names, "server", key, 90, ca_key=inter_key, ca_cert=inter)
    old = crypto.issue(names, "server", key, 10, ca_key=inter_key, ca_cert=inter,
                       now=crypto.utcnow() - 30 * DAY)  # fmt: skip
    files = AcmeFiles(
        root=d / "root.pem",
        key=d / "privkey.pem",
        cert=d / "cert.pem",
        chain=d / "chain.pem",
        fullchain=d / "fullchain.pem",
        other_key=d / "other.pem",
        expired_cert=d / "expired.pem",
    )
    files.root.write_bytes(crypto.cert_to_pem(root))
    files.key.write_bytes(crypto.key_to_pem(key))
    files.cert.write_bytes(crypto.cert_to_pem(leaf))
    files.chain.write_bytes(crypto.cert_to_pem(inter))
    files.fullchain.write_bytes(crypto.cert_to_pem(leaf) + crypto.cert_to_pem(inter))
    files.other_key.write_bytes(crypto.key_to_pem(crypto.generate_key("ec256")))
    files.expired_cert.write_bytes(crypto.cert_to_pem(old))
    return files


# --- through ansible-playbook ---------------------------------------------------------------


def test_generated_servercert_through_ansible(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    target = tmp_path / "control" / "servercert.pem"
    target.parent.mkdir()
    r = ok(run_module("pyqmail_ca", {"path": str(ca), "common_name": "ansible test CA"}))
    assert r["changed"] is True
    assert r["reason"] == "missing"
    assert r["ca_cert"].startswith("-----BEGIN CERTIFICATE-----")
    assert (mode_of(ca / "ca.key"), mode_of(ca / "ca.pem"), mode_of(ca)) == (0o600, 0o644, 0o700)
    assert (ca / "ca.pem").read_text() == r["ca_cert"]

    args = {"path": str(target), "names": ["localhost", "127.0.0.1"], "ca_path": str(ca)}
    r = ok(run_module("pyqmail_certificate", args, check=True, diff=True))
    assert (r["changed"], r["reason"]) == (True, "missing")
    assert not target.exists()
    assert not list(target.parent.iterdir()), "check mode wrote something"
    assert "names: localhost, 127.0.0.1" in r["diff"]["after"]

    r = ok(run_module("pyqmail_certificate", args, diff=True))
    assert (r["changed"], r["reason"]) == (True, "missing")
    assert labels(target) == ["PRIVATE KEY", "CERTIFICATE", "CERTIFICATE"]
    assert mode_of(target) == 0o400
    assert r["names"] == ["localhost", "127.0.0.1"]
    assert r["key_type"] == "ec256"
    certs = crypto.load_certificates(target.read_bytes())
    assert r["fingerprint"] == crypto.fingerprint(certs[0])
    assert r["not_after"] == crypto.iso(crypto.not_after(certs[0]))
    assert (ca / "ca.pem").read_bytes() == crypto.cert_to_pem(certs[1])
    assert openssl_verify("sslserver", ca / "ca.pem", target).endswith(": OK")
    assert tls_handshake(target, ca / "ca.pem", "localhost") == "localhost"
    first = r["fingerprint"]

    r = ok(run_module("pyqmail_certificate", args, check=True, diff=True))
    assert r["changed"] is False, r["reason"]
    assert r["reason"].startswith("up to date")
    r = ok(run_module("pyqmail_certificate", args))
    assert r["changed"] is False
    assert r["fingerprint"] == first
    r = ok(run_module("pyqmail_ca", {"path": str(ca), "common_name": "ansible test CA"}))
    assert r["changed"] is False

    key_before = key_block(target)
    args["names"] = ["localhost", "127.0.0.1", "mx2.test"]
    r = ok(run_module("pyqmail_certificate", args, diff=True))
    assert r["changed"] is True
    assert r["reason"] == "names changed: added mx2.test (private key kept)"
    assert "mx2.test" in r["diff"]["after"]
    assert "mx2.test" not in r["diff"]["before"]
    assert r["fingerprint"] != first
    assert key_block(target) == key_before
    assert tls_handshake(target, ca / "ca.pem", "mx2.test") == "localhost"

    r = ok(run_module("pyqmail_certificate", {**args, "force": True, "valid_days": 10,
                                              "renew_before_days": 5}))  # fmt: skip
    assert (r["changed"], r["reason"]) == (True, "forced (force: true)")
    assert key_block(target) != key_before, "force makes a new key"
    r = ok(run_module("pyqmail_certificate", args))
    assert r["changed"] is True
    assert r["reason"].startswith("expires within 30 days (renew_before_days)")
    assert crypto.not_after(crypto.load_certificates(target.read_bytes())[0]) > (
        crypto.utcnow() + 300 * DAY
    )
    assert mode_of(target) == 0o400


def test_client_cert_through_ansible(ca_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "clientcert.pem"
    args = {
        "path": str(target),
        "purpose": "client",
        "names": ["relay.test"],
        "key_type": "rsa2048",
        "ca_path": str(ca_dir),
    }
    r = ok(run_module("pyqmail_certificate", args))
    assert r["changed"] is True
    assert r["key_type"] == "rsa2048"
    assert labels(target) == ["PRIVATE KEY", "CERTIFICATE", "CERTIFICATE"]
    assert openssl_verify("sslclient", ca_dir / "ca.pem", target).endswith(": OK")
    assert not openssl_verify("sslserver", ca_dir / "ca.pem", target).endswith(": OK")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(certfile=str(target), keyfile=str(target))


def test_provided_acme_files_through_ansible(acme: AcmeFiles, tmp_path: Path) -> None:
    target = tmp_path / "servercert.pem"
    args = {
        "path": str(target),
        "provided_key": str(acme.key),
        "provided_cert": str(acme.cert),
        "provided_chain": str(acme.chain),
        "names": ["mx.test"],
    }
    r = ok(run_module("pyqmail_certificate", args, diff=True))
    assert (r["changed"], r["reason"]) == (True, "missing")
    assert labels(target) == ["PRIVATE KEY", "CERTIFICATE", "CERTIFICATE"]
    data = target.read_bytes()
    assert data.startswith(acme.key.read_bytes())
    assert data.endswith(acme.cert.read_bytes() + acme.chain.read_bytes())
    assert mode_of(target) == 0o400
    assert openssl_verify("sslserver", acme.root, target, untrusted=True).endswith(": OK")
    # The client trusts only the root: the handshake works because the chain is served.
    assert tls_handshake(target, acme.root, "mx.test") == "localhost"
    r = ok(run_module("pyqmail_certificate", args))
    assert (r["changed"], r["reason"]) == (False, "up to date: the file matches the provided files")

    bad = {**args, "provided_key": str(acme.other_key)}
    r = run_module("pyqmail_certificate", bad)
    assert r["failed"] is True
    assert r["msg"].startswith(f"provided_key ({acme.other_key}): the private key (ec256)")
    assert "does not match the certificate" in r["msg"]
    assert target.read_bytes() == data, "a failed run must not touch the file"


# --- in-process: details and every refusal --------------------------------------------------


def test_fullchain_plus_chain_is_not_duplicated(acme: AcmeFiles, tmp_path: Path) -> None:
    target = tmp_path / "servercert.pem"
    args = {
        "path": str(target),
        "provided_key": str(acme.key),
        "provided_cert": str(acme.fullchain),
        "provided_chain": str(acme.chain),
    }
    r = ok(call(cert_module, args, check=True))
    assert (r["changed"], r["reason"]) == (True, "missing")
    assert not target.exists()
    r = ok(call(cert_module, args))
    assert r["changed"] is True
    assert labels(target) == ["PRIVATE KEY", "CERTIFICATE", "CERTIFICATE"]
    assert r["names"] == ["localhost", "mx.test", "127.0.0.1"]


def test_owner_and_mode_only_changes_report_changed(ca_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "servercert.pem"
    args = {"path": str(target), "names": ["localhost"], "ca_path": str(ca_dir)}
    ok(call(cert_module, args))
    content = target.read_bytes()
    r = ok(call(cert_module, {**args, "mode": "0440"}, check=True))
    assert r["changed"] is True
    assert mode_of(target) == 0o400, "check mode changed the mode"
    r = ok(call(cert_module, {**args, "mode": "0440"}))
    assert r["changed"] is True
    assert r["reason"].endswith("; owner/group/mode changed")
    assert "mode: 0400" in r["diff"]["before"]
    assert "mode: 0440" in r["diff"]["after"]
    assert mode_of(target) == 0o440
    assert target.read_bytes() == content
    r = ok(call(cert_module, {**args, "mode": "0440"}))
    assert r["changed"] is False
    if os.geteuid() == 0:
        owned = {**args, "mode": "0440", "owner": "nobody", "group": "nogroup"}
        r = ok(call(cert_module, owned))
        assert r["changed"] is True
        assert r["reason"].endswith("; owner/group/mode changed")
        assert target.stat().st_uid == int(subprocess.check_output(["id", "-u", "nobody"]))
        assert ok(call(cert_module, owned))["changed"] is False


def test_ca_change_reissues_and_backup_keeps_old(ca_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "servercert.pem"
    args = {"path": str(target), "names": ["localhost"], "ca_path": str(ca_dir), "backup": True}
    ok(call(cert_module, args))
    old = target.read_bytes()
    ca_args = {"path": str(ca_dir), "common_name": "module test CA", "key_type": "ec256"}
    r = ok(call(ca_module, {**ca_args, "force": True}))
    assert (r["changed"], r["reason"]) == (True, "forced (force: true)")
    r = ok(call(cert_module, args))
    assert r["changed"] is True
    assert r["reason"].startswith("issuer changed: CN=module test CA (key ")
    assert Path(r["backup_file"]).read_bytes() == old
    assert openssl_verify("sslserver", ca_dir / "ca.pem", target).endswith(": OK")
    # Renaming the CA keeps its key (issued certificates stay valid) but renames the issuer.
    r = ok(call(ca_module, {**ca_args, "common_name": "renamed CA"}))
    assert r["reason"] == "common_name changed: 'module test CA' -> 'renamed CA' (CA key kept)"
    r = ok(call(cert_module, args))
    assert r["changed"] is True
    assert "issuer changed" in r["reason"]


def test_unusable_existing_file_is_replaced(tmp_path: Path) -> None:
    target = tmp_path / "servercert.pem"
    args = {"path": str(target), "names": ["localhost"]}
    target.write_bytes(b"not a certificate\n")
    r = ok(call(cert_module, args))
    assert (r["changed"], r["reason"]) == (True, "existing file unusable: holds no PEM data")
    assert r["issuer"] == "self-signed"
    assert openssl_verify("sslserver", target, target).endswith(": OK")
    blocks = crypto.split_pem(target.read_bytes())
    target.write_bytes(blocks[1][1] + blocks[0][1])  # certificate before key: wrong for qmail
    r = ok(call(cert_module, args))
    assert r["changed"] is True
    assert "does not start with the private key" in r["reason"]
    assert labels(target) == ["PRIVATE KEY", "CERTIFICATE"]


def test_check_mode_before_the_ca_exists(tmp_path: Path) -> None:
    args = {"path": str(tmp_path / "s.pem"), "names": ["localhost"], "ca_path": str(tmp_path)}
    r = ok(call(cert_module, args, check=True))
    assert r["changed"] is True
    assert "holds no CA yet" in r["reason"]
    r = ok(call(ca_module, {"path": str(tmp_path / "new"), "common_name": "x"}, check=True))
    assert (r["changed"], r["ca_cert"]) == (True, "")
    assert not (tmp_path / "new").exists()


def test_ca_key_never_in_results(ca_dir: Path) -> None:
    r = ok(call(ca_module, {"path": str(ca_dir), "common_name": "module test CA",
                            "key_type": "ec256", "force": True}))  # fmt: skip
    secret = key_block(ca_dir / "ca.key").decode()
    body = "".join(secret.splitlines()[1:-1])
    assert body[:40] not in json.dumps(r)
    assert r["ca_key_path"] == str(ca_dir / "ca.key")


FAILURES: list[tuple[str, str, dict[str, Any], str]] = [
    ("unknown key type", "cert", {"names": ["a.test"], "key_type": "dsa1024"},
     "value of key_type must be one of: ec256, ec384, rsa2048, rsa3072, rsa4096, got: dsa1024"),
    ("empty names", "cert", {"names": []}, "names: names must list at least one"),
    ("invalid name", "cert", {"names": ["mx_1.test"]}, "names: 'mx_1.test' is not a valid DNS"),
    ("no names", "cert", {}, "one of the following is required: names, provided_cert"),
    ("ca_path without CA", "cert", {"names": ["a.test"], "ca_path": "{tmp}"},
     "ca_path: {tmp} holds no CA (ca.key and ca.pem); create it with pyqmail_ca first"),
    ("ca_path and provided", "cert",
     {"ca_path": "{tmp}", "provided_key": "{acme}/privkey.pem",
      "provided_cert": "{acme}/cert.pem"},
     "parameters are mutually exclusive: ca_path|provided_key"),
    ("chain without cert", "cert", {"names": ["a.test"], "provided_chain": "{acme}/chain.pem"},
     "missing parameter(s) required by 'provided_chain': provided_cert"),
    ("key without cert", "cert", {"names": ["a.test"], "provided_key": "{acme}/privkey.pem"},
     "parameters are required together: provided_key, provided_cert"),
    ("provided file missing", "cert",
     {"provided_key": "{tmp}/nope.pem", "provided_cert": "{acme}/cert.pem"},
     "provided_key: {tmp}/nope.pem does not exist; set provided_key to an existing file"),
    ("provided chain not PEM", "cert",
     {"provided_key": "{acme}/privkey.pem", "provided_cert": "{acme}/cert.pem",
      "provided_chain": "{acme}/privkey.pem"},
     "provided_chain ({acme}/privkey.pem): contains no PEM certificate"),
    ("provided chain wrong order", "cert",
     {"provided_key": "{acme}/privkey.pem", "provided_cert": "{acme}/cert.pem",
      "provided_chain": "{acme}/root.pem"},
     "provided_chain ({acme}/root.pem): chain certificate 1 (CN=Test Root X1) did not issue"),
    ("provided cert expired", "cert",
     {"provided_key": "{acme}/privkey.pem", "provided_cert": "{acme}/expired.pem"},
     "provided_cert ({acme}/expired.pem): the certificate (CN=localhost) expired on"),
    ("names not covered", "cert",
     {"provided_key": "{acme}/privkey.pem", "provided_cert": "{acme}/cert.pem",
      "names": ["mx.test", "other.test"]},
     "provided_cert ({acme}/cert.pem) does not cover names: other.test"),
    ("key type differs from provided", "cert",
     {"provided_key": "{acme}/privkey.pem", "provided_cert": "{acme}/cert.pem",
      "key_type": "rsa2048"},
     "key_type is rsa2048 but provided_key is ec256"),
    ("provided cert for the wrong purpose", "cert",
     {"provided_key": "{acme}/privkey.pem", "provided_cert": "{acme}/cert.pem",
      "purpose": "client"},
     "has no client authentication in its extended key usage"),
    ("force with provided", "cert",
     {"provided_key": "{acme}/privkey.pem", "provided_cert": "{acme}/cert.pem", "force": True},
     "force cannot renew a provided_cert"),
    ("renewal window too wide", "cert",
     {"names": ["a.test"], "valid_days": 30, "renew_before_days": 30},
     "renew_before_days (30) must be smaller than valid_days (30)"),
    ("email for a server", "cert", {"names": ["me@a.test"]}, "email addresses belong in client"),
    ("path is a directory", "cert", {"path": "{tmp}", "names": ["a.test"]}, "is a directory"),
    ("directory missing", "cert", {"path": "{tmp}/no/such/s.pem", "names": ["a.test"]},
     "create {tmp}/no/such first"),
    ("ca: long common name", "ca", {"common_name": "x" * 65}, "common_name must have 1 to 64"),
    ("ca: renewal window", "ca", {"common_name": "x", "valid_days": 10},
     "renew_before_days (90) must be 0 or more and smaller than valid_days (10)"),
    ("ca: unknown key type", "ca", {"common_name": "x", "key_type": "ec521"},
     "value of key_type must be one of"),
    ("ca: path is a file", "ca", {"path": "{acme}/root.pem", "common_name": "x"},
     "exists and is not a directory"),
    ("ca: no common name", "ca", {}, "missing required arguments: common_name"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("which", "args", "message"),
    [case[1:] for case in FAILURES],
    ids=[case[0] for case in FAILURES],
)
def test_refusals(
    which: str, args: dict[str, Any], message: str, acme: AcmeFiles, tmp_path: Path
) -> None:
    def fill(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace("{tmp}", str(tmp_path)).replace("{acme}", str(acme.key.parent))
        return value

    module = cert_module if which == "cert" else ca_module
    default = str(tmp_path / ("servercert.pem" if which == "cert" else "ca"))
    full = {"path": default, **{k: fill(v) for k, v in args.items()}}
    r = call(module, full)
    assert r.get("failed") is True, r
    assert fill(message) in r["msg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a refused run wrote something"


def test_modules_run_under_debian_python3(tmp_path: Path) -> None:
    """What a Debian 12 host runs: /usr/bin/python3 with python3-cryptography 38."""
    python = "/usr/bin/python3"
    probe = subprocess.run([python, "-c", "import cryptography"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("Debian's python3-cryptography is not installed")
    target = tmp_path / "servercert.pem"
    ca = tmp_path / "ca"
    tasks = [
        {"pyqmail.mail.pyqmail_ca": {"path": str(ca), "common_name": "debian CA"}},
        {"pyqmail.mail.pyqmail_certificate": {"path": str(target), "names": ["localhost"],
                                              "ca_path": str(ca)},
         "register": "r"},
        {"pyqmail.mail.pyqmail_certificate": {"path": str(target), "names": ["localhost"],
                                              "ca_path": str(ca)},
         "register": "again"},
        {"ansible.builtin.assert": {"that": ["r is changed", "again is not changed"]}},
    ]  # fmt: skip
    play = [{"hosts": "localhost", "gather_facts": False, "connection": "local", "tasks": tasks}]
    playbook = tmp_path / "play.yml"
    playbook.write_text(json.dumps(play))
    repo = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(repo / "ansible.cfg"),
        "ANSIBLE_LOCALHOST_WARNING": "false",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "false",
    }
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("ansible-playbook")), "-i", "localhost,",
         "-e", f"ansible_python_interpreter={python}", str(playbook)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert openssl_verify("sslserver", ca / "ca.pem", target).endswith(": OK")


def test_ca_mode_only_change_and_idempotence(ca_dir: Path) -> None:
    args = {"path": str(ca_dir), "common_name": "module test CA", "key_type": "ec256"}
    before = (ca_dir / "ca.pem").read_bytes(), (ca_dir / "ca.key").read_bytes()
    assert ok(call(ca_module, args, check=True))["changed"] is False
    r = ok(call(ca_module, {**args, "cert_mode": "0640", "mode": "0400"}))
    assert r["changed"] is True
    assert r["reason"].endswith("; owner/group/mode changed")
    assert "ca.pem mode: 0640" in r["diff"]["after"]
    assert "ca.key mode: 0600" in r["diff"]["before"]
    assert (mode_of(ca_dir / "ca.pem"), mode_of(ca_dir / "ca.key")) == (0o640, 0o400)
    assert ((ca_dir / "ca.pem").read_bytes(), (ca_dir / "ca.key").read_bytes()) == before
    assert ok(call(ca_module, {**args, "cert_mode": "0640", "mode": "0400"}))["changed"] is False


@pytest.mark.parametrize("name", ["pyqmail_ca", "pyqmail_certificate"])
def test_ansible_doc_renders(name: str) -> None:
    repo = Path(__file__).resolve().parents[2]
    doc = Path(sys.executable).with_name("ansible-doc")
    proc = subprocess.run(
        [str(doc), "--json", fqcn(name)],
        capture_output=True, text=True, check=False, timeout=120,
        env={**os.environ, "ANSIBLE_CONFIG": str(repo / "ansible.cfg")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)[fqcn(name)]
    attributes = data["doc"]["attributes"]
    assert attributes["check_mode"]["support"] == "full"
    assert attributes["diff_mode"]["support"] == "full"
    assert data["examples"].strip()
    assert "reason" in data["return"]


def test_a_new_key_warns_that_the_tlsa_record_changes(
    acme: AcmeFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TLSA 3 1 1 record pins the key: a renewal keeps it (no warning), a key type change,
    force, an unusable file or another provided key make a new one, and the result warns
    that the record changes and DANE senders defer until DNS has it."""
    from ansible.module_utils import basic

    warnings: list[str] = []
    monkeypatch.setattr(basic.AnsibleModule, "warn", lambda self, text: warnings.append(text))
    target = tmp_path / "servercert.pem"
    args: dict[str, Any] = {"path": str(target), "names": ["localhost"], "renew_before_days": 0}
    ok(call(cert_module, args))
    ok(call(cert_module, {**args, "names": ["localhost", "mx.test"]}))  # renewed, key kept
    assert warnings == []

    def spki() -> str:
        return str(
            cert_module.tlsa_warning("x", None, crypto.load_bundle(target.read_bytes()).key, "")[0]
        )

    old = spki().split(" -> 3 1 1 ")[1].split(".")[0]
    ok(call(cert_module, {**args, "key_type": "rsa2048"}))
    new = spki().split(" -> 3 1 1 ")[1].split(".")[0]
    assert len(warnings) == 1 and old != new
    assert warnings[0].startswith(
        f"{target}: the private key changed (key_type ec256 -> rsa2048), so its TLSA record "
        f"changes: _25._tcp.<name> TLSA 3 1 1 {old} -> 3 1 1 {new}."
    )
    assert "senders that use DANE defer mail to this host" in warnings[0]
    ok(call(cert_module, {**args, "key_type": "rsa2048", "force": True}))
    assert "(force)" in warnings[1]
    target.write_bytes(b"not a certificate\n")
    ok(call(cert_module, {**args, "key_type": "rsa2048"}))
    assert "(the file was unusable)" in warnings[2]
    provided = {
        "path": str(target),
        "provided_key": str(acme.key),
        "provided_cert": str(acme.fullchain),
    }
    ok(call(cert_module, provided))
    assert "(the provided key changed)" in warnings[3]
    ok(call(cert_module, provided))
    assert len(warnings) == 4


def test_a_new_client_key_gives_no_tlsa_warning(
    ca_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """clientcert.pem (purpose client) is in no TLSA record: a new key (key type change, force,
    an unusable file) changes no DNS record, so the module gives no TLSA warning; the same
    steps for a server certificate give one each (test above)."""
    from ansible.module_utils import basic

    warnings: list[str] = []
    monkeypatch.setattr(basic.AnsibleModule, "warn", lambda self, text: warnings.append(text))
    target = tmp_path / "clientcert.pem"
    args: dict[str, Any] = {
        "path": str(target),
        "purpose": "client",
        "names": ["relay.test"],
        "ca_path": str(ca_dir),
    }
    ok(call(cert_module, args))
    first = key_block(target)
    r = ok(call(cert_module, {**args, "key_type": "rsa2048"}))
    assert r["changed"] is True and key_block(target) != first
    second = key_block(target)
    ok(call(cert_module, {**args, "key_type": "rsa2048", "force": True}))
    assert key_block(target) != second
    target.write_bytes(b"not a certificate\n")
    ok(call(cert_module, {**args, "key_type": "rsa2048"}))
    assert labels(target)[0] == "PRIVATE KEY"
    assert warnings == []
