"""control/dkimkeys: every bad line is a clear error naming file and line, in the daemon and
in ``pyqmail-send --check`` (which the roles' reload handlers run before a HUP)."""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from pyqmail.control.reader import ControlError
from pyqmail.dkim import keys as dkim_keys
from pyqmail.queue.store import Queue
from tests.dkim_util import KeyPair, make_keys, private_pem
from tests.runas import IS_ROOT

SEND = [sys.executable, "-c", "import sys; from pyqmail.send.manager import main; sys.exit(main())"]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "qmail"
    Queue(root / "queue").create()
    (root / "control").mkdir()
    (root / "control" / "me").write_text("mx.test\n")
    return root


@pytest.fixture(scope="module")
def made_keys(tmp_path_factory: pytest.TempPathFactory) -> list[KeyPair]:
    """Generated once (RSA-2048 takes a while), copied for each test, which may chmod them."""
    return make_keys(tmp_path_factory.mktemp("keys"), "example.org")


@pytest.fixture
def keys(tmp_path: Path, made_keys: list[KeyPair]) -> list[KeyPair]:
    directory = tmp_path / "keys" / "example.org"
    directory.mkdir(parents=True)
    copies = []
    for k in made_keys:
        path = directory / k.path.name
        shutil.copyfile(k.path, path)
        path.chmod(0o640)
        copies.append(dataclasses.replace(k, path=path))
    return copies


def write(root: Path, *lines: str) -> Path:
    path = root / "control" / "dkimkeys"
    path.write_text("# domain:selector:algorithm:keyfile\n\n" + "".join(f"{x}\n" for x in lines))
    return path


