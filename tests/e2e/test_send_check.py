"""pyqmail-send --check: load what the daemon reads, exit 0 or 111, touch nothing.

The roles' handlers run it before ``svc -h`` / ``svc -t`` of qmail-send, so a broken control
file refuses the signal instead of leaving the daemon with stale or no configuration.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pyqmail.queue.store import Queue
from tests.conftest import PKI

SEND = [sys.executable, "-c", "import sys; from pyqmail.send.manager import main; sys.exit(main())"]


def make_root(tmp_path: Path, pki: PKI) -> Path:
    root = tmp_path / "qmail"
    Queue(root / "queue").create()
    control = root / "control"
    (control / "tlshosts").mkdir(parents=True)
    (control / "me").write_text("mx.test\n")
    (control / "locals").write_text("mx.test\nexample.test\n")
    (control / "smtproutes").write_text(":relay.test:587\n")
    (control / "smtproutes-auth").write_text("relay.test:user:pa:ss\n")
    (control / "concurrencyremote").write_text("5\n")
    (control / "clientcert.pem").write_bytes(pki.client.key_pem + pki.client.cert_pem)
    (control / "tlshosts" / "relay.test.pem").write_bytes(pki.ca.cert_pem)
    return root


def check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SEND, "--check", "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_good_configuration_exits_0_and_touches_nothing(tmp_path: Path, pki: PKI) -> None:
    root = make_root(tmp_path, pki)
    before = tree(root)
    result = check(root)
    assert result.returncode == 0, result.stderr
    assert "configuration of" in result.stdout
    assert "1 route(s), 2 TLS file(s)" in result.stdout
    assert result.stderr == ""
    assert tree(root) == before  # no sendpid, no state, nothing created


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        (root / "control" / name).write_bytes(data)

    return apply


def _remove_queue_dir(root: Path) -> None:
    (root / "queue" / "state").rmdir()


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (_write("smtproutes", b"no-colon-here\n"), "smtproutes:1: expected domain:relay"),
        (_write("smtproutes-auth", b"relay.test:user\n"), "smtproutes-auth:1: expected relay"),
        (_write("concurrencyremote", b"many\n"), "concurrencyremote"),
        (_write("virtualdomains", b"nocolon\n"), "virtualdomains:1: expected domain:prefix"),
        (_write("me", b""), "me: missing or empty"),
        (_write("clientcert.pem", b"not a certificate\n"), "clientcert.pem"),
        (_write("tlshosts/relay.test.pem", b"garbage\n"), "relay.test.pem: cannot load CA"),
        (_remove_queue_dir, "queue directory missing"),
    ],
    ids=["smtproutes", "auth", "concurrency", "virtualdomains", "me", "clientcert", "pin", "queue"],
)
def test_broken_configuration_exits_111_naming_the_file(
    tmp_path: Path, pki: PKI, breakage: Callable[[Path], None], message: str
) -> None:
    root = make_root(tmp_path, pki)
    breakage(root)
    result = check(root)
    assert result.returncode == 111, (result.stdout, result.stderr)
    assert message in result.stderr
    assert result.stderr.startswith("pyqmail-send: ")
    assert result.stdout == ""


def test_every_problem_is_reported(tmp_path: Path, pki: PKI) -> None:
    root = make_root(tmp_path, pki)
    _write("smtproutes", b"bad\n")(root)
    _write("tlshosts/relay.test.pem", b"garbage\n")(root)
    result = check(root)
    assert result.returncode == 111
    lines = result.stderr.splitlines()
    assert len(lines) == 2, lines
    assert "smtproutes:1" in lines[0]
    assert "relay.test.pem" in lines[1]
