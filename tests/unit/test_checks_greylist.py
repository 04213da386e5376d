"""Greylisting (``pyqmail.checks.greylist``): the triplet's life, in the real SQLite file.

Across a restart (a new process's connection to the same file) and across two processes
deciding on the same triplets at once: the state is the file's, not a process's.
"""

from __future__ import annotations

from pathlib import Path

from pyqmail.checks.greylist import Greylist, place
from tests.greylist_util import GREY, T0, at_once
from tests.interpreter import fresh_stdout


def test_networks_are_slash_24_and_slash_64_within_their_slash_48() -> None:
    assert place("192.0.2.77") == place("192.0.2.1") == (bytes([4, 192, 0, 2]), 0)
    assert place("::ffff:192.0.2.77") == place("192.0.2.77")
    assert place("2001:db8:1:2:3:4:5:6") == (bytes([6, 0x20, 0x01, 0x0D, 0xB8, 0, 1]), 2)
    assert place("2001:db8:1:ffff::9") == (place("2001:db8:1::")[0], 0xFFFF)
    assert place("2001:db8:2:2::1")[0] != place("2001:db8:1:2::1")[0]
    assert place("4.192.0.2")[0] != place("0400:c000:0200::")[0]  # no family is another's


def test_new_early_pass_known_and_expired(tmp_path: Path) -> None:
    grey = Greylist(tmp_path)
    new = grey.check("192.0.2.7", "a@b.test", "u@mx.test", GREY, T0)
    assert (new.action, new.code, new.log) == ("defer", 451, "greylist=new greylist_wait=300")
    assert new.text == "Greylisted, please try again in 300 seconds"
    early = grey.check("192.0.2.99", "A@B.test", "U@mx.test", GREY, T0 + 100)  # same /24, case
    assert (early.action, early.log) == ("defer", "greylist=early greylist_wait=200")
    other = grey.check("192.0.3.7", "a@b.test", "u@mx.test", GREY, T0 + 100)  # another /24
    assert other.log.startswith("greylist=new")
    passed = grey.check("192.0.2.8", "a@b.test", "u@mx.test", GREY, T0 + 300)
    assert (passed.action, passed.log) == ("accept", "greylist=pass")
    known = grey.check("192.0.2.8", "a@b.test", "u@mx.test", GREY, T0 + 3000)
    assert known.log == "greylist=known"
    # unseen for longer than the lifetime: forgotten, new again
    again = grey.check("192.0.2.8", "a@b.test", "u@mx.test", GREY, T0 + 3000 + 3601)
    assert again.log.startswith("greylist=new")
    grey.close()


def test_the_state_survives_a_restart(tmp_path: Path) -> None:
    first = Greylist(tmp_path)
    assert first.check("192.0.2.7", "a@b.test", "u@mx.test", GREY, T0).action == "defer"
    first.close()
    code = (
        "import sys; from pathlib import Path;"
        "from pyqmail.checks.greylist import Greylist, Settings;"
        "v = Greylist(Path(sys.argv[1])).check('192.0.2.7', 'a@b.test', 'u@mx.test',"
        " Settings(300, 3600), float(sys.argv[2])); print(v.log)"
    )
    assert fresh_stdout(code, str(tmp_path), str(T0 + 301)).strip() == "greylist=pass"


WORKER = """
import sys
from pathlib import Path
from pyqmail.checks.greylist import Greylist, Settings
grey = Greylist(Path(sys.argv[1]))
sys.stdin.readline()  # start together
logs = [grey.check('192.0.2.7', 's@b.test', f'u{i}@mx.test', Settings(300, 3600), 1e6).log
        for i in range(200)]
print(sum(log.startswith('greylist=new') for log in logs))
"""


def test_two_processes_share_the_triplets(tmp_path: Path) -> None:
    """200 new triplets decided by two processes at once: each is new exactly once, no
    'database is locked' on the way (set-up and writes wait for their turn)."""
    assert sum(int(out) for out in at_once(WORKER, tmp_path)) == 200
    grey = Greylist(tmp_path)
    assert grey.check("192.0.2.7", "s@b.test", "u0@mx.test", GREY, T0 + 1).log.startswith(
        "greylist=early"
    )


def test_a_file_that_is_not_a_database_is_set_aside(tmp_path: Path) -> None:
    (tmp_path / "smtpd").mkdir()
    (tmp_path / "smtpd" / "greylist3.sqlite").write_bytes(b"not a database at all" * 100)
    verdict = Greylist(tmp_path).check("192.0.2.7", "a@b.test", "u@mx.test", GREY, T0)
    assert verdict.log.startswith("greylist=new")
    assert len(list((tmp_path / "smtpd").glob("greylist3.sqlite.broken-*"))) == 1


def test_a_database_it_cannot_open_lets_mail_through(tmp_path: Path) -> None:
    (tmp_path / "smtpd").write_text("a file where the directory should be")
    verdict = Greylist(tmp_path).check("192.0.2.7", "a@b.test", "u@mx.test", GREY, T0)
    assert verdict.action == "accept"
    assert verdict.log.startswith("greylist=error:")
