"""pyqmail.control: one reader and one table for both daemons, with real files on disk.

The two readers used to disagree (issue 15): a missing ``me`` fell back to the host name in
pyqmail-smtpd and was fatal in pyqmail-send; a CRLF in ``me`` was refused by one and
accepted by the other. Each case here loads the same root with both daemons' loaders.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pyqmail.control import reader, table
from pyqmail.control import smtpd as smtpd_control
from pyqmail.control.reader import ControlError
from pyqmail.control.send import Control


def make_root(tmp_path: Path, files: dict[str, bytes]) -> Path:
    control = tmp_path / "control"
    control.mkdir()
    for name, data in files.items():
        (control / name).write_bytes(data)
    return tmp_path


def load_smtpd(root: Path) -> str:
    return smtpd_control.load(root).me


def load_send(root: Path) -> str:
    return Control.load(root).me


LOADERS: list[Callable[[Path], str]] = [load_smtpd, load_send]
IDS = ["pyqmail-smtpd", "pyqmail-send"]


@pytest.mark.parametrize("load", LOADERS, ids=IDS)
def test_missing_me_is_fatal_for_both_daemons(tmp_path: Path, load: Callable[[Path], str]) -> None:
    root = make_root(tmp_path, {})
    with pytest.raises(ControlError) as err:
        load(root)
    assert str(err.value) == f"{root / 'control' / 'me'}: missing or empty; it must name this host"


@pytest.mark.parametrize("load", LOADERS, ids=IDS)
@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "me: missing or empty"),
        (b"\n\n", "me: missing or empty"),
        (b"# only a comment\n", "me: missing or empty"),
        (b"mx.test\r\n", "me:1: carriage return in line (DOS line ends?)"),
        (b"mx\rtest\n", "me:1: carriage return"),
        (b"mx.test\x00\n", "me:1: NUL byte in line"),
        (b"mx.test\x07\n", "me:1: not a valid host name"),
        (b"two words\n", "me:1: not a valid host name"),
        (b"mx.test\nother.test\n", "me:2: only one line expected"),
        (b"\xffmx.test\n", "me:1: not valid UTF-8"),
    ],
)
def test_bad_me_is_refused_by_both_daemons(
    tmp_path: Path, load: Callable[[Path], str], data: bytes, message: str
) -> None:
    root = make_root(tmp_path, {"me": data})
    with pytest.raises(ControlError) as err:
        load(root)
    assert message in str(err.value)
    assert str(root / "control" / "me") in str(err.value)


@pytest.mark.parametrize("load", LOADERS, ids=IDS)
@pytest.mark.parametrize(
    "data",
    [b"MX.Test\n", b"mx.test", b"mx.test \t\n", b"# ours\nmx.test\n", b"mx.test\n\n# end\n"],
)
def test_good_me_reads_the_same_for_both_daemons(
    tmp_path: Path, load: Callable[[Path], str], data: bytes
) -> None:
    assert load(make_root(tmp_path, {"me": data})) == "mx.test"


@pytest.mark.parametrize("load", LOADERS, ids=IDS)
def test_unreadable_file_names_the_file(tmp_path: Path, load: Callable[[Path], str]) -> None:
    root = make_root(tmp_path, {"me": b"mx.test\n", "locals": b"mx.test\n"})
    if os.geteuid() == 0:
        (root / "control" / "locals").unlink()
        (root / "control" / "locals").mkdir()  # unreadable as a file, even for root
        message = "locals: is a directory, expected a file"
    else:
        (root / "control" / "locals").chmod(0)
        message = "locals: cannot read: Permission denied"
    with pytest.raises(ControlError, match=message):
        load(root)


@pytest.mark.parametrize("load", LOADERS, ids=IDS)
def test_shared_files_mean_the_same_to_both(tmp_path: Path, load: Callable[[Path], str]) -> None:
    """locals and maxhops: one parser, one message, whichever daemon reads them."""
    root = make_root(tmp_path, {"me": b"mx.test\n", "locals": b"ok.test\nbad_name.test\n"})
    with pytest.raises(ControlError, match="locals:2: not a valid domain name"):
        load(root)
    (root / "control" / "locals").write_bytes(b"ok.test\n")
    (root / "control" / "maxhops").write_bytes(b"0\n")
    with pytest.raises(ControlError, match=r"maxhops:1: 0 is out of range \(min 1, max 10000\)"):
        load(root)


def test_reader_semantics(tmp_path: Path) -> None:
    """qmail's control_readfile: trailing blanks stripped, # and blank lines skipped."""
    path = tmp_path / "f"
    assert reader.read_lines(path) is None
    assert reader.read_line(path) is None
    path.write_bytes(b"# c\n\na \t\n  b\n#x\n  # not a comment\n")
    assert [(line.lineno, line.text) for line in reader.read_lines(path) or []] == [
        (3, "a"),
        (4, "  b"),
        (6, "  # not a comment"),
    ]
    path.write_bytes(b"\n# nothing\n")
    assert reader.read_line(path) == reader.Line(path, 0, "")


def test_doublebounceto_empty_means_drop_but_an_empty_number_is_an_error(tmp_path: Path) -> None:
    root = make_root(tmp_path, {"me": b"mx.test\n", "doublebounceto": b"\n"})
    assert Control.load(root).doublebounceto == ""
    (root / "control" / "concurrencylocal").write_bytes(b"\n")
    with pytest.raises(ControlError, match="concurrencylocal: file is empty"):
        Control.load(root)


def test_table_covers_what_the_readers_read() -> None:
    """Every entry names at least one daemon; the files both read are the documented ones."""
    assert all(entry.readers <= table.BOTH and entry.readers for entry in table.TABLE.values())
    both = {name for name, entry in table.TABLE.items() if entry.readers == table.BOTH}
    assert both == {"me", "locals", "maxhops", "virtualdomains"}  # smtpd: which rcpt is local
    assert table.readers("smtproutes") == {"send"}
    assert table.readers("databytes") == {"smtpd"}
    assert table.readers("no-such-file") == frozenset()
