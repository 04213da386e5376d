"""SMTP AUTH user database: hash format, file parsing, timing of unknown users, the CLI."""

from __future__ import annotations

import base64
import io
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyqmail import authdb
from pyqmail.authdb import AuthDB, AuthDBError, User, atomic_write, hash_password
from pyqmail.tools import users as users_tool

# Known answers from passlib's documentation (passlib.hash.scrypt, password "password").
PASSLIB_LN8 = (
    "$scrypt$ln=8,r=8,p=1$WKs1xljLudd6z9kbY0wpJQ$yCR4iDZYDKv+iEJj6yHY0lv/epnfB6f/w1EbXrsJOuQ"
)
PASSLIB_LN16 = (
    "$scrypt$ln=16,r=8,p=1$aM15713r3Xsvxbi31lqr1Q$nFNh2CVHVjNldFVKDHDlm4CbdRSCdEBsjjJxD+iCs5E"
)


@pytest.fixture(scope="module")
def alice_hash() -> str:
    return authdb.hash_password("correct horse")


@pytest.mark.parametrize("encoded", [PASSLIB_LN8, PASSLIB_LN16])
def test_verifies_passlib_hashes(encoded: str) -> None:
    assert authdb.verify_password("password", encoded)
    assert not authdb.verify_password("Password", encoded)


def test_verify_password_variants() -> None:
    assert authdb.verify_password(b"password", PASSLIB_LN8)
    assert not authdb.verify_password("password ", PASSLIB_LN8)
    assert not authdb.verify_password(b"passwor", PASSLIB_LN8)


def test_hash_format_and_round_trip(alice_hash: str) -> None:
    assert alice_hash.startswith("$scrypt$ln=14,r=8,p=1$")
    params = authdb.parse_hash(alice_hash)
    assert (len(params.salt), len(params.key)) == (16, 32)
    assert authdb.verify_password("correct horse", alice_hash)
    assert not authdb.verify_password("correct horsE", alice_hash)
    # fresh salt every time
    assert authdb.hash_password("correct horse") != alice_hash
    assert not authdb.needs_rehash(alice_hash)


def test_non_ascii_password_is_utf8() -> None:
    encoded = authdb.hash_password("pässwörd", ln=4)
    assert authdb.verify_password("pässwörd", encoded)
    assert authdb.verify_password("pässwörd".encode(), encoded)
    assert not authdb.verify_password("pässwörd".encode("latin-1"), encoded)


@pytest.mark.parametrize(
    ("encoded", "expected"),
    [
        (PASSLIB_LN8, True),
        (PASSLIB_LN16, True),
        (
            "$scrypt$ln=14,r=8,p=1$WKs1xljLudd6z9kb$yCR4iDZYDKv+iEJj6yHY0lv/epnfB6f/w1EbXrsJOuQ",
            True,
        ),
        (
            "$scrypt$ln=14,r=8,p=1$WKs1xljLudd6z9kbY0wpJQ$yCR4iDZYDKv+iEJj6yHY0lv/epnfB6f/w1EbXrsJOuQ",
            False,
        ),
        (
            "$scrypt$ln=14,r=16,p=1$WKs1xljLudd6z9kbY0wpJQ$yCR4iDZYDKv+iEJj6yHY0lv/epnfB6f/w1EbXrsJOuQ",
            True,
        ),
    ],
)
def test_needs_rehash(encoded: str, expected: bool) -> None:
    assert authdb.needs_rehash(encoded) is expected


KEY = "yCR4iDZYDKv+iEJj6yHY0lv/epnfB6f/w1EbXrsJOuQ"
SALT = "WKs1xljLudd6z9kbY0wpJQ"