def check(root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SEND, "--check", "--root", str(root), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_good_file_loads_both_keys_and_check_counts_them(root: Path, keys: list[KeyPair]) -> None:
    write(root, *(k.line for k in keys))
    loaded = dkim_keys.load(root / "control")
    assert [(k.selector, k.algorithm) for k in loaded["example.org"]] == [
        ("sa-rsa", "rsa-sha256"),
        ("sa-ed", "ed25519-sha256"),
    ]
    result = check(root)
    assert result.returncode == 0, result.stderr
    assert "2 DKIM key(s) for 1 domain(s)" in result.stdout


def test_no_file_means_no_signing(root: Path) -> None:
    assert dkim_keys.load(root / "control") == {}
    assert "0 DKIM key(s)" in check(root).stdout


def _other_key(tmp_path: Path) -> Path:
    path = tmp_path / "ec.key"
    path.write_bytes(private_pem(ec.generate_private_key(ec.SECP256R1())))  # type: ignore[arg-type]
    path.chmod(0o640)  # a safe mode: the error is the key's type
    return path


def _encrypted(tmp_path: Path) -> Path:
    path = tmp_path / "enc.key"
    key = ed25519.Ed25519PrivateKey.generate()
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    path.chmod(0o640)
    return path


BAD = {
    "wrong algorithm": (
        "example.org:s1:rsa-sha1:{rsa}",
        "dkimkeys:3: unknown algorithm 'rsa-sha1': expected rsa-sha256 or ed25519-sha256",
    ),
    "relative path": (
        "example.org:s1:rsa-sha256:dkim/s1.key",
        "dkimkeys:3: key file must be an absolute path, got 'dkim/s1.key'",
    ),
    "missing key file": (
        "example.org:s1:rsa-sha256:{tmp}/nowhere.key",
        "dkimkeys:3: cannot read key file {tmp}/nowhere.key: No such file or directory",
    ),
    "Ed25519 key for rsa-sha256": (
        "example.org:s1:rsa-sha256:{ed}",
        "dkimkeys:3: key file {ed} holds an Ed25519 key, which cannot sign rsa-sha256",
    ),
    "RSA key for ed25519-sha256": (
        "example.org:s1:ed25519-sha256:{rsa}",
        "dkimkeys:3: key file {rsa} holds an RSA key, which cannot sign ed25519-sha256",
    ),
    "EC key": (
        "example.org:s1:rsa-sha256:{ec}",
        "holds a key of another type",
    ),
    "encrypted key": (
        "example.org:s1:ed25519-sha256:{enc}",
        "dkimkeys:3: key file {enc} is not an unencrypted PEM private key",
    ),
    "not a key": (
        "example.org:s1:rsa-sha256:{notkey}",
        "is not an unencrypted PEM private key",
    ),
    "three fields": (
        "example.org:s1:rsa-sha256",
        "dkimkeys:3: expected domain:selector:algorithm:keyfile, got 'example.org:s1:rsa-sha256'",
    ),
    "bad domain": ("exa_mple.org:s1:rsa-sha256:{rsa}", "dkimkeys:3: not a valid lower-case domain"),
    "bad selector": ("example.org:s 1:rsa-sha256:{rsa}", "dkimkeys:3: not a valid selector"),
    "selector twice": (
        "example.org:sa-rsa:rsa-sha256:{rsa}",
        "dkimkeys:4: selector sa-rsa of example.org is already listed at {root}/control/dkimkeys:3",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_line_names_file_and_line_in_daemon_and_check(
    case: str, root: Path, keys: list[KeyPair], tmp_path: Path
) -> None:
    line, expected = BAD[case]
    names = {
        "rsa": keys[0].path,
        "ed": keys[1].path,
        "ec": _other_key(tmp_path),
        "enc": _encrypted(tmp_path),
        "tmp": tmp_path,
        "root": root,
        "notkey": tmp_path / "me.key",
    }
    names["notkey"].write_text("mx.test\n")
    names["notkey"].chmod(0o640)
    lines = [line.format(**names)]
    if case == "selector twice":
        lines.append(lines[0])
    path = write(root, *lines)
    expected = expected.format(**names)
    with pytest.raises(ControlError) as caught:
        dkim_keys.load(root / "control")
    assert str(caught.value).startswith(str(path)), caught.value
    assert expected in str(caught.value)
    result = check(root)
    assert result.returncode == 111
    assert f"pyqmail-send: {path}" in result.stderr and expected in result.stderr


def test_check_as_the_daemon_user_reports_a_key_it_cannot_read(
    root: Path, keys: list[KeyPair]
) -> None:
    """The key files are 0640 root:pyqmails: a user outside that group cannot read them, and
    --check (run as the daemon's user, as the reload handlers do) says which file, as
    pyqmail-send's manager would at start. As root the check runs as nobody."""
    write(root, *(k.line for k in keys))
    extra: list[str] = []
    if IS_ROOT:
        nobody = pwd.getpwnam("nobody")
        for path in [root, *root.rglob("*")]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        for d in [keys[0].path.parent, *keys[0].path.parents]:
            d.chmod(d.stat().st_mode | 0o005)
        keys[1].path.chmod(0o644)
        extra = ["--user", "nobody"]
    keys[0].path.chmod(0o600 if IS_ROOT else 0)
    result = check(root, *extra)
    assert result.returncode == 111, result.stdout + result.stderr
    assert f"dkimkeys:3: cannot read key file {keys[0].path}: Permission denied" in result.stderr


@pytest.mark.parametrize(
    ("mode", "why"),
    [
        (0o666, "other users may use it"),
        (0o644, "other users may use it"),
        (0o604, "other users may use it"),
        (0o641, "other users may use it"),
        (0o660, "its group may replace it"),
        (0o620, "its group may replace it"),
    ],
)
def test_an_unsafe_key_file_is_refused_naming_it_and_its_mode(
    mode: int, why: str, root: Path, keys: list[KeyPair]
) -> None:
    """OpenDKIM's RequireSafeKeys: a key others may read, or its group may write, does not
    sign; the daemon and --check say which file, its mode and what to do."""
    write(root, *(k.line for k in keys))
    keys[1].path.chmod(mode)
    expected = f"dkimkeys:4: key file {keys[1].path} is unsafe: mode {mode:04o}, owner uid "
    with pytest.raises(ControlError, match=why) as caught:
        dkim_keys.load(root / "control")
    assert expected in str(caught.value)
    result = check(root)
    assert result.returncode == 111
    assert expected in result.stderr and why in result.stderr


@pytest.mark.parametrize("mode", [0o640, 0o600, 0o440, 0o400])
def test_the_roles_modes_are_safe(mode: int, root: Path, keys: list[KeyPair]) -> None:
    """What the role writes (0640, owner root, in a 0750 directory), and stricter modes."""
    write(root, *(k.line for k in keys))
    for k in keys:
        k.path.chmod(mode)
    keys[0].path.parent.chmod(0o750)
    assert len(dkim_keys.load(root / "control")["example.org"]) == 2
    result = check(root)
    assert result.returncode == 0, result.stderr
    assert "2 DKIM key(s) for 1 domain(s)" in result.stdout


@pytest.mark.skipif(not IS_ROOT, reason="chown to another user needs root")
def test_a_key_owned_by_another_user_is_refused_whatever_its_mode(
    root: Path, keys: list[KeyPair]
) -> None:
    """Owned by a user other than root and the reader: that user could put its own key there,
    and read-only (0440, 0400) does not stop an owner, who may chmod it first (a review found
    0440 accepted)."""
    write(root, *(k.line for k in keys))
    nobody = pwd.getpwnam("nobody")
    os.chown(keys[0].path, nobody.pw_uid, 0)
    for mode in (0o640, 0o440, 0o400):
        keys[0].path.chmod(mode)
        with pytest.raises(
            ControlError, match=f"mode {mode:04o}, owner uid {nobody.pw_uid}: it belongs to a user"
        ):
            dkim_keys.load(root / "control")
    os.chown(keys[0].path, 0, 0)
    assert len(dkim_keys.load(root / "control")["example.org"]) == 2
