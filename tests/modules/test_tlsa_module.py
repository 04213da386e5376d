"""library/pyqmail_tlsa.py: the TLSA 3 1 1 data of servercert.pem, as openssl computes it."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.modules.utils import (
    REPO,
    AnsibleExitJson,
    AnsibleFailJson,
    run_module,
    set_module_args,
)
from tests.pki import CA

tlsa_module: Any = importlib.import_module("pyqmail_tlsa")


def servercert(path: Path) -> Path:
    """A qmail servercert.pem: private key, then certificate, then the CA's."""
    ca = CA()
    issued = ca.issue(["mx1.example.org"])
    path.write_bytes(issued.key_pem + issued.cert_pem + ca.cert_pem)
    return path


def openssl_311(path: Path) -> str:
    """The same digest by openssl, as the DANE guides compute it (first certificate)."""
    pub = subprocess.run(
        ["openssl", "x509", "-in", str(path), "-noout", "-pubkey"],
        capture_output=True,
        check=True,
    ).stdout
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "DER"], input=pub, capture_output=True, check=True
    ).stdout
    digest = subprocess.run(
        ["openssl", "dgst", "-sha256", "-r"], input=der, capture_output=True, check=True
    ).stdout
    return digest.split()[0].decode()


def run(args: dict[str, Any]) -> dict[str, Any]:
    with set_module_args(args), pytest.raises((AnsibleExitJson, AnsibleFailJson)) as exc:
        tlsa_module.main()
    result: dict[str, Any] = exc.value.result  # type: ignore[union-attr]
    return result


def test_digest_matches_openssl_and_no_key_in_the_result(tmp_path: Path) -> None:
    path = servercert(tmp_path / "servercert.pem")
    r = run({"path": str(path)})
    assert r["changed"] is False and r["exists"] is True
    assert r["spki_sha256"] == openssl_311(path)
    assert "PRIVATE" not in json.dumps(r)


def test_missing_file_is_not_an_error_and_garbage_is(tmp_path: Path) -> None:
    r = run({"path": str(tmp_path / "none.pem")})
    assert (r.get("failed"), r["exists"], r["spki_sha256"]) == (None, False, "")
    bad = tmp_path / "bad.pem"
    bad.write_text("no certificate here\n")
    r = run({"path": str(bad)})
    assert r["failed"] is True
    assert r["msg"].startswith(f"{bad}: contains no PEM certificate")


def test_through_ansible_in_check_mode(tmp_path: Path) -> None:
    path = servercert(tmp_path / "servercert.pem")
    r = run_module("pyqmail_tlsa", {"path": str(path)}, check=True)
    assert r.get("failed") is not True, r
    assert r["spki_sha256"] == openssl_311(path)


def test_ansible_doc_renders() -> None:
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("ansible-doc")),
            "pyqmail.mail.pyqmail_tlsa",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"},
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "TLSA 3 1 1" in proc.stdout and "spki_sha256" in proc.stdout