@pytest.mark.parametrize(
    ("encoded", "message"),
    [
        ("$2b$12$abcdefghijklmnopqrstuv", "unknown hash scheme '2b'"),
        ("$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA", "unknown hash scheme 'argon2id'"),
        ("plaintext", "not of the form"),
        ("", "not of the form"),
        (f"$scrypt$ln=14,r=8$${SALT}${KEY}", "not of the form"),
        (f"$scrypt$r=8,ln=14,p=1${SALT}${KEY}", "not of the form"),
        (f"$scrypt$ln=0,r=8,p=1${SALT}${KEY}", "not of the form"),
        (f"$scrypt$ln=14,r=8,p=1${SALT}==${KEY}", "not of the form"),
        (f"$scrypt$ln=14,r=8,p=1${SALT}", "not of the form"),
        (f"$scrypt$ln=14,r=8,p=1$A${KEY}", "salt is not valid base64"),
        (f"$scrypt$ln=14,r=8,p=1$WKs1xljLudd6z9kbY0wpJR${KEY}", "salt is not canonical"),
        (f"$scrypt$ln=14,r=8,p=1$c2FsdA${KEY}", "salt is 4 bytes"),
        (f"$scrypt$ln=14,r=8,p=1${SALT}$c2FsdA", "key is 4 bytes"),
        (f"$scrypt$ln=30,r=8,p=1${SALT}${KEY}", "above the limit"),
        (f"$scrypt$ln=14,r=8,p=99${SALT}${KEY}", "above the limit"),
    ],
)
def test_bad_hash_strings(encoded: str, message: str) -> None:
    with pytest.raises(AuthDBError, match=message.replace("$", r"\$")):
        authdb.parse_hash(encoded)
    with pytest.raises(AuthDBError):
        authdb.verify_password("password", encoded)


@pytest.mark.parametrize(
    ("password", "message"),
    [("", "empty"), ("a\0b", "NUL"), ("a\nb", "LF"), ("x" * 1025, "longer than 1024")],
)
def test_bad_passwords(password: str, message: str) -> None:
    with pytest.raises(AuthDBError, match=message):
        authdb.hash_password(password)


def test_parse_and_format_line(alice_hash: str) -> None:
    user = authdb.parse_line(f"alice@example.org:{alice_hash}")
    assert user == User("alice@example.org", alice_hash, None)
    assert authdb.format_line(user) == f"alice@example.org:{alice_hash}"
    secret = base64.b64encode("pässwörd".encode()).decode()
    cram = authdb.parse_line(f"bob:{alice_hash}:cram={secret}")
    assert cram == User("bob", alice_hash, "pässwörd")
    assert authdb.format_line(cram) == f"bob:{alice_hash}:cram={secret}"
    for blank in ("", "   ", "# a comment", "#bob:x"):
        assert authdb.parse_line(blank) is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("alice", "got 1 ':'-separated fields"),
        ("a:b:c:d", "got 4 ':'-separated fields"),
        (" alice:{h}", "leading or trailing whitespace"),
        ("alice:{h} ", "leading or trailing whitespace"),
        ("alice:{h}\r", "leading or trailing whitespace"),
        (":{h}", "user name is empty"),
        ("al ice:{h}", "contains whitespace"),
        ("al\tice:{h}", "contains whitespace"),
        ("al\x7fice:{h}", "control character"),
        ("al\x1bice:{h}", "control character"),
        ("{long}:{h}", "longer than 255"),
        ("alice:$2y$10$abc", "user 'alice': unknown hash scheme '2y'"),
        ("alice:secret", "user 'alice': hash is not of the form"),
        ("alice:{h}:md5=abc", "third field must be cram=BASE64"),
        ("alice:{h}:cram=***", "cram= secret is not valid base64"),
        ("alice:{h}:cram=//79", "cram= secret is not valid base64 UTF-8"),
        ("alice:{h}:cram=", "cram= secret: password is empty"),
    ],
)
def test_bad_lines(line: str, message: str) -> None:
    line = line.format(h=PASSLIB_LN8, long="a" * 256)
    with pytest.raises(AuthDBError, match=message.replace("$", r"\$")):
        authdb.parse_line(line)


def test_name_limits() -> None:
    assert authdb.validate_name("a" * 255) == "a" * 255
    assert authdb.validate_name("jörg@exämple.org") == "jörg@exämple.org"
    with pytest.raises(AuthDBError, match="starts with '#'"):
        authdb.format_line(User("#x", PASSLIB_LN8))


