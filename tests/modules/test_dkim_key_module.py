"""pyqmail_dkim_key: keys, records, rotation and bad input, in-process and through Ansible.

The keys the module writes are loaded with ``cryptography`` and checked against the record it
returns (base64 SubjectPublicKeyInfo for RSA, the raw 32-byte key for Ed25519, RFC 8463).
Rotation is driven with the module's ``now`` option: every step is run twice, the second run
must change nothing.
"""

from __future__ import annotations

import base64
import datetime as dt
import errno
import importlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ansible.module_utils import basic
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from tests.collection import module_utils
from tests.modules.utils import AnsibleExitJson, AnsibleFailJson, run_module, set_module_args

dkim_module: Any = importlib.import_module("pyqmail_dkim_key")

T0 = dt.datetime(2026, 12, 2, 6, 0, tzinfo=dt.UTC)
DOMAIN = "example.org"
GROUP = "daemon"  # any group but root's own, to see that the module sets it


def when(days: float) -> str:
    return (T0 + dt.timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")


def call(args: dict[str, Any], *, check: bool = False) -> dict[str, Any]:
    """Run the module in-process with --diff; its result, failed ones included."""
    full = {**args, "_ansible_check_mode": check, "_ansible_diff": True}
    with set_module_args(full):
        try:
            dkim_module.main()
        except (AnsibleExitJson, AnsibleFailJson) as exc:
            assert "PRIVATE KEY" not in json.dumps(exc.result)
            return exc.result
    raise AssertionError("the module neither exited nor failed")


def ok(result: dict[str, Any]) -> dict[str, Any]:
    assert not result.get("failed"), result.get("msg")
    return result


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def signing(result: dict[str, Any]) -> set[str]:
    return {line["selector"] for line in result["signing"]}


def published(result: dict[str, Any]) -> set[str]:
    return {record["selector"] for record in result["records"]}


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    return tmp_path / "dkim" / DOMAIN


def args(keydir: Path, **extra: Any) -> dict[str, Any]:
    base = {"domain": DOMAIN, "path": str(keydir), "owner": "root", "group": GROUP}
    return {**base, **extra}


def run_twice(params: dict[str, Any]) -> dict[str, Any]:
    """A real run, then the same run again, which must change nothing."""
    first = ok(call(params))
    again = ok(call(params))
    assert not again["changed"], again
    assert again["records"] == first["records"]
    assert again["signing"] == first["signing"]
    return first


def test_first_run_makes_both_keys_and_their_records(keydir: Path) -> None:
    keydir.parent.mkdir()
    result = run_twice(args(keydir, now=when(0)))
    assert result["changed"]
    assert result["generated"] == ["s20261202-rsa", "s20261202-ed25519"]
    assert mode_of(keydir) == 0o750
    gid = keydir.stat().st_gid
    assert gid != 0
    by_algorithm = {record["algorithm"]: record for record in result["records"]}
    assert set(by_algorithm) == {"rsa-sha256", "ed25519-sha256"}
    for line in result["signing"]:
        path = Path(line["keyfile"])
        assert path == keydir / f"{line['selector']}.key"
        assert mode_of(path) == 0o640
        assert (path.stat().st_uid, path.stat().st_gid) == (0, gid)
        pem = path.read_bytes()
        assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
        key = serialization.load_pem_private_key(pem, password=None)
        txt = by_algorithm[line["algorithm"]]["txt"]
        if line["algorithm"] == "rsa-sha256":
            assert isinstance(key, rsa.RSAPrivateKey)
            assert key.key_size == 2048
            spki = key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            assert txt == f"v=DKIM1; k=rsa; p={base64.b64encode(spki).decode()}"
        else:
            assert isinstance(key, ed25519.Ed25519PrivateKey)
            raw = key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
            assert len(raw) == 32
            assert txt == f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    state = keydir / "state.json"
    assert mode_of(state) == 0o640
    assert "PRIVATE" not in state.read_text()
    assert sorted(p.name for p in keydir.iterdir()) == [
        "s20261202-ed25519.key",
        "s20261202-rsa.key",
        "state.json",
    ]


def test_check_mode_writes_nothing_and_plans_empty_records(keydir: Path) -> None:
    keydir.parent.mkdir()
    result = ok(call(args(keydir, now=when(0)), check=True))
    assert result["changed"]
    assert not keydir.exists()
    assert [record["txt"] for record in result["records"]] == ["", ""]
    assert "s20261202-rsa" in result["diff"]["after"]
    assert result["diff"]["before"] == ". state: absent\n"


def test_a_mode_change_is_repaired_and_reported(keydir: Path) -> None:
    keydir.parent.mkdir()
    ok(call(args(keydir, now=when(0))))
    key = keydir / "s20261202-rsa.key"
    key.chmod(0o644)
    result = ok(call(args(keydir, now=when(0)), check=True))
    assert result["changed"]
    assert mode_of(key) == 0o644
    assert "s20261202-rsa.key mode: 0640" in result["diff"]["after"]
    assert ok(call(args(keydir, now=when(0))))["changed"]
    assert mode_of(key) == 0o640


def test_rsa_bits(keydir: Path) -> None:
    keydir.parent.mkdir()
    ok(call(args(keydir, now=when(0), rsa_bits=3072)))
    key = serialization.load_pem_private_key(
        (keydir / "s20261202-rsa.key").read_bytes(), password=None
    )
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 3072


def test_rotation_publishes_before_use_and_retires_after(keydir: Path) -> None:
    """30 days per generation, published 7 days before use, 10 days after."""
    keydir.parent.mkdir()
    rot = {"rotate_days": 30, "prepublish_days": 7, "retire_days": 10}
    first = run_twice(args(keydir, now=when(0), **rot))
    old = {"s20261202-rsa", "s20261202-ed25519"}
    assert signing(first) == published(first) == old
    assert first["keys"][0]["signs_until"] == when(30)

    quiet = ok(call(args(keydir, now=when(22.9), **rot)))
    assert not quiet["changed"]
    assert signing(quiet) == published(quiet) == old

    # 7 days before the end: the next pair is published, not used.
    pre = run_twice(args(keydir, now=when(23), **rot))
    new = {"s20261225-rsa", "s20261225-ed25519"}
    assert set(pre["generated"]) == new
    assert published(pre) == old | new
    assert signing(pre) == old
    assert all(record["txt"].startswith("v=DKIM1; k=") for record in pre["records"])
    for key in pre["keys"]:
        if key["selector"] in new:
            assert key["signs_from"] == when(30)
            assert key["signs_until"] == when(60)

    # Its window: the new pair signs, the old one is retired but still published.
    switch = run_twice(args(keydir, now=when(30), **rot))
    assert set(switch["retired"]) == old
    assert signing(switch) == new
    assert published(switch) == old | new
    late = ok(call(args(keydir, now=when(39.9), **rot)))
    assert not late["changed"]
    assert published(late) == old | new

    # published_until passed: the old key files go.
    gone = run_twice(args(keydir, now=when(40), **rot))
    assert set(gone["removed"]) == old
    assert published(gone) == signing(gone) == new
    assert sorted(p.name for p in keydir.iterdir()) == sorted(
        [f"{s}.key" for s in new] + ["state.json"]
    )


def test_a_late_run_never_signs_with_an_unpublished_key(keydir: Path) -> None:
    keydir.parent.mkdir()
    rot = {"rotate_days": 30, "prepublish_days": 7, "retire_days": 10}
    ok(call(args(keydir, now=when(0), **rot)))
    # No run for 35 days: the next pair is made now and signs 7 days later.
    late = run_twice(args(keydir, now=when(35), **rot))
    assert signing(late) == {"s20261202-rsa", "s20261202-ed25519"}
    new = {"s20270106-rsa", "s20270106-ed25519"}
    assert set(late["generated"]) == new
    assert {k["signs_from"] for k in late["keys"] if k["selector"] in new} == {when(42)}
    assert signing(ok(call(args(keydir, now=when(42), **rot)))) == new


def test_turning_rotation_on_then_off(keydir: Path) -> None:
    keydir.parent.mkdir()
    ok(call(args(keydir, now=when(0))))
    rot = {"rotate_days": 30, "prepublish_days": 7, "retire_days": 10}
    # Turned on at day 100: the old pair may sign 7 more days, its successor is published now.
    on = run_twice(args(keydir, now=when(100), **rot))
    assert len(on["generated"]) == 2
    assert signing(on) == {"s20261202-rsa", "s20261202-ed25519"}
    assert {k["signs_until"] for k in on["keys"] if k["selector"].startswith("s20261202")} == {
        when(107)
    }
    # Off again before the switch: the pair that never signed goes, the old one stays.
    off = run_twice(args(keydir, now=when(101)))
    assert set(off["removed"]) == set(on["generated"])
    assert signing(off) == published(off) == {"s20261202-rsa", "s20261202-ed25519"}
    assert all(k["signs_until"] is None for k in off["keys"])


def test_rotation_off_after_a_missed_switch_keeps_the_published_pair(keydir: Path) -> None:
    """Rotation on, no run past the planned end, then off: the pair that is in DNS signs on;
    no unpublished pair is made to sign at once."""
    keydir.parent.mkdir()
    rot = {"rotate_days": 30, "prepublish_days": 7, "retire_days": 10}
    ok(call(args(keydir, now=when(0), **rot)))
    off = run_twice(args(keydir, now=when(50)))
    assert off["generated"] == off["retired"] == off["removed"] == []
    assert signing(off) == published(off) == {"s20261202-rsa", "s20261202-ed25519"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"domain": "exa_mple.org"}, "domain: 'exa_mple.org' is not a DNS domain name"),
        ({"domain": "Example.org"}, "domain: 'Example.org' is not a DNS domain name"),
        ({"domain": "localhost"}, "domain: 'localhost' is not a DNS domain name"),
        ({"local_domains": ["example.net"]}, "domain: 'example.org' is not a local domain"),
        ({"selector_prefix": "1s"}, "selector_prefix: '1s' is not a selector prefix"),
        ({"selector_prefix": "s.x"}, "selector_prefix: 's.x' is not a selector prefix"),
        ({"rsa_bits": 1024}, "rsa_bits: 1024 is out of range"),
        ({"rsa_bits": 8192}, "rsa_bits: 8192 is out of range"),
        ({"rotate_days": 7}, "rotate_days: 7 is out of range: 0 (no rotation) or from"),
        ({"rotate_days": 3651}, "rotate_days: 3651 is out of range"),
        ({"prepublish_days": 0}, "prepublish_days: 0 is out of range"),
        ({"retire_days": 0}, "retire_days: 0 is out of range"),
        ({"now": "yesterday"}, "now: 'yesterday' is not an ISO 8601 time"),
    ],
)
def test_bad_input_fails_before_anything_changes(
    keydir: Path, extra: dict[str, Any], message: str
) -> None:
    keydir.parent.mkdir()
    result = call({**args(keydir, now=when(0)), **extra})
    assert result.get("failed"), result
    assert message in result["msg"]
    assert not keydir.exists()


