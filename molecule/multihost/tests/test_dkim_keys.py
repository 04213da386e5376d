"""mx1's DKIM keys (role pyqmail_dkim): control/dkimkeys names an RSA and an Ed25519 key of its
local domain, the keys are root:pyqmails 0640 in a 0750 directory, and only pyqmail-send's
manager may read them (pyqmail-smtpd's user cannot)."""

from __future__ import annotations

from typing import Any

from conftest import MX1

DKIMKEYS = "/var/qmail/control/dkimkeys"


def signing_lines(host: Any) -> list[list[str]]:
    text = host.file(DKIMKEYS).content_string
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def test_mx1_signs_with_both_algorithms(mx1: Any) -> None:
    dkimkeys = mx1.file(DKIMKEYS)
    assert dkimkeys.exists and dkimkeys.user == "root" and dkimkeys.mode == 0o644
    lines = signing_lines(mx1)
    assert sorted((domain, algorithm) for domain, _, algorithm, _ in lines) == [
        (MX1, "ed25519-sha256"),
        (MX1, "rsa-sha256"),
    ]
    for domain, selector, _, keyfile in lines:
        assert keyfile == f"/var/qmail/control/dkim/{domain}/{selector}.key"
        key = mx1.file(keyfile)
        assert (key.user, key.group, key.mode) == ("root", "pyqmails", 0o640)
        assert key.content_string.startswith("-----BEGIN PRIVATE KEY-----")
        directory = mx1.file(f"/var/qmail/control/dkim/{domain}")
        assert (directory.user, directory.group, directory.mode) == ("root", "pyqmails", 0o750)


# Each daemon's user with its primary group and its groups from /etc/group, as it runs.
AS = {
    "pyqmails": "setpriv --reuid pyqmails --regid pyqmail --init-groups",
    "pyqmaild": "setpriv --reuid pyqmaild --regid pyqmail --init-groups",
    "pyqmailr": "setpriv --reuid pyqmailr --regid pyqmailr --init-groups",
    "pyqmailv": "setpriv --reuid pyqmailv --regid pyqmailv --init-groups",
}


def test_only_the_signer_reads_the_keys(mx1: Any) -> None:
    keyfile = signing_lines(mx1)[0][3]
    assert "pyqmails" in mx1.user("pyqmails").groups
    for user in ("pyqmaild", "pyqmailr", "pyqmailv"):
        assert "pyqmails" not in mx1.user(user).groups, user
        denied = mx1.run(f"{AS[user]} head -c1 {keyfile}")
        assert denied.rc != 0 and "Permission denied" in denied.stderr, user
    assert mx1.run(f"{AS['pyqmails']} head -c1 {keyfile}").rc == 0