def test_load_reports_file_and_line(tmp_path: Path, alice_hash: str) -> None:
    path = tmp_path / "smtpusers"
    cases = {
        "bad name": (f"# users\nalice:{alice_hash}\nb b:{alice_hash}\n", 3, "whitespace"),
        "bad hash": ("\n\nalice:$scrypt$ln=14$x$y\n", 3, "not of the form"),
        "unknown scheme": ("alice:{SSHA}abc\n", 1, "not of the form"),
        "bcrypt": ("alice:$2b$12$abc\n", 1, "unknown hash scheme '2b'"),
        "duplicate": (f"alice:{alice_hash}\n#\nalice:{alice_hash}\n", 3, "duplicate user 'alice'"),
    }
    for name, (text, lineno, message) in cases.items():
        path.write_text(text)
        with pytest.raises(AuthDBError, match=message.replace("$", r"\$")) as info:
            AuthDB.load(str(path))
        assert str(info.value).startswith(f"{path}:{lineno}: "), name
        assert (info.value.path, info.value.lineno) == (str(path), lineno), name
    path.write_bytes(f"alice:{alice_hash}\nb\xffb:{alice_hash}\n".encode("latin-1"))
    with pytest.raises(AuthDBError, match=f"{path}:2: not valid UTF-8"):
        AuthDB.load(str(path))
    with pytest.raises(AuthDBError, match=f"{tmp_path}/missing: cannot read"):
        AuthDB.load(str(tmp_path / "missing"))


def test_database_verify_cram_and_rewrite(tmp_path: Path, alice_hash: str) -> None:
    text = (
        "# managed by hand\n"
        f"alice@example.org:{alice_hash}\n"
        "\n"
        f"bob:{PASSLIB_LN8}:cram={base64.b64encode(b'password').decode()}\n"
        "# trailing comment\n"
    )
    path = tmp_path / "smtpusers"
    path.write_text(text)
    db = AuthDB.load(str(path))
    assert len(db) == 2
    assert [u.name for u in db] == ["alice@example.org", "bob"]
    assert db.verify("alice@example.org", "correct horse")
    assert not db.verify("alice@example.org", "password")
    assert db.verify("bob", b"password")
    assert not db.verify("carol", "password")
    assert db.cram_secret("bob") == "password"
    assert db.cram_secret("alice@example.org") is None
    assert db.cram_secret("carol") is None
    assert db.dump() == text  # a parse/dump round trip changes nothing

    db.set(User("bob", alice_hash))  # replaced in place, cram dropped
    db.set(User("carol", PASSLIB_LN8))
    assert db.remove("alice@example.org")
    assert not db.remove("alice@example.org")
    assert db.dump() == (
        f"# managed by hand\n\nbob:{alice_hash}\n# trailing comment\ncarol:{PASSLIB_LN8}\n"
    )
    with pytest.raises(AuthDBError, match="contains ':'"):
        db.set(User("a:b", alice_hash))


def test_unknown_user_costs_a_hash(alice_hash: str) -> None:
    """An unknown name must take about as long as a wrong password, not return at once.

    Alternating samples and the minimum of each keep the comparison stable on a loaded
    machine (load only ever adds time).
    """
    db = AuthDB([User("alice", alice_hash)])
    times: dict[str, list[float]] = {"alice": [], "nobody": []}
    for _ in range(6):
        for name, samples in times.items():
            start = time.perf_counter()
            assert not db.verify(name, "wrong")
            samples.append(time.perf_counter() - start)
    known, unknown = min(times["alice"]), min(times["nobody"])
    assert 0.5 * known < unknown < 2 * known, (known, unknown)