def test_local_domains_accept_a_virtual_wildcard(keydir: Path) -> None:
    keydir.parent.mkdir()
    ok(call(args(keydir, now=when(0), local_domains=["mx.example.net", ".org"])))


def test_a_key_that_does_not_match_its_record_is_reported_not_replaced(keydir: Path) -> None:
    keydir.parent.mkdir()
    ok(call(args(keydir, now=when(0))))
    path = keydir / "s20261202-ed25519.key"
    other = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(other)
    state_before = (keydir / "state.json").read_bytes()
    result = call(args(keydir, now=when(0)))
    assert result.get("failed")
    assert f"{path} does not match the public key in the state file" in result["msg"]
    assert path.read_bytes() == other
    assert (keydir / "state.json").read_bytes() == state_before

    path.unlink()
    result = call(args(keydir, now=when(0)))
    assert f"{path} is missing (selector s20261202-ed25519 is published)" in result["msg"]
    assert not path.exists()


def test_a_small_rsa_key_on_disk_is_refused(keydir: Path) -> None:
    keydir.parent.mkdir()
    ok(call(args(keydir, now=when(0))))
    path = keydir / "s20261202-rsa.key"
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - the bad input
    path.write_bytes(
        small.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    result = call(args(keydir, now=when(0)))
    assert "has 1024 bits, fewer than 2048" in result["msg"]


def test_key_files_without_state_are_reported(keydir: Path) -> None:
    keydir.mkdir(parents=True)
    (keydir / "old.key").write_text("x")
    result = call(args(keydir, now=when(0)))
    assert "holds key files (old.key) but no state.json" in result["msg"]
    assert sorted(p.name for p in keydir.iterdir()) == ["old.key"]


def test_a_broken_state_file_is_reported(keydir: Path) -> None:
    keydir.parent.mkdir()
    ok(call(args(keydir, now=when(0))))
    (keydir / "state.json").write_text('{"version": 1, "domain": "example.net", "keys": []}')
    result = call(args(keydir, now=when(0)))
    assert "holds the keys of 'example.net', not 'example.org'" in result["msg"]


def test_through_ansible_with_check_and_diff(keydir: Path) -> None:
    """The real module run: check mode changes nothing, the run writes, a rerun is ok."""
    keydir.parent.mkdir()
    params = args(keydir, rotate_days=90)
    planned = run_module("pyqmail_dkim_key", params, check=True, diff=True)
    assert planned["changed"], planned
    assert not keydir.exists()
    done = run_module("pyqmail_dkim_key", params, diff=True)
    assert done["changed"], done
    assert len(done["signing"]) == 2
    again = run_module("pyqmail_dkim_key", params, diff=True)
    assert not again["changed"], again
    assert "PRIVATE KEY" not in json.dumps([planned, done, again])


def test_ansible_doc_renders() -> None:
    repo = Path(__file__).resolve().parents[2]
    doc = Path(sys.executable).with_name("ansible-doc")
    proc = subprocess.run(
        [str(doc), "--json", "pyqmail.mail.pyqmail_dkim_key"],
        capture_output=True, text=True, check=False, timeout=120,
        env={**os.environ, "ANSIBLE_CONFIG": str(repo / "ansible.cfg")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)["pyqmail.mail.pyqmail_dkim_key"]
    assert data["doc"]["attributes"]["check_mode"]["support"] == "full"
    assert data["doc"]["attributes"]["diff_mode"]["support"] == "full"
    assert {"records", "signing", "keys"} <= set(data["return"])


files: Any = module_utils("pyqmail_files")
ROT = {"rotate_days": 30, "prepublish_days": 7, "retire_days": 10}


def fail_state_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write of state.json fails as on a full disk (at the file writer, as the OS would)."""
    real = files.write_file

    def write_file(path: str, *a: Any, **kw: Any) -> None:
        if os.path.basename(path) == "state.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, *a, **kw)

    monkeypatch.setattr(files, "write_file", write_file)


def crashed(_self: Any) -> str:
    """In place of the module's clean-up: a crash removes nothing."""
    return "crashed"


def keyfiles(keydir: Path) -> list[str]:
    if not keydir.exists():
        return []
    return sorted(p.name for p in keydir.iterdir() if p.name.endswith(".key"))


@pytest.mark.parametrize("rotation", [False, True])
def test_a_failed_state_write_takes_back_the_new_keys(
    keydir: Path, monkeypatch: pytest.MonkeyPatch, rotation: bool
) -> None:
    """The keys were written, then state.json failed (ENOSPC): the keys stayed, and the next
    run refused ('holds key files ... but no state.json' on a first run, '... exists but is
    not in state.json' on a rotation the same day) until someone deleted them by hand. The
    failed run now removes them; the next run makes the generation as if nothing happened."""
    keydir.parent.mkdir()
    if rotation:
        ok(call(args(keydir, now=when(0), **ROT)))
    before = keyfiles(keydir)
    state = (keydir / "state.json").read_bytes() if rotation else None
    step = args(keydir, now=when(23), **ROT) if rotation else args(keydir, now=when(0))
    with monkeypatch.context() as patched:
        fail_state_writes(patched)
        failed = call(step)
    assert failed.get("failed") is True
    assert "state.json: [Errno 28] No space left on device" in failed["msg"]
    assert "new key files removed: " in failed["msg"]
    assert keyfiles(keydir) == before
    assert ((keydir / "state.json").read_bytes() if rotation else None) == state
    result = run_twice(step)
    assert len(result["generated"]) == 2
    assert sorted(keyfiles(keydir)) == sorted([f"{key['selector']}.key" for key in result["keys"]])


@pytest.mark.parametrize("rotation", [False, True])
def test_key_files_a_crashed_run_left_are_replaced_the_same_day(
    keydir: Path, monkeypatch: pytest.MonkeyPatch, rotation: bool
) -> None:
    """A crash between the keys and state.json leaves keys nobody removes: under a selector
    this run makes, never in state.json (so never published) and newer than it, they are
    replaced; the state and the keys then match (the run after that checks every key
    against its record)."""
    keydir.parent.mkdir()
    if rotation:
        ok(call(args(keydir, now=when(0), **ROT)))
    step = args(keydir, now=when(23), **ROT) if rotation else args(keydir, now=when(0))
    with monkeypatch.context() as patched:
        fail_state_writes(patched)
        # A crash cleans nothing up (raising=False: the old module had nothing to clean up).
        patched.setattr(dkim_module.DkimKeyModule, "discard_created", crashed, raising=False)
        assert call(step).get("failed") is True
    left = {name: (keydir / name).read_bytes() for name in keyfiles(keydir)}
    assert len(left) == (4 if rotation else 2)
    warnings: list[str] = []
    monkeypatch.setattr(basic.AnsibleModule, "warn", lambda self, text: warnings.append(text))
    later = {**step, "now": step["now"].replace("T06:", "T18:")}  # the same day
    again = ok(call(later))
    assert any("left by a run that failed before" in text for text in warnings), warnings
    assert len(again["generated"]) == 2
    for selector in again["generated"]:
        assert (keydir / f"{selector}.key").read_bytes() != left[f"{selector}.key"]
    assert not ok(call(later))["changed"]


def test_an_unknown_key_file_older_than_the_state_is_not_replaced(keydir: Path) -> None:
    """A file under the selector a rotation makes that was there when state.json was last
    written (older than it) is not a failed run's: refused as before, left as it is."""
    keydir.parent.mkdir()
    ok(call(args(keydir, now=when(0), **ROT)))
    stray = keydir / "s20261225-rsa.key"
    stray.write_text("someone's key\n")
    os.utime(stray, (0, 0))
    result = call(args(keydir, now=when(23), **ROT))
    assert f"{stray} exists but is not in {keydir / 'state.json'}" in result["msg"]
    assert stray.read_text() == "someone's key\n"