def test_atomic_write_keeps_mode_and_owner(tmp_path: Path) -> None:
    path = tmp_path / "smtpusers"
    authdb.atomic_write(str(path), b"one\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    os.chmod(path, 0o600)
    if os.geteuid() == 0:
        os.chown(path, 0, 12345)
    inode = path.stat().st_ino
    authdb.atomic_write(str(path), b"two\n")
    st = path.stat()
    assert path.read_bytes() == b"two\n"
    assert st.st_ino != inode  # replaced by rename, not rewritten in place
    assert stat.S_IMODE(st.st_mode) == 0o600
    if os.geteuid() == 0:
        assert st.st_gid == 12345
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smtpusers"]
    if os.geteuid() == 0:  # a new file gets the daemon's group; an existing one keeps its own
        new = tmp_path / "new"
        authdb.atomic_write(str(new), b"x\n", default_gid=1)
        assert (new.stat().st_gid, stat.S_IMODE(new.stat().st_mode)) == (1, 0o640)
        authdb.atomic_write(str(path), b"three\n", default_gid=1)
        assert path.stat().st_gid == 12345


# The CLI, as an admin runs it: a real subprocess with the password on stdin. No Dovecot here
# (a machine after `make run` has one): its sessions are tests/dovecot/test_dovecot_sessions.py's.
def users(path: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    no_dovecot = str(path.parent / "no-dovecot.conf")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pyqmail.tools.users",
            "--file",
            str(path),
            "--dovecot-config",
            no_dovecot,
            *args,
        ],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_add_check_list_del(tmp_path: Path) -> None:
    path = tmp_path / "smtpusers"
    r = users(path, "add", "alice@example.org", stdin="s3cret\n")
    assert (r.returncode, r.stdout) == (0, "added alice@example.org\n"), r.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert "s3cret" not in path.read_text()
    r = users(path, "add", "--cram-md5", "bob", stdin="bobpw")
    assert r.returncode == 0, r.stderr
    assert users(path, "list").stdout == "alice@example.org\nbob\tcram-md5\n"
    assert AuthDB.load(str(path)).cram_secret("bob") == "bobpw"

    assert users(path, "check", "alice@example.org", stdin="s3cret\n").returncode == 0
    r = users(path, "check", "alice@example.org", stdin="wrong\n")
    assert (r.returncode, r.stderr) == (1, "pyqmail-users: unknown user or wrong password\n")
    assert users(path, "check", "nobody", stdin="s3cret\n").returncode == 1

    r = users(path, "add", "alice@example.org", stdin="n3w\n")
    assert (r.returncode, r.stdout) == (0, "updated alice@example.org\n")
    assert users(path, "check", "alice@example.org", stdin="n3w\n").returncode == 0

    assert users(path, "del", "bob").returncode == 0
    r = users(path, "del", "bob")
    assert r.returncode == 1
    assert "no user 'bob'" in r.stderr
    assert users(path, "list").stdout == "alice@example.org\n"


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (("add", "a b"), "pw\n", "contains whitespace"),
        (("add", "alice"), "\n", "password is empty"),
        (("add", "alice"), "two\nlines\n", "contains NUL, CR or LF"),
    ],
)
def test_cli_rejects_bad_input(
    tmp_path: Path, args: tuple[str, ...], stdin: str, message: str
) -> None:
    path = tmp_path / "smtpusers"
    r = users(path, *args, stdin=stdin)
    assert r.returncode == 2
    assert message in r.stderr
    assert not path.exists()


def test_cli_refuses_malformed_file(tmp_path: Path) -> None:
    path = tmp_path / "smtpusers"
    path.write_text("alice:plaintext\n")
    r = users(path, "add", "bob", stdin="pw\n")
    assert r.returncode == 2
    assert f"{path}:1: user 'alice': hash is not of the form" in r.stderr
    assert path.read_text() == "alice:plaintext\n"


def test_cli_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "smtpusers"
    monkeypatch.setattr(sys, "stdin", io.StringIO("pw\n"))
    assert users_tool.main(["--file", str(path), "add", "carol"]) == 0
    assert capsys.readouterr().out == "added carol\n"
    assert AuthDB.load(str(path)).verify("carol", "pw")


def test_cli_writers_at_once_lose_no_change(tmp_path: Path) -> None:
    """A review's finding: pyqmail-users read, changed and replaced the file with no lock, so
    a ``del`` beside an ``add`` was undone (the deleted login could log in again), and the
    tool still said "deleted". Writers now take the file's change lock."""
    path = tmp_path / "smtpusers"
    db = AuthDB()
    for n in range(8):
        db.set(User(name=f"old{n}", hash=hash_password("pw")))
    atomic_write(str(path), db.dump().encode("utf-8"))
    base = [sys.executable, "-m", "pyqmail.tools.users", "--file", str(path)]
    base += ["--dovecot-config", str(tmp_path / "no-dovecot.conf")]
    jobs = [[*base, "del", f"old{n}"] for n in range(4)]
    jobs += [[*base, "add", f"new{n}"] for n in range(4)]
    procs = [
        subprocess.Popen(job, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for job in jobs
    ]
    for proc in procs:
        proc.communicate("pw\n", timeout=60)
        assert proc.returncode == 0
    names = {user.name for user in AuthDB.load(str(path))}
    assert names == {f"old{n}" for n in range(4, 8)} | {f"new{n}" for n in range(4)}
